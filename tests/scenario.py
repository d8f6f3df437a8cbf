"""The common agent scenario, for the tests that launch agents through tests/bottles.py: an agent with
the skills review and style and a prompt (setup_agent), the check that a launched agent's guest holds
exactly its prompt and skills (assert_fully_provisioned), where they land in the guest, a PATH
without some programs (path_without), and every command line a launch sends (sent_in_a_launch)."""
from __future__ import annotations

import json
import os
import shlex

HOME = '/home/agent'
SKILLS = f'{HOME}/.claude/skills'
PROMPT = f'{HOME}/.claude-bottle/system-prompt.md'

REVIEW = {
    'SKILL.md': '---\nname: review\ndescription: review code\n---\nReview with checklist.md.\n',
    'checklist.md': '- tests\n- names\n',
    'scripts/lint.sh': '#!/bin/sh\necho lint\n',
    'examples/one.md': 'one\n', 'examples/two.md': 'two\n',
}


def setup_agent(bottles, name='a', skills=('review', 'style'), prompt='Be careful with production.', **more):
    for skill in skills:
        if not (bottles.root / 'agents' / 'skills' / skill).exists():
            bottles.skill(skill, REVIEW if skill == 'review' else None)
    bottles.agent(name, prompt=prompt, skills=list(skills), **more)


TEST_SECRET = {'name': 'BOTTLE_TEST_SECRET', 'hosts': ['api.test-secret.example'], 'header': 'Authorization',
               'format': 'Bearer {}'}
TEST_SECRET_NETWORK = {'allow_hosts': ['api.test-secret.example']}


def sent_in_a_launch(bottles) -> list[list[str]]:
    """Every command line the backend sent to build an image, launch an agent with a secret and tear it
    down, and last the attach command the launch printed, as a shell splits it (its program left out)."""
    bottles.own_images()            # the launch builds its image: the commands of a build are sent too
    setup_agent(bottles, secrets=[TEST_SECRET], network=TEST_SECRET_NETWORK)
    printed = bottles.doit('launch:a', env=bottles.env(BOTTLE_TEST_SECRET='value-never-printed')).stdout
    bottles.doit('teardown:a')
    attach = next(line for line in printed.splitlines() if line.strip().startswith('smolvm machine exec'))
    return bottles.backend.calls_since(0) + [shlex.split(attach)[1:]]


def placeholder_of(bottles, agent: str, name: str) -> str:
    """The placeholder the bottle's guest holds for secret `name`."""
    return json.loads((bottles.root / '.bottle' / 'agents' / agent / 'placeholders.json').read_text())[name]


def path_without(programs, path: str, tmp) -> str:
    """A PATH of one directory holding every command of `path` except `programs`."""
    mirror = tmp / f'path-without-{"-".join(sorted(programs))}'
    mirror.mkdir()
    for directory in path.split(os.pathsep):
        for entry in sorted(os.scandir(directory), key=lambda e: e.name) if os.path.isdir(directory) else []:
            if entry.name not in programs and not (mirror / entry.name).exists():
                (mirror / entry.name).symlink_to(entry.path)
    return str(mirror)


def assert_fully_provisioned(bottles, agent='a'):
    prompt = bottles.prompt_text(agent)
    assert bottles.guest(agent, f'cat {PROMPT}') == prompt
    assert bottles.guest(agent, f'stat -c "%a %U" {PROMPT}').split() == ['600', 'agent']
    skills = bottles.guest(agent, f'ls {SKILLS}').split()
    manifest_skills = bottles.manifest(agent)['skills']
    assert sorted(skills) == sorted(manifest_skills)
    for skill in manifest_skills:
        assert bottles.guest_tree(agent, f'{SKILLS}/{skill}') == bottles.skill_tree(skill)
