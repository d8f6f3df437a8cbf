"""The project: where manifests, templates, state and caches live, and the
pieces every task family shares (action wrapper, atomic writes)."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from pathlib import Path

import jinja2
import jinja2.meta
from doit.exceptions import InvalidDodoFile, TaskFailed

from tasks.atomic import write_atomic
from tasks.backends import BottleError
from tasks.backends.detect import default_backend
from tasks.manifest import Agent, ManifestError, Recipe, default_project_name, load_agents

BUILTIN_TEMPLATES = Path(__file__).resolve().parent.parent / 'templates'
STATE_DIR = '.bottle'


class Project:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.agents_dir = self.root / 'agents'
        self.state_dir = self.root / STATE_DIR
        search = [self.root / 'templates']
        if BUILTIN_TEMPLATES != search[0]:
            search.append(BUILTIN_TEMPLATES)
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader([str(p) for p in search]),
            undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)

    @functools.cached_property
    def agents(self) -> dict[str, Agent]:
        """Every agent manifest, validated; all problems at once, before any task runs."""
        try:
            return load_agents(self.agents_dir, self.root, self.setup_template_problem, default_backend)
        except (ManifestError, BottleError) as err:     # BottleError: no backend works here
            raise InvalidDodoFile(str(err)) from None

    def setup_template_problem(self, recipe: Recipe) -> str | None:
        """Why the recipe's setup template cannot be rendered, or None: it is missing, does not parse,
        uses a variable the setup does not provide (in any branch, or in a template it includes), or
        fails to render with this recipe's values."""
        from tasks.image import SETUP_VARIABLES, setup_values    # tasks.image imports this module
        known = SETUP_VARIABLES | set(self.templates.globals)
        pending, seen = [recipe.setup], set()
        while pending:
            name = pending.pop()
            seen.add(name)
            try:
                source, filename, _ = self.templates.loader.get_source(self.templates, name)
                tree = self.templates.parse(source, name, filename)
            except jinja2.TemplateNotFound:
                return (f'template {name!r} not found in templates/; add it there, or leave the key out for '
                        'the built-in image-setup.sh.j2')
            except jinja2.TemplateSyntaxError as err:
                return f'template {name!r} line {err.lineno}: {err.message}; fix the template'
            except (OSError, UnicodeDecodeError) as err:
                return f'template {name!r} cannot be read: {err}'
            unknown = jinja2.meta.find_undeclared_variables(tree) - known
            if unknown:
                line = min(n.lineno for n in tree.find_all(jinja2.nodes.Name) if n.name in unknown)
                return (f'template {name!r} line {line} uses {", ".join(sorted(unknown))}, which the setup does '
                        f'not provide; it provides {", ".join(sorted(SETUP_VARIABLES))}')
            pending += [t for t in jinja2.meta.find_referenced_templates(tree) if t and t not in seen]
        try:
            self.templates.get_template(recipe.setup).render(**setup_values(recipe, key=''))
        except Exception as err:     # the template is the project's own code: anything can go wrong in it
            return f'template {recipe.setup!r} fails to render with this recipe: {type(err).__name__}: {err}'
        return None

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

    def agent_dir(self, agent: str) -> Path:
        return self.state_dir / 'agents' / agent

    def image_dir(self, key: str) -> Path:
        return self.state_dir / 'images' / key

    def template_file(self, name: str) -> Path:
        try:
            return Path(self.templates.get_template(name).filename)
        except jinja2.TemplateNotFound:
            raise InvalidDodoFile(f'template {name!r} not found in {self.root / "templates"} '
                                  f'or {BUILTIN_TEMPLATES}') from None

    def render(self, name: str, **values) -> str:
        return self.templates.get_template(name).render(**values)


def cache_dir() -> Path:
    """Per-user download cache, shared by all projects."""
    base = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
    return Path(base) / 'claude-bottle'


def write_json(path: Path, data: dict):
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + '\n')


def action(func):
    """Report any error of a task's action as the task's failure, in words, without a
    traceback: doit then names the task and keeps no state for it, so the next run redoes it."""
    @functools.wraps(func)
    def run(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except BottleError as err:
            return TaskFailed(str(err))
        except Exception as err:     # a bug of ours or an unforeseen failure: still one readable line
            return TaskFailed(f'unexpected {type(err).__name__}: {err}. Nothing was recorded as done; '
                              'run the same command again, and report it if it persists.')
    return run


def _interrupted(kind, value, tb, previous=sys.excepthook):
    """Ctrl-C: one line. doit has already saved the state of every finished task (its
    runner closes the database on the way out), so the next run does only the rest."""
    if issubclass(kind, KeyboardInterrupt):
        print('\ninterrupted: the tasks that finished are recorded; run the same command again to do '
              'the rest', file=sys.stderr)
    else:
        previous(kind, value, tb)
