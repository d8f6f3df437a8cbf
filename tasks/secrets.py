"""The host side of bound secrets (the manifest's `secrets`, tasks/manifest/secrets.py): each bottle's
placeholders, and handing the real values to the egress proxy.

    .bottle/agents/<agent>/placeholders.json    {NAME: placeholder}: made once, so a bottle's placeholders stay
                                                 the same across attaches (Claude Code approves an API key by
                                                 its end, and would ask again for a new one)

A placeholder is what the guest holds instead of the value: random, recognisable (it says it is a
placeholder), and of the value's shape where clients check it (Anthropic's key prefixes). It is no secret:
the proxy uses it only for requests through this bottle's door. The real values are read from this
process's environment when attaching and handed to the running proxy (EgressProxy.hand_over), which keeps
them in memory only: they are never written, never on a command line, never given to a backend.
"""
from __future__ import annotations

import json
import os
import secrets as random
from pathlib import Path

from daemons.atomic import write_atomic
from tasks.manifest import Agent
from tasks.project import Project

PLACEHOLDERS_FILE = 'placeholders.json'
PREFIXES = {'ANTHROPIC_API_KEY': 'sk-ant-api03-', 'CLAUDE_CODE_OAUTH_TOKEN': 'sk-ant-oat01-'}


def placeholders_file(project: Project, agent_name: str) -> Path:
    return project.agent_dir(agent_name) / PLACEHOLDERS_FILE


def placeholder(name: str) -> str:
    return f'{PREFIXES.get(name, "")}bottle-placeholder-{name}-{random.token_hex(16)}'


def placeholders(project: Project, agent: Agent) -> dict[str, str]:
    """{NAME: placeholder} for each of the agent's secrets; those it had keep theirs, new ones are made and
    the file written (atomically) only when something was added."""
    path = placeholders_file(project, agent.name)
    try:
        known = json.loads(path.read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    made = {s.name: known[s.name] if isinstance(known.get(s.name), str) else placeholder(s.name)
            for s in agent.secrets}
    if any(known.get(name) != value for name, value in made.items()):
        write_atomic(path, json.dumps({**known, **made}, indent=2, sort_keys=True) + '\n')
    return made


def bindings(project: Project, agent: Agent) -> list[dict]:
    """The agent's secrets in the rules format (daemons/proxy/rules.py), placeholders included."""
    made = placeholders(project, agent)
    return [{**secret.binding(), 'placeholder': made[secret.name]} for secret in agent.secrets]


def present(agent: Agent) -> tuple[dict[str, str], list[str]]:
    """(the values of the agent's secrets this process's environment has, the names it lacks)."""
    values = {s.name: os.environ[s.name] for s in agent.secrets if os.environ.get(s.name)}
    return values, [s.name for s in agent.secrets if s.name not in values]
