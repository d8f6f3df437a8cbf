"""launch:<agent>: the bottle up and provisioned, then Claude Code on your terminal.

Claude runs as the agent user (it refuses to skip permissions as root), with
--append-system-prompt-file iff the agent has a prompt, and with the manifest's
secrets as placeholders (tasks/secrets.py): their values go to the egress proxy,
never to the guest, a backend, a command line, a file, a log or doit's database.
Without a terminal it does not wait: it prints the command that attaches.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from tasks import egress, guest, secrets
from tasks.backends.protocol import on
from tasks.backends.pick import backend
from tasks.errors import BottleError
from tasks.manifest import BACKEND_ENV, Agent
from tasks.project import Project, action
from tasks.prompt import prompt_file


def tasks(project: Project):
    for agent in project.agents.values():
        yield {
            'name': agent.name,
            'doc': f'bring {agent.name} up, provisioned, and attach Claude Code',
            'actions': [(attach, [project, agent])],
            'task_dep': [f'provision:{agent.name}'],
            'verbosity': 2,
        }


def claude_argv(project: Project, agent: Agent) -> list[str]:
    argv = ['claude']
    if prompt_file(project, agent.name).stat().st_size:
        argv += ['--append-system-prompt-file', guest.prompt_path(agent)]
    return argv


def relaunch_command(project: Project, agent: Agent) -> str:
    """`doit launch:<agent>` as it works when pasted into a new shell: from the project directory,
    with the backend the environment chose (a new shell may not have it), and with this Python's
    doit: `doit` when that is the one on PATH, else its script's absolute path (a venv's, such as
    demo.sh's .venv, which a new shell does not have on PATH), else this Python's `-m doit`."""
    script = Path(sys.executable).parent / 'doit'
    found = shutil.which('doit')
    if found and script.is_file() and os.path.samefile(found, script):
        doit = 'doit'
    elif script.is_file() and os.access(script, os.X_OK):
        doit = shlex.quote(str(script))
    else:
        doit = f'{shlex.quote(sys.executable)} -m doit'
    command = f'{doit} launch:{agent.name}'
    if os.environ.get(BACKEND_ENV) == agent.backend:
        command = f'{BACKEND_ENV}={agent.backend} {command}'
    if Path(os.environ.get('PWD', '')).resolve() != project.root:   # doit runs in the project dir
        command = f'cd {shlex.quote(str(project.root))} && {command}'
    return command


@action
def attach(project: Project, agent: Agent):
    """Claude Code on this terminal, its secrets as placeholders; their values, from this environment, handed
    to the egress proxy first (a rotated value applies from this attach on). Without a terminal: the values
    present are handed over all the same, and the command that attaches is printed."""
    command = backend(agent.backend, agent.engine).attach_argv(
        agent.machine, claude_argv(project, agent), user=agent.user.name, home=agent.user.home,
        env=secrets.placeholders(project, agent))
    values, missing = secrets.present(agent)
    if not (os.isatty(0) and os.isatty(1)):
        if values:
            egress.proxy(project).hand_over(agent.name, values)
        print(f'{agent.name} is up and provisioned in {agent.machine} on {on(agent.backend, agent.engine)}. '
              f'Attach Claude Code from a terminal with\n  {relaunch_command(project, agent)}\nor directly with\n'
              f'  {shlex.join(command)}')
        if missing:
            print(f'Set {", ".join(missing)} in your environment first; the egress proxy gets '
                  f'{"its value" if len(missing) == 1 else "their values"} at attach time only, and the '
                  'bottle a placeholder.')
        return
    if missing:
        raise BottleError(f'{agent.name} needs {", ".join(missing)} from your environment (manifest key '
                          f'secrets): export {missing[0]}=... and run `doit launch:{agent.name}` again')
    egress.proxy(project).hand_over(agent.name, values)
    code = subprocess.call(command)
    if code != 0:
        raise BottleError(f'Claude Code in {agent.machine} exited with code {code}')
