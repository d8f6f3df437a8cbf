"""`doit status`: every agent at a glance, from one backend probe and doit's own up-to-date data."""
from __future__ import annotations

from tests.scenario import setup_agent


def test_status_shows_a_stale_and_an_up_to_date_agent_with_one_probe(standin):
    standin.supervise()
    setup_agent(standin, 'fresh')
    setup_agent(standin, 'stale')
    standin.doit('provision')
    setup_agent(standin, 'stale', prompt='A new prompt.')
    # a refusal in stale's log, as the proxy writes it
    with open(standin.root / '.bottle/agents/stale/egress.log', 'a') as log:
        log.write('{"time": "2026-11-27T21:00:00Z", "bottle": "stale", "method": "GET", "host": "example.com", '
                  '"path": "/x", "allowed": false, "reason": "example.com is not an allowed host"}\n')
        # and one whose path the agent made of raw bytes and a terminal escape (the proxy logs it as it came)
        log.write('{"time": "2026-11-27T21:00:01Z", "bottle": "stale", "method": "GET", "host": "example.com", '
                  '"path": "/\\udcc0\\u001b[2J", "allowed": false, "reason": "not allowed"}\n')

    run = standin.doit('status')
    assert run.kinds == {'probe': 1}, run.calls
    out = run.stdout
    fresh, stale = out.split('\nfresh: ')[1].split('\nstale: ')
    assert fresh.startswith(f'{standin.machine("fresh")} on smolvm, running; image ') and 'egress door open' in fresh
    assert 'supervisor answering, 0 request(s) waiting (doit supervise)' in fresh
    assert 'next launch: nothing to do but attach' in fresh
    assert 'next launch runs:' in stale
    assert '    prompt:stale: config_changed(' in stale          # doit's own reason
    assert '    provision_prompt:stale: prompt.md is remade by prompt:stale' in stale
    assert 'provision_skill' not in stale and 'machine:stale' not in stale
    assert 'blocked: 2026-11-27T21:00:00Z GET example.com/x: example.com is not an allowed host' in stale
    assert 'blocked: 2026-11-27T21:00:01Z GET example.com/\\xc0\\x1b[2J: not allowed' in stale      # escaped, never raw
    # status changed nothing: the stale agent still needs exactly its prompt
    assert standin.doit('launch:stale').executed == {'prompt:stale', 'provision_prompt:stale', 'launch:stale'}
