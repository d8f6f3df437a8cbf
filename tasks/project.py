"""The project: where its manifests, templates and state live (Project), its agents validated before any
task runs, doit's configuration, and the wrapper every task's action has (@action: an error of IN_WORDS fails
the task with its message; anything else with one line, never a traceback).

Templates are rendered with jinja2 in actions. What the graph itself needs of them (an image key, the
trust script a config check compares) comes from `rendered()`, which remembers each rendering in
.bottle/renders.json under a digest of every template file, the template's name and the values: a run
where nothing changed imports no jinja2.
"""
from __future__ import annotations

import atexit
import functools
import hashlib
import json
import sys
from pathlib import Path

from doit.exceptions import InvalidDodoFile, TaskFailed

from daemons import shown
from daemons.atomic import write_atomic
from tasks import setup_template
from tasks.backends.detect import default_backend
from daemons.forward.connections import EngineError, connections
from tasks.errors import IN_WORDS, BottleError
from tasks.manifest import Agent, ManifestError, Recipe, default_project_name, load_agents

BUILTIN_TEMPLATES = Path(__file__).resolve().parent.parent / 'templates'
STATE_DIR = '.bottle'
RENDERS_KEPT = 512          # renderings remembered in renders.json, the newest


class Project:
    def __init__(self, root: Path, *, remember_renders: bool = True):
        """`remember_renders`: write what `rendered()` rendered into .bottle/renders.json when this process
        ends (a reader from outside, such as the tests' harness, leaves it alone)."""
        self.root = Path(root).resolve()
        self.remember_renders = remember_renders
        self.agents_dir = self.root / 'agents'
        self.state_dir = self.root / STATE_DIR
        self.template_dirs = [self.root / 'templates']
        if BUILTIN_TEMPLATES != self.template_dirs[0]:
            self.template_dirs.append(BUILTIN_TEMPLATES)
        self._unsaved = False

    @functools.cached_property
    def templates(self):
        import jinja2  # only where a template is really rendered or checked
        return jinja2.Environment(
            loader=jinja2.FileSystemLoader([str(p) for p in self.template_dirs]),
            undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)

    @functools.cached_property
    def agents(self) -> dict[str, Agent]:
        """Every agent manifest, validated; all problems at once, before any task runs."""
        try:
            return load_agents(self.agents_dir, self.root, self.setup_template_problem, default_backend,
                               lambda backend: connections(backend).keys())
        except (ManifestError, BottleError, EngineError) as err:   # no backend works here; no engine listing
            raise InvalidDodoFile(str(err)) from None

    def setup_template_problem(self, recipe: Recipe) -> str | None:
        """Why the recipe's setup template cannot be rendered, or None: it is missing, does not parse,
        uses a variable the setup does not provide (in any branch, or in a template it includes), or
        fails to render with this recipe's values. Remembered like `rendered()`."""
        key = self._render_key('problem', recipe.setup, {**setup_template.values(recipe, key=''),
                                                          '(provided)': sorted(setup_template.VARIABLES)})
        if key not in self._renders:
            self._remember(key, {'problem': setup_template.problem(self.templates, recipe)})
        return self._renders[key]['problem']

    @property
    def name(self) -> str:
        """This checkout's part of machine names (`project` in _defaults.yaml, which all agents share)."""
        return next((agent.project for agent in self.agents.values()), None) or default_project_name(self.root)

    @property
    def label(self) -> str:
        """Tells this project's machines from another checkout's."""
        return hashlib.sha256(str(self.root).encode()).hexdigest()[:12]

    def doit_config(self) -> dict:
        sys.excepthook = _interrupted
        self.state_dir.mkdir(exist_ok=True)
        return {
            'dep_file': str(self.state_dir / 'doit.sqlite'),
            'backend': 'sqlite3',          # safe with parallel runs; dbm files are not
            'par_type': 'thread',          # actions are CLI calls; threads share the machine probe
            'default_tasks': ['provision'],
        }

    def daemon_dir(self, name: str) -> Path:
        """The state of one of the project's daemons: `egress` (the proxy), `gate`, `supervise`."""
        return self.state_dir / name

    def agent_dir(self, agent: str) -> Path:
        return self.state_dir / 'agents' / agent

    def image_dir(self, key: str) -> Path:
        return self.state_dir / 'images' / key

    def template_file(self, name: str) -> Path:
        """Where the template is: the project's templates/ first, then the built-in ones."""
        if '..' not in name.split('/'):
            for directory in self.template_dirs:
                if (directory / name).is_file():
                    return directory / name
        raise InvalidDodoFile(f'template {name!r} not found in {self.root / "templates"} '
                              f'or {BUILTIN_TEMPLATES}')

    def render(self, name: str, **values) -> str:
        return self.templates.get_template(name).render(**values)

    def rendered(self, name: str, **values) -> str:
        """`render(name, **values)`, remembered: for what the graph computes on every run. Values are told
        apart by their JSON, or else their repr (a frozen dataclass's names all its fields)."""
        key = self._render_key('text', name, values)
        if key not in self._renders:
            self._remember(key, {'text': self.render(name, **values)})
        return self._renders[key]['text']

    @functools.cached_property
    def _templates_digest(self) -> str:
        """Every template file's name and content: a changed or added template is a new rendering."""
        digest = hashlib.sha256()
        for directory in self.template_dirs:
            for path in sorted(directory.rglob('*')) if directory.is_dir() else ():
                if path.is_file():
                    digest.update(f'{path.relative_to(directory)}\0'.encode() + path.read_bytes() + b'\0')
            digest.update(b'\1')
        return digest.hexdigest()

    def _render_key(self, kind: str, name: str, values: dict) -> str:
        text = json.dumps([kind, name, values], sort_keys=True, default=repr)
        return hashlib.sha256(f'{self._templates_digest}\0{text}'.encode()).hexdigest()

    @functools.cached_property
    def _renders(self) -> dict:
        try:
            renders = json.loads((self.state_dir / 'renders.json').read_text())
            return renders if isinstance(renders, dict) else {}
        except (OSError, ValueError):
            return {}

    def _remember(self, key: str, entry: dict):
        """Kept in memory now, written once when this process ends (0600: prompts pass through here)."""
        if self.remember_renders and not self._unsaved:
            self._unsaved = True
            atexit.register(self._save_renders)
        self._renders[key] = entry

    def _save_renders(self):
        kept = dict(list(self._renders.items())[-RENDERS_KEPT:])
        try:
            write_atomic(self.state_dir / 'renders.json', json.dumps(kept), mode=0o600)
        except OSError:
            pass        # a memo only: the next run renders again


def write_json(path: Path, data: dict):
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + '\n')


def action(func):
    """Report any error of a task's action as the task's failure, in words, without a
    traceback: doit then names the task and keeps no state for it, so the next run redoes it. An error may
    quote what a guest wrote (a ref name, the upstream's words): it is shown line by line through
    daemons/shown.py."""
    @functools.wraps(func)
    def run(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except IN_WORDS as err:
            return TaskFailed(_said(str(err)))
        except Exception as err:     # a bug of ours or an unforeseen failure: still one readable line
            return TaskFailed(_said(f'unexpected {type(err).__name__}: {err}. Nothing was recorded as done; '
                                    'run the same command again, and report it if it persists.'))
    return run


def _said(message: str) -> str:
    return '\n'.join(shown.lines(message, 4000))


def _interrupted(kind, value, tb, previous=sys.excepthook):
    """Ctrl-C: one line. doit has already saved the state of every finished task (its
    runner closes the database on the way out), so the next run does only the rest."""
    if issubclass(kind, KeyboardInterrupt):
        print('\ninterrupted: the tasks that finished are recorded; run the same command again to do '
              'the rest', file=sys.stderr)
    else:
        previous(kind, value, tb)
