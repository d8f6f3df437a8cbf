"""Where things go inside a bottle."""
from __future__ import annotations

import os

from tasks.manifest import Agent

SKILLS_DIR_ENV = 'CLAUDE_BOTTLE_GUEST_SKILLS_DIR'
MANAGED_SKILLS = '.claude-bottle-skills'   # in the skills dir: the skills claude-bottle put there


def prompt_path(agent: Agent) -> str:
    return f'{agent.user.home}/.claude-bottle/system-prompt.md'


def skills_dir(agent: Agent) -> str:
    return os.environ.get(SKILLS_DIR_ENV) or f'{agent.user.home}/.claude/skills'
