"""The layout holds the design: no import circle among the project's modules and no import from daemons/ up
into tasks/ (every import read with `ast`, those inside functions included; an import names the deepest
module it reaches, so a package's __init__ that re-exports its modules is not a circle unless one of them
imports the package back); no module of tasks/ or daemons/ over 700 lines;
one consistent line per task family in `doit list`; the README's Layout names every module."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ('tasks', 'daemons')
MAX_LINES = 700

pytestmark = pytest.mark.fast


def project_modules(root: Path = REPO) -> dict[str, Path]:
    """Every module of the project by its dotted name (a package by its own name), and dodo."""
    found = {'dodo': root / 'dodo.py'}
    for package in PACKAGES:
        for path in sorted((root / package).rglob('*.py')):
            parts = list(path.relative_to(root).with_suffix('').parts)
            if parts[-1] == '__init__':
                parts.pop()
            found['.'.join(parts)] = path
    return found


def imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """For each module, the project's modules it imports anywhere in it (functions included)."""
    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition('.')[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f'{node.module}.{alias.name}' for alias in node.names]
            else:
                continue
            found.update(target for target in map(resolve, names) if target)
        found.discard(module)
        graph[module] = found
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def upward(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    return {module: sorted(t for t in targets if t == 'tasks' or t.startswith('tasks.') or t == 'dodo')
            for module, targets in graph.items()
            if module.startswith('daemons') and any(t == 'tasks' or t.startswith('tasks.') or t == 'dodo'
                                                    for t in targets)}


def test_no_import_circle_and_nothing_in_daemons_imports_tasks():
    graph = imports(project_modules())
    assert circles(graph) == [], 'modules that import each other, directly or around a circle'
    assert upward(graph) == {}, 'daemons/ is the floor below tasks/: it never imports it'


def test_the_check_finds_a_circle_and_an_upward_import(tmp_path):
    """The check itself, on a copy of the layout with one import added at each place (inside a function)."""
    for package in PACKAGES:
        for path in (REPO / package).rglob('*.py'):
            copy = tmp_path / path.relative_to(REPO)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(path.read_text())
    (tmp_path / 'dodo.py').write_text((REPO / 'dodo.py').read_text())
    (tmp_path / 'daemons' / 'atomic.py').write_text(
        (REPO / 'daemons' / 'atomic.py').read_text() + '\n\ndef later():\n    from tasks.project import Project\n')
    graph = imports(project_modules(tmp_path))
    assert 'tasks.project' in upward(graph)['daemons.atomic']
    assert any({'daemons.atomic', 'tasks.project'} <= set(circle) for circle in circles(graph))


def test_no_module_of_tasks_or_daemons_is_over_700_lines():
    long = {name: length for name, path in project_modules().items()
            if name != 'dodo' and (length := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f'split these by concern (at most {MAX_LINES} lines a module)'


def test_doit_list_shows_one_sentence_per_task_family(standin):
    standin.agent('zeta', prompt='hi', git=[{'url': 'https://example.org/acme/app.git'}])
    listed = standin.doit('list').stdout.splitlines()
    families = dict(line.split(None, 1) for line in listed)
    # every family dodo.py creates, but the human's commands, which name themselves (supervise, held, ...)
    expected = set(re.findall(r'^def task_(\w+)\(', (REPO / 'dodo.py').read_text(), re.M)) - {'human_side'}
    assert expected <= set(families), listed
    for family, doc in families.items():
        assert re.fullmatch(r'[A-Z][^\n]*\.', doc), f'{family}: {doc!r} is not one sentence'
        assert str(standin.root) not in doc and 'zeta' not in doc, f'{family}: {doc!r} names a project or an agent'


def test_the_readme_layout_names_every_module():
    section = (REPO / 'README.md').read_text().split('\n## Layout\n', 1)[1].split('\n## ', 1)[0]
    unnamed = [name for name, path in project_modules().items()
               if path.name != '__init__.py' and path.name not in section and path.stem not in section]
    assert unnamed == [], 'the README\'s Layout names each module of tasks/ and daemons/'


def test_python_m_tasks_manifest_still_prints_the_reference():
    proc = subprocess.run([sys.executable, '-m', 'tasks.manifest', '--reference'], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0 and proc.stdout.startswith('| key |'), proc.stderr
