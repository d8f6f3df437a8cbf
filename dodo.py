"""claude-bottle: agent manifests in, running Claude Code bottles out.

    doit launch:<agent>   image, machine, start, provision, then Claude Code on your terminal
    doit                  every agent up and provisioned (no attach)
    doit list --all       every task; `doit info <task>` says why it would run
    doit teardown:<agent> machine deleted, state forgotten; `doit clean` removes all outputs
    doit prune            old images, forgotten agents and superseded bases removed
    doit status           every agent: machine, image, door, what its next launch would do and why
    doit supervise        the supervisor's page and what the agents ask; doit approve --id ID to grant

The task graph, top to bottom: each family lives in its own module under tasks/.
"""
from pathlib import Path

from tasks import bases, egress, forward, gate, image, launch, machine, prompt, provision, supervise
from tasks.commands import prune, review, status
from tasks.project import Project

PROJECT = Project(Path(__file__).parent)
DOIT_CONFIG = PROJECT.doit_config()


def task_prompt():
    """Render each agent's system prompt into its state dir (mode 0600)."""
    yield from prompt.tasks(PROJECT)


def task_claude_code():
    """Fetch the Claude Code package each recipe pins (user cache, once per version)."""
    yield from image.claude_code_tasks(PROJECT)


def task_base():
    """Build registry-free image bases (debootstrap), cached per user."""
    yield from bases.tasks(PROJECT)


def task_image():
    """Build and pack agent images, one per distinct recipe."""
    yield from image.tasks(PROJECT)


def task_forward():
    """Forward the doors of the bottles on an engine elsewhere to its worker, over SSH."""
    yield from forward.tasks(PROJECT)


def task_machine():
    """Create each agent's machine from its image: no network card, its egress door mounted."""
    yield from machine.tasks(PROJECT)


def task_start():
    """Start each agent's machine."""
    yield from machine.start_tasks(PROJECT)


def task_provision():
    """Provision each running machine: egress CA, git, supervisor, prompt and skills, each only when changed."""
    yield from provision.tasks(PROJECT)


def task_egress_env():
    """Make mitmproxy's environment for the egress proxy (user cache, once per version)."""
    yield from egress.env_tasks(PROJECT)


def task_egress_ca():
    """Make the project's egress CA (`doit clean egress_ca` for a new one)."""
    return egress.ca_task(PROJECT)


def task_allowlist():
    """Write each agent's egress rules: its hosts, its skills' and Claude Code's."""
    yield from egress.allowlist_tasks(PROJECT)


def task_egress():
    """Open each agent's egress door on the project's proxy (started if it is not running)."""
    yield from egress.tasks(PROJECT)


def task_gate():
    """Run the project's git gate for the agents' git: repositories, and route the bottles to it."""
    return gate.task(PROJECT)


def task_supervisor():
    """Run the project's supervisor for the supervised agents, and route the bottles to it."""
    return supervise.task(PROJECT)


def task_human_side():
    """The human's side, each its own command: supervise, held, approve, reject, answer, revoke."""
    yield from review.tasks(PROJECT)


def task_launch():
    """Bring an agent's bottle up, provisioned, and attach Claude Code."""
    yield from launch.tasks(PROJECT)


def task_prune():
    """Remove old images, forgotten agents' machines and state, and superseded bases."""
    return prune.task(PROJECT)


def task_status():
    """Show every agent: machine, image, egress door, what its next launch would do and why."""
    return status.task(PROJECT, globals())


def task_teardown():
    """Stop and delete an agent's machine and forget its state."""
    yield from machine.teardown_tasks(PROJECT)
