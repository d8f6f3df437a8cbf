"""What is about smolvm itself: its argv, its absence, and packs cut short."""
from __future__ import annotations

import json

from tests.scenario import TEST_SECRET, TEST_SECRET_NETWORK, placeholder_of, setup_agent


def test_machine_is_created_from_the_pack_with_resources_labels_no_network_and_its_door(standin):
    standin.own_images()                # the build machine's calls are looked at
    setup_agent(standin, resources={'cpus': 3, 'memory': 1024, 'disk': 5}, env={'MODE': 'review'},
                network={'allow_hosts': ['api.anthropic.com', 'pypi.org']})
    run = standin.doit('provision')
    create = next(c for c in run.calls if c[:2] == ['machine', 'create'] and standin.machine('a') in c)
    assert create[create.index('--from') + 1].endswith('.smolmachine')
    assert create[create.index('--cpus') + 1] == '3' and create[create.index('--mem') + 1] == '1024'
    assert create[create.index('--overlay') + 1] == '5'            # resources.disk: the overlay, where it writes
    listed = {m['name']: m for m in json.loads(standin.backend.smolvm('machine', 'ls', '--json').stdout)}
    assert listed[standin.machine('a')]['overlay_gb'] == 5 and listed[standin.machine('a')]['storage_gb'] is None
    assert not {'--allow-host', '--net', '--allow-cidr'} & set(create)      # no network card at all
    door = standin.door_dir('a') / 'egress.sock'
    assert create[create.index('--mount-socket') + 1] == f'{door}:/run/bottle/egress.sock'
    assert 'MODE=review' in create and 'claude-bottle.agent=a' in create
    assert 'HTTPS_PROXY=http://127.0.0.1:3128' in create
    assert create[create.index('--') + 1:] == ['socat', 'TCP-LISTEN:3128,bind=127.0.0.1,reuseaddr,fork,nodelay',
                                               'UNIX-CONNECT:/run/bottle/egress.sock']
    kinds = [standin.backend.kind(c) for c in run.calls]
    assert kinds.index('update') < kinds.index('pack')          # build machine off the net, then packed
    update = run.calls[kinds.index('update')]
    assert '--no-net' in update
    assert standin.guest('a', 'echo $MODE').strip() == 'review'


def test_the_build_machine_is_gone_after_the_pack(standin):
    standin.own_images()
    setup_agent(standin)
    assert standin.doit('image').count('pack') == 1
    listed = standin.backend.smolvm('machine', 'ls', '--json').stdout.decode()
    assert 'bottle-build-' not in listed


def test_a_machine_this_project_did_not_make_is_never_deleted(standin):
    setup_agent(standin)
    standin.doit('image')
    standin.backend.smolvm('machine', 'create', '--name', standin.machine('a'), '--image', 'debian:bookworm-slim',
                           '--net', '--', 'sleep', 'infinity')
    run = standin.doit('launch:a', check=False)
    assert run.returncode != 0 and 'was not made by this checkout' in run.output
    assert standin.backend.machine_state(standin.machine('a')) == 'created'


def test_attach_command_passes_a_secrets_placeholder_never_its_value(standin):
    setup_agent(standin, secrets=[TEST_SECRET], network=TEST_SECRET_NETWORK)
    run = standin.doit('launch:a', env=standin.env(BOTTLE_TEST_SECRET='value-never-printed'))
    assert f'-e BOTTLE_TEST_SECRET={placeholder_of(standin, "a", "BOTTLE_TEST_SECRET")}' in run.stdout
    assert '--secret-env' not in run.stdout and 'value-never-printed' not in run.output
    assert 'setpriv --reuid agent' in run.stdout
