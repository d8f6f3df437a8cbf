"""The project: where manifests, templates, state and caches live, and the
pieces every task family shares (action wrapper, atomic writes)."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

import jinja2
from doit.exceptions import InvalidDodoFile, TaskFailed

from tasks.backends import BottleError
from tasks.manifest import Agent, ManifestError, load_agents

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
            return load_agents(self.agents_dir, self.root, self._has_template)
        except ManifestError as err:
            raise InvalidDodoFile(str(err)) from None

    def _has_template(self, name: str) -> bool:
        try:
            self.templates.get_template(name)
            return True
        except jinja2.TemplateNotFound:
            return False

    @property
    def label(self) -> str:
        """Tells this project's machines from another checkout's."""
        return hashlib.sha256(str(self.root).encode()).hexdigest()[:12]

    def doit_config(self) -> dict:
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


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644):
    """Readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, 'wb') as out:
            out.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: Path, data: dict):
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + '\n')


def action(func):
    """Report BottleErrors as task failures without a traceback."""
    @functools.wraps(func)
    def run(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except BottleError as err:
            return TaskFailed(str(err))
    return run
