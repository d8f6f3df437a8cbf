"""`doit prune`: what no current agent or recipe uses goes, what they use stays, on every backend."""
from __future__ import annotations

import uuid

from tests.scenario import setup_agent


def image_keys(bottles) -> set[str]:
    return {p.name for p in (bottles.root / '.bottle/images').iterdir()}


def engine_has(bottles, key: str) -> bool:
    engine = bottles.backend.engine
    return engine('image', 'inspect', f'localhost/claude-bottle-image:{key}', check=False).returncode == 0


def test_prune_removes_the_old_image_and_forgotten_agents_keeps_the_rest_and_then_finds_nothing(bottles):
    # Recipes of this test alone: an engine image another test's machine uses is kept, rightly.
    recipe = uuid.uuid4().hex
    setup_agent(bottles, 'a', image={'run': [f'echo {recipe} > /etc/recipe-version']})
    setup_agent(bottles, 'gone', image={'run': [f'echo {recipe} > /etc/recipe-version']})
    bottles.doit('provision')
    old, = image_keys(bottles)
    setup_agent(bottles, 'a', image={'run': [f'echo {recipe}-v2 > /etc/recipe-version']})
    (bottles.root / 'agents/gone.yaml').unlink()
    bottles.doit('provision')
    current, = image_keys(bottles) - {old}
    gone_state = bottles.root / '.bottle/agents/gone'
    approved = bottles.root / '.bottle/supervise/approved'
    approved.mkdir(parents=True, exist_ok=True)
    for agent in ('a', 'gone'):         # as the supervisor writes them when the human approves
        (approved / f'{agent}.json').write_text('["docs.example.org"]\n')
    assert gone_state.is_dir() and bottles.backend.machine_state(bottles.machine('gone')) == 'running'

    run = bottles.doit('prune')
    assert f'prune: removed image {old} (' in run.stdout, run.stdout
    assert f'prune: removed machine {bottles.machine("gone")} on ' in run.stdout
    assert 'prune: removed state of agent gone' in run.stdout and ' freed' in run.stdout
    assert f'prune: removed hosts approved for agent gone ({approved / "gone.json"})' in run.stdout
    assert not (approved / 'gone.json').exists() and (approved / 'a.json').exists()
    assert image_keys(bottles) == {current}
    assert bottles.backend.machine_state(bottles.machine('gone')) is None and not gone_state.exists()
    assert 'gone' not in (bottles.root / '.bottle/egress/doors.json').read_text()
    if hasattr(bottles.backend, 'engine'):
        assert f'prune: removed image {old} from {bottles.backend.name}' in run.stdout
        assert not engine_has(bottles, old) and engine_has(bottles, current)

    assert bottles.doit('prune').stdout.strip().splitlines()[-1] == 'prune: nothing to remove'
    again = bottles.doit('launch:a')                   # what the current agent uses is all there
    assert again.kinds == {'probe': 1}, again.calls
