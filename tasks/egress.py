"""The bottles' egress, host side: the project's proxy, its CA, and one door per bottle.

egress_env:<version>  mitmproxy's own virtual environment, made once per user cache (PyPI the
                      first time); a setup task, so nothing is built when no door has to open.
egress_ca             the project's CA in .bottle/egress/ca/ (ECDSA P-256; the key file, 0600, is
                      the only copy of the key). `doit clean egress_ca` removes it; the next run
                      makes a new one; egress:<agent> restarts a running proxy to use it, and
                      provision_ca:<agent> gives it to the guest.
allowlist:<agent>     .bottle/agents/<agent>/egress-rules.json, the bottle's rules: the manifest's
                      hosts, those its skills declare (`allow_hosts:` in SKILL.md's front matter),
                      Claude Code's own, and those the human approved through the
                      supervisor, and its secrets' bindings with the bottle's placeholders
                      (tasks/secrets.py). The proxy reads a changed file at the next request,
                      without a restart; `doit info allowlist:<agent>` shows the rules it would write.
egress:<agent>        the bottle's door open: the project's proxy running (one process for all
                      bottles, state in .bottle/egress/) and the bottle's socket answering. Up to
                      date while a health request through the door is answered for the bottle,
                      which costs no backend call; a crashed proxy is started again (it listens on
                      every door itself: no relay, no TCP port).
machine:<agent> depends on egress:<agent>, so every launch checks the door first; teardown:<agent>
closes it, and the proxy stops with the last one.

BOTTLE_UPSTREAM_CA names a PEM file of extra CAs the proxy trusts for upstream servers besides the
system's (an internal registry's); the proxy is restarted when it changes.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from doit.tools import config_changed

from daemons.proxy import ca
from daemons.proxy.control import MITMPROXY_VERSION, Door, EgressProxy, ensure_venv, venv_dir, write_rules
from daemons.supervise import approved
from tasks import secrets
from tasks.cache import cache_dir
from tasks.checks import FileExists
from tasks.manifest import Agent
from tasks.progress import progress, stopped
from tasks.project import Project, action

ENV_TASK = f'egress_env:{MITMPROXY_VERSION}'
UPSTREAM_CA_ENV = 'BOTTLE_UPSTREAM_CA'
WHAT = 'the project\'s egress proxy'


def proxy(project: Project) -> EgressProxy:
    return EgressProxy(project.daemon_dir('egress'), venv_dir(cache_dir()),
                       upstream_ca=os.environ.get(UPSTREAM_CA_ENV) or None)


def rules_file(project: Project, agent_name: str) -> Path:
    return door(project, agent_name).rules


def door(project: Project, agent_name: str) -> Door:
    """The bottle's door, whose socket its machine mounts. A socket path holds at most 107 bytes, so
    it lives in a short private directory of the user, named by a hash of project and agent, not
    in the project."""
    name = hashlib.sha256(f'{project.root}\0{agent_name}'.encode()).hexdigest()[:16]
    return Door(agent_name, project.agent_dir(agent_name).resolve(),
                Path(tempfile.gettempdir()) / f'claude-bottle-{os.getuid()}' / name)


def door_socket(project: Project, agent_name: str) -> Path:
    return door(project, agent_name).socket


class DoorOpen:
    """The project's proxy runs (ours, current) and the bottle's door takes connections."""

    def __init__(self, project: Project, agent: Agent):
        self.project, self.agent = project, agent

    def __call__(self, task, values):
        return proxy(self.project).door_open(self.agent.name)     # never raises

    def __repr__(self):
        return f'the egress door of {self.agent.name} and the project\'s proxy behind it take connections'


def env_tasks(project: Project):
    venv = venv_dir(cache_dir())
    yield {
        'name': MITMPROXY_VERSION,
        'doc': f'make mitmproxy {MITMPROXY_VERSION}\'s environment in {venv}',
        'actions': [(make_env, [])],
        'uptodate': [FileExists(venv / 'bin' / 'python', 'mitmproxy environment')],
    }


def ca_task(project: Project) -> dict:
    egress = proxy(project)
    return {
        'actions': [(make_ca, [project])],
        'setup': [ENV_TASK],
        'targets': [egress.ca_cert],
        'uptodate': [FileExists(egress.ca_dir / ca.KEY_FILE, 'egress CA key')],
        'clean': [(shutil.rmtree, [egress.ca_dir], {'ignore_errors': True})],
    }


def allowlist_tasks(project: Project):
    for agent in project.agents.values():
        rules = agent.egress_rules
        yield {
            'name': agent.name,
            'doc': f'write the egress rules of {agent.name}',
            'actions': [(write_allowlist, [project, agent, rules])],
            'file_dep': [agent.skill_dir(skill) / 'SKILL.md' for skill in agent.skills],
            'targets': [rules_file(project, agent.name)] + ([secrets.placeholders_file(project, agent.name)]
                                                             if agent.secrets else []),
            'uptodate': [config_changed({**rules, 'approved': approved.text(approved_file(project, agent))
                                         if agent.supervise else None})],
            'clean': True,
        }


def tasks(project: Project):
    for agent in project.agents.values():
        yield {
            'name': agent.name,
            'doc': f'open the egress door of {agent.name} (the project\'s proxy running)',
            'actions': [(open_door, [project, agent])],
            'task_dep': ['egress_ca', f'allowlist:{agent.name}'],
            'setup': [ENV_TASK],
            'uptodate': [DoorOpen(project, agent)],
            'clean': [(close_door, [project, agent.name])],
        }

@action
def make_env():
    progress(f'making the egress proxy\'s environment, mitmproxy {MITMPROXY_VERSION} from PyPI (once per user)')
    ensure_venv(cache_dir())


@action
def make_ca(project: Project):
    proxy(project).ensure_ca()      # a running proxy holds the old one: egress:<agent> restarts it


@action
def write_allowlist(project: Project, agent: Agent, rules: dict):
    """The manifest's rules, with the hosts the human approved for a supervised agent."""
    hosts = approved.read(approved_file(project, agent)) if agent.supervise else []
    merged = approved.merged(rules, hosts)
    if agent.secrets:
        merged['secrets'] = secrets.bindings(project, agent)
    write_rules(rules_file(project, agent.name), merged)


def approved_file(project: Project, agent: Agent) -> Path:
    return approved.file(project.daemon_dir('supervise'), agent.name)


@action
def open_door(project: Project, agent: Agent):
    bottle = door(project, agent.name)
    proxy(project).open_door(agent.name, bottle.bottle_dir, bottle.directory)


@action
def close_door(project: Project, agent_name: str):
    """Close the bottle's door if the project ever opened one; the proxy stops with the last."""
    egress = proxy(project)
    if egress.doors_file.exists() and egress.close_door(agent_name):
        stopped(WHAT)
