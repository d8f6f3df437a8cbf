"""prompt:<agent>: the system prompt, rendered into the agent's state dir (mode 0600)."""
from __future__ import annotations

from doit.tools import config_changed

from daemons.atomic import write_atomic
from daemons.gate.config import MODES
from tasks import guest
from tasks.manifest import Agent
from tasks.project import Project, action

TEMPLATE = 'prompt.md.j2'


def prompt_file(project: Project, agent_name: str):
    return project.agent_dir(agent_name) / 'prompt.md'


def tasks(project: Project):
    template = project.template_file(TEMPLATE)
    for agent in project.agents.values():
        # Skills are not listed: Claude Code finds them itself, and a changed skill
        # list then costs no prompt copy.
        settings = {'prompt': agent.prompt, 'allowed': allowed(agent), 'repositories': repositories(agent),
                    'proxy': guest.PROXY_URL, 'user': agent.user.name, 'home': agent.user.home,
                    'supervise': agent.supervise, 'supervise_wait': agent.supervise_wait,
                    'secrets': secrets(agent)}
        yield {
            'name': agent.name,
            'doc': f'render the system prompt of {agent.name}',
            'actions': [(render, [project, agent, settings])],
            'file_dep': [template] + ([agent.prompt_file] if agent.prompt_file else []),
            'targets': [prompt_file(project, agent.name)],
            'uptodate': [config_changed(settings)],
            'clean': True,
        }


def allowed(agent: Agent) -> list[str]:
    """The fence in words, one line per allowed host: the manifest's, its skills' and Claude Code's."""
    lines = []
    for entry in dict.fromkeys(agent.hosts + agent.skill_hosts + agent.claude_code_hosts):
        line = f'{entry.name} and every name under it' if entry.host.startswith('*.') else entry.name
        narrowed = ' '.join(filter(None, [
            '/'.join(entry.methods) if entry.methods else None,
            f'on paths starting {" or ".join(entry.paths)}' if entry.paths else None]))
        lines.append(f'{line} ({narrowed} only)' if narrowed else line)
    return lines


def repositories(agent: Agent) -> list[str]:
    """The git gate in words, one line per repository of the manifest's `git:` list."""
    return [f'{repo.url}: you may push {", ".join(p.removeprefix("refs/heads/") for p in repo.push)} '
            f'(fast-forwards only); {MODES[repo.mode]}' for repo in agent.git]


def secrets(agent: Agent) -> list[str]:
    """The bound secrets in words, one line per secret."""
    return [f'{secret.name}: goes in the {secret.header} header of requests to {", ".join(secret.hosts)}'
            for secret in agent.secrets]


@action
def render(project: Project, agent, settings: dict):
    text = agent.prompt_file.read_text() if agent.prompt_file else settings['prompt']
    rendered = project.render(TEMPLATE, **{**settings, 'prompt': text.strip(), 'agent': agent.name,
                                           'machine': agent.machine})
    write_atomic(prompt_file(project, agent.name), rendered, mode=0o600)
