"""What is about the docker backend itself, on each real engine: podman and a dockerd of the tests' own."""
from __future__ import annotations

import json
import platform
import subprocess

import pytest
import yaml

from tasks.project import Project
from tests.bottles import TEST_CLAUDE_VERSION, podman_containers, remove_podman_containers
from tests.conftest import podman_problem
from tests.scenario import (PROMPT, SKILLS, TEST_SECRET, TEST_SECRET_NETWORK, assert_fully_provisioned,
                            placeholder_of, setup_agent)


def test_image_from_the_offline_base_has_claude_git_curl_socat_and_a_non_root_agent(engine):
    engine.use_real_claude()
    engine.agent('a', prompt='hi')
    engine.doit('provision')
    record = json.loads(next((engine.root / '.bottle/images').glob('*/image.json')).read_text())
    assert record['base'] == 'debootstrap:bookworm' and record['backend'] == engine.backend.name
    facts = dict(line.split('=', 1) for line in engine.guest('a', '''
        echo "claude=$(su agent -s /bin/sh -c 'claude --version')"
        echo "git=$(git --version)"
        echo "curl=$(curl --version | head -1)"
        echo "socat=$(socat -V | grep '^socat version')"
        echo "update_ca=$(command -v update-ca-certificates)"
        echo "agent_uid=$(id -u agent)"
        echo "image=$(cat /etc/claude-bottle/image.json)"
    ''').splitlines())
    assert facts['claude'].startswith(record['claude_code'] + ' ')
    assert facts['git'].startswith('git version') and facts['curl'].startswith('curl ')
    assert facts['socat'].startswith('socat version ')       # the guest's end of the egress door
    assert facts['update_ca'] == '/usr/sbin/update-ca-certificates'
    assert facts['agent_uid'] != '0'
    inside = json.loads(facts['image'])
    assert inside['recipe'] == record['key'] and inside['claude_code'] == facts['claude']
    # socat comes with the debootstrap base (named like its task), so the setup needs no network for it
    base_task, = (t for t in engine.doit('list', '--all', '-q', 'base').stdout.split() if t.startswith('base:'))
    base = (engine.backend.cache / 'claude-bottle/bases'
            / f'{base_task.removeprefix("base:")}-{platform.machine()}.tar')
    listing = subprocess.run(['tar', '-tf', str(base)], capture_output=True, text=True, check=True).stdout
    assert './usr/bin/socat' in listing.splitlines()


def test_machine_is_a_container_with_the_agents_resources_labels_and_no_network(engine):
    setup_agent(engine, resources={'cpus': 1, 'memory': 1024}, env={'MODE': 'review'})
    run = engine.doit('provision')
    create = next(c for c in run.calls if c[0] == 'create' and engine.machine('a') in c)
    assert create[create.index('--cpus') + 1] == '1' and create[create.index('--memory') + 1] == '1024m'
    assert create[create.index('--network') + 1] == 'none'
    mounts = [create[i + 1] for i, arg in enumerate(create) if arg == '-v']
    assert f'{engine.door_dir("a")}:/run/bottle:ro' in mounts     # the door's directory
    assert '--read-only' in create and any(m.endswith('/disk/home/agent:/home/agent') for m in mounts)   # the disk
    assert 'claude-bottle.agent=a' in create and 'MODE=review' in create
    assert engine.guest('a', 'echo $MODE; cat /proc/net/dev | tail -n +3 | cut -d: -f1').split() == ['review', 'lo']


def test_attach_command_passes_a_secrets_placeholder_never_its_value(engine):
    setup_agent(engine, secrets=[TEST_SECRET], network=TEST_SECRET_NETWORK)
    run = engine.doit('launch:a', env=engine.env(BOTTLE_TEST_SECRET='value-never-printed'))
    placeholder = placeholder_of(engine, 'a', 'BOTTLE_TEST_SECRET')
    assert (f'{engine.backend.cli} exec -it -u agent -w /home/agent -e HOME=/home/agent -e '
            f'BOTTLE_TEST_SECRET={placeholder} {engine.machine("a")}') in run.stdout
    assert 'value-never-printed' not in run.output


def test_switching_backends_needs_only_the_environment_variable_or_the_manifest_key(standin):
    if podman_problem():
        pytest.skip(podman_problem())
    standin.write(standin.root / 'agents/_defaults.yaml',
                  yaml.safe_dump({'image': {'base': 'debootstrap:bookworm', 'claude_code': TEST_CLAUDE_VERSION}}))
    setup_agent(standin)
    label = Project(standin.root).label
    try:
        standin.doit('launch:a', env=standin.env(BOTTLE_BACKEND='podman'))
        assert podman_guest(standin.machine('a'), f'cat {PROMPT}') == standin.prompt_text('a')
        assert standin.backend.machine_state(standin.machine('a')) is None

        standin.doit('launch:a', env=standin.env(BOTTLE_BACKEND=None))      # the default: smolvm
        assert_fully_provisioned(standin)
        assert podman_containers(label) == []

        setup_agent(standin, backend='podman')
        standin.doit('launch:a', env=standin.env(BOTTLE_BACKEND=None))
        assert podman_guest(standin.machine('a'), f'ls {SKILLS}').split() == ['review', 'style']
        assert standin.backend.machine_state(standin.machine('a')) is None
    finally:
        remove_podman_containers(label)


def podman_guest(machine: str, script: str) -> str:
    return subprocess.run(['podman', 'exec', machine, 'sh', '-c', script], capture_output=True,
                          text=True, check=True).stdout

