"""load_agents: every agents/*.yaml read and checked against KEYS, merged with _defaults.yaml and the
declared defaults, checked across keys and against the file system, and made into Agents; every problem
in every manifest is collected and reported at once (ManifestError).

Apart because it alone knows the agents directory and how the layers merge.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import stat
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

from daemons.forward.connections import ENGINES
from tasks.manifest.agent import Agent, GuestUser, Recipe
from tasks.manifest.hosts import HostEntry, skill_hosts
from tasks.manifest.keys import KEY, KEYS, SECTIONS, TOP_LEVEL, Key
from tasks.manifest.kinds import EnvMap, Index, printable, show
from tasks.manifest.secrets import resolved
from tasks.manifest.names import (BACKEND_ENV, BACKENDS, DEBOOTSTRAP, DEFAULTS_FILE, ENGINE_BACKENDS, MACHINE_NAME,
                                  MACHINE_PREFIX, MANIFEST_SUFFIX, MAX_AGENT_NAME, PROJECT_KEY, TARBALL_SUFFIXES,
                                  default_project_name, is_local_base)
from tasks.manifest.yaml_file import Document, ManifestError, Problem, parse, read_text, regular_text_problem


def _read_document(path: Path, display: str, problems: list[Problem]) -> Document | None:
    """The file parsed, its keys indexed and checked against KEYS; None when it cannot be read."""
    doc = Document(path, display)
    text = read_text(path, display, problems, 'a manifest must be a regular YAML file')
    if text is None or not parse(text, doc, problems):
        return None
    if doc.data is None:
        doc.data = {}
        return doc
    if not isinstance(doc.data, dict):
        problems.append(Problem(display, doc.lines.get(()),
                                None, f'expected a mapping of keys such as prompt:, skills:, image:, '
                                      f'got {show(doc.data)}'))
        return None
    _check(doc, problems)
    return doc


def _check(doc: Document, problems: list[Problem]):
    """Every key against KEYS; valid values go to doc.values."""

    def unknown(path, choices):
        close = difflib.get_close_matches(str(path[-1])[:100], choices, n=1)
        hint = f'did you mean {close[0]!r}?' if close else f'valid keys here: {", ".join(choices)}'
        problems.append(doc.problem(path, f'unknown key; {hint}'))

    def leaf(key: Key, value, path):
        errors = list(key.kind.problems(value))
        for below, error in errors:
            problems.append(doc.problem(path + below, error))
        if errors:
            doc.invalid.add(key.path)
        else:
            doc.values[key.path] = value

    for name, value in doc.data.items():
        if name in KEY:
            leaf(KEY[name], value, (name,))
        elif name in SECTIONS:
            inner = [key.path.split('.', 1)[1] for key in KEYS if key.path.startswith(f'{name}.')]
            if not isinstance(value, dict):
                problems.append(doc.problem((name,), f'expected a mapping with keys {", ".join(inner)}, '
                                                     f'got {show(value)}'))
                doc.invalid.update(f'{name}.{k}' for k in inner)
                continue
            for sub, sub_value in value.items():
                if isinstance(sub, str) and f'{name}.{sub}' in KEY:
                    leaf(KEY[f'{name}.{sub}'], sub_value, (name, sub))
                else:
                    unknown((name, sub), inner)
        else:
            unknown((name,), TOP_LEVEL)


def load_agents(agents_dir: Path, root: Path, setup_problem: Callable[[Recipe], str | None],
                default_backend: Callable[[], str],
                engines: Callable[[str], Collection[str]] | None = None) -> dict[str, Agent]:
    """Read and validate every agents/*.yaml of the project at `root`; raise ManifestError listing
    all problems. Paths in problems are shown relative to `root`.

    `setup_problem(recipe)` says why the recipe's setup template cannot be used, or None.
    `default_backend()` picks the backend of agents whose manifests and environment name none;
    it is called at most once, and only when every manifest is valid but, perhaps, for its `engine`, which is
    checked against the backend it picked (it may raise BottleError).
    `engines(backend)` names the engines (podman's system connections, docker's contexts) the key `engine` may name;
    it is called
    once per backend, only for agents that name one (None: any name is taken)."""
    problems: list[Problem] = []

    def display(path: Path) -> str:
        try:
            return printable(str(path.relative_to(root)))
        except ValueError:
            return printable(str(path))

    try:
        entries = sorted(agents_dir.iterdir()) if agents_dir.is_dir() else []
    except OSError as err:
        raise ManifestError([Problem(display(agents_dir), None, None,
                                     f'cannot list the directory: {err.strerror}')]) from None
    defaults = None
    manifests = []
    for path in entries:
        name = path.name
        if name.startswith('.'):      # editors' lock and backup files, never agents
            continue
        if name == DEFAULTS_FILE:
            defaults = _read_document(path, display(path), problems)
        elif name.startswith('_') and name.endswith(MANIFEST_SUFFIX):
            problems.append(Problem(display(path), None, None,
                                    f'only {DEFAULTS_FILE} may start with "_" (agent names start with a letter '
                                    f'or digit); rename it to {DEFAULTS_FILE} if it holds shared defaults, or '
                                    'give the agent a name without the "_"'))
        elif name.endswith('.yml'):
            problems.append(Problem(display(path), None, None,
                                    f'manifests end in {MANIFEST_SUFFIX}; rename it to '
                                    f'{printable(name[:-4])}{MANIFEST_SUFFIX}'))
        elif name.endswith(MANIFEST_SUFFIX):
            manifests.append(path)
    if defaults is not None:
        _check_prompt_keys(defaults, problems)

    from_env = os.environ.get(BACKEND_ENV) or None
    if from_env and from_env not in BACKENDS:
        problems.append(Problem(f'{BACKEND_ENV}={printable(from_env)} in the environment', None, None,
                                f'not a backend; use one of {", ".join(BACKENDS)}'))

    drafts = []
    setup_checked: dict[Recipe, str | None] = {}
    for path in manifests:
        name = path.name[:-len(MANIFEST_SUFFIX)]
        name_problem = _agent_name_problem(name, display(path))
        if name_problem:
            problems.append(name_problem)
        doc = _read_document(path, display(path), problems)
        if doc is None:
            continue
        _check_prompt_keys(doc, problems)
        draft = _Draft(name, doc, defaults, display, from_env, default_project_name(root))
        found = list(draft.check())
        problems.extend(found)
        if found or draft.blocked or name_problem:
            continue
        # The setup does not depend on the backend, which may not be chosen yet.
        recipe = draft.recipe(draft.backend or BACKENDS[0])
        if recipe not in setup_checked:
            setup_checked[recipe] = setup_problem(recipe)
        if setup_checked[recipe]:
            problems.append(draft.report('image.setup', ('image', 'setup'), printable(setup_checked[recipe])))
        drafts.append(draft)
    if problems:
        raise ManifestError(list(dict.fromkeys(problems)))   # a _defaults.yaml problem once, not per agent

    detected = []

    def backend_of(draft: _Draft) -> str:
        if draft.backend:
            return draft.backend
        if not detected:
            detected.append(default_backend())
        return detected[0]

    known: dict[str, Collection[str]] = {}
    for draft in drafts:
        engine = draft.values['engine']
        if engine is None:
            continue
        where = backend_of(draft)
        if where not in ENGINE_BACKENDS:
            problems.append(draft.report('engine', ('engine',), _engine_on(where)))
        elif engines is not None:
            if where not in known:
                known[where] = engines(where)
            if engine not in known[where]:
                problems.append(draft.report('engine', ('engine',), _unknown_engine(where, engine, known[where])))
    if problems:
        raise ManifestError(list(dict.fromkeys(problems)))
    return {draft.name: draft.agent(backend_of(draft)) for draft in drafts}


def _engine_on(backend: str) -> str:
    return (f'engine names a podman system connection or a docker context, but this agent runs on {backend}; set '
            '`backend: podman` or `backend: docker` for an engine elsewhere, or remove engine to run the bottle on '
            'this host')


def _unknown_engine(backend: str, engine: str, names: Collection[str]) -> str:
    noun, add = ENGINES[backend].noun, ENGINES[backend].add
    near = difflib.get_close_matches(engine, list(names), n=1)
    have = f'{backend} knows {", ".join(sorted(names))}' if names else f'{backend} knows none'
    return (f'no {noun} is named {engine!r} ({have}{f"; did you mean {near[0]!r}?" if near else ""}); '
            f'add the worker with `{add.format(name=engine)}` (the README\'s Remote engines says how), or fix '
            'the name')


def _agent_name_problem(name: str, display: str) -> Problem | None:
    if MACHINE_NAME.fullmatch(name) and len(name) <= MAX_AGENT_NAME:
        return None
    fixed = re.sub(r'-+', '-', re.sub(r'[^A-Za-z0-9_-]', '-', name)).strip('-_')[:MAX_AGENT_NAME]
    fixed = re.sub(r'[-_]+$', '', fixed) or 'agent'
    return Problem(display, None, None,
                   f'the agent name comes from the file name and becomes part of the machine name '
                   f'{printable(MACHINE_PREFIX)}<project>-<name>: use only letters, digits, "-" and "_", start with a '
                   f'letter or digit, no "--", no trailing "-", at most {MAX_AGENT_NAME} characters; rename '
                   f'the file, e.g. to {fixed}{MANIFEST_SUFFIX}')


def _check_prompt_keys(doc: Document, problems: list[Problem]):
    if doc.has('prompt') and doc.has('prompt_file'):
        problems.append(doc.problem(('prompt_file',), 'give either prompt (inline text) or prompt_file, not both'))


class _Draft:
    """One agent's values, merged from its manifest, _defaults.yaml and the declared defaults."""

    def __init__(self, name: str, doc: Document, defaults: Document | None, display, from_env: str | None,
                 default_project: str):
        self.name, self.doc, self.display, self.default_project = name, doc, display, default_project
        self.base_dir = doc.path.parent
        self.values: dict[str, Any] = {}
        self.sources: dict[str, Document] = {}   # where each value was given
        self.wrong: set[str] = set()              # keys whose given value is wrong (already reported)
        own_prompt = doc.has('prompt') or doc.has('prompt_file')
        for key in KEYS:
            # An agent's own prompt or prompt_file replaces both of _defaults.yaml's.
            layers = [doc] if defaults is None or (own_prompt and key.path in ('prompt', 'prompt_file')) \
                else [defaults, doc]
            self.values[key.path] = self._merged(key, layers)
        # The agent's own key, then the environment (a choice for this run), then _defaults.yaml.
        own = doc.values['backend'] if doc.has('backend') and 'backend' not in doc.invalid else None
        self.backend = own or from_env or self.values['backend']
        self.skill_hosts: tuple[HostEntry, ...] = ()

    def _merged(self, key: Key, layers: list[Document]):
        if isinstance(key.kind, EnvMap):      # maps merge entry by entry
            given = [d for d in layers if d.has(key.path)]
        else:
            given = [d for d in layers if d.has(key.path)][-1:]
        if any(key.path in d.invalid for d in given):
            self.wrong.add(key.path)
            return key.default
        if given:
            self.sources[key.path] = given[-1]
        if isinstance(key.kind, EnvMap):
            return {name: value for d in given for name, value in d.values[key.path].items()}
        return given[0].values[key.path] if given else key.default

    @property
    def blocked(self) -> bool:
        return bool(self.wrong)

    def report(self, key: str, path: tuple, text: str) -> Problem:
        return self.sources.get(key, self.doc).problem(path, text)

    def check(self) -> Iterator[Problem]:
        """Checks across keys and against the file system, of the values that are valid."""
        values, wrong = self.values, self.wrong
        if self.doc.has(PROJECT_KEY):
            yield self.doc.problem((PROJECT_KEY,), f'the project name is the checkout\'s, shared by all its agents: '
                                                   f'move it to agents/{DEFAULTS_FILE}')
        prompt_file = KEY['prompt_file'].kind.convert(values['prompt_file'], self.base_dir)
        if prompt_file is not None:
            error = regular_text_problem(prompt_file)
            if error:
                yield self.report('prompt_file', ('prompt_file',),
                                  f'{self.display(prompt_file)} {error} fix the path (relative to the '
                                  'manifest\'s directory)')
        skills_dir = KEY['skills_dir'].kind.convert(values['skills_dir'], self.base_dir)
        for i, skill in enumerate(values['skills'] if not wrong & {'skills', 'skills_dir'} else ()):
            where = skills_dir / skill
            info = _stat(where)
            if isinstance(info, str) or not stat.S_ISDIR(info.st_mode):
                yield self.report('skills', ('skills', Index(i)),
                                  f'skill {skill!r} not found: no directory {self.display(where)}; create it '
                                  f'with a SKILL.md, or remove {skill!r} from skills')
                continue
            info = _stat(where / 'SKILL.md')
            if isinstance(info, str) or not stat.S_ISREG(info.st_mode):
                yield self.report('skills', ('skills', Index(i)),
                                  f'skill {skill!r} has no SKILL.md in {self.display(where)}; add one '
                                  '(Claude Code loads a skill from its SKILL.md)')
                continue
            problems: list[Problem] = []
            self.skill_hosts += skill_hosts(where / 'SKILL.md', self.display(where / 'SKILL.md'), problems)
            yield from problems
        base = values['image.base']
        if 'image.base' not in wrong and is_local_base(base) and not base.startswith(DEBOOTSTRAP):
            where = Path(os.path.abspath(self.base_dir / base))
            info = _stat(where)
            if isinstance(info, str) or not (stat.S_ISDIR(info.st_mode) or (
                    stat.S_ISREG(info.st_mode) and where.name.endswith(TARBALL_SUFFIXES))):
                yield self.report('image.base', ('image', 'base'),
                                  f'local base {self.display(where)} is neither a directory nor a tarball '
                                  f'({", ".join(TARBALL_SUFFIXES)}); fix the path (relative to the manifest\'s '
                                  'directory) or use an image name such as debian:bookworm-slim')
        if not wrong & {'secrets', 'env', 'network.allow_hosts', 'network.claude_code_hosts'}:
            yield from self._check_secrets()

    def _check_secrets(self) -> Iterator[Problem]:
        """No secret is also plain env, and each goes only to hosts the bottle may reach."""
        values = self.values
        allowed = (KEY['network.allow_hosts'].kind.convert(values['network.allow_hosts'], self.base_dir)
                   + KEY['network.claude_code_hosts'].kind.convert(values['network.claude_code_hosts'], self.base_dir)
                   + self.skill_hosts)
        env = KEY['env'].kind.convert(values['env'], self.base_dir)
        for i, secret in enumerate(resolved(KEY['secrets'].kind.convert(values['secrets'], self.base_dir), env)):
            at = ('secrets', Index(i))
            if secret.name in values['env']:
                yield self.report('secrets', at, f'{secret.name!r} is also set in env; a secret comes only from the '
                                                 'host environment at attach time, so remove it from env')
            for host in secret.hosts:
                if not any(entry.covers(host) for entry in allowed):
                    yield self.report('secrets', at, f'{secret.name} is bound to {host}, which the bottle may not '
                                                     f'reach; add {host} to network.allow_hosts, or bind the secret '
                                                     'to an allowed host')

    def _fields(self, backend: str) -> dict:
        """Agent attributes by KEYS' `attribute`, with the `recipe.` and `user.` ones grouped."""
        groups: dict[str, dict] = {'': {}, 'recipe': {}, 'user': {}}
        for key in KEYS:
            group, _, attribute = key.attribute.rpartition('.')
            groups[group][attribute] = key.kind.convert(self.values[key.path], self.base_dir)
        fields = groups['']
        fields['backend'] = backend
        fields['project'] = fields['project'] or self.default_project
        fields['git'] = tuple(repo if repo.push else dataclasses.replace(repo, push=(f'refs/heads/agent/{self.name}/*',))
                              for repo in fields['git'])
        fields['secrets'] = resolved(fields['secrets'], fields['env'])
        fields['user'] = GuestUser(**groups['user'])
        fields['recipe'] = Recipe(**groups['recipe'], user=fields['user'], backend=backend,
                                  source_dir=self.base_dir)
        if fields['prompt_file'] is not None:
            fields['prompt'] = ''
        return fields

    def recipe(self, backend: str) -> Recipe:
        return self._fields(backend)['recipe']

    def agent(self, backend: str) -> Agent:
        return Agent(name=self.name, manifest=self.doc.path, skill_hosts=self.skill_hosts, **self._fields(backend))


def _stat(path: Path) -> os.stat_result | str:
    """os.stat, or why it failed (a missing file, a symlink loop, a name too long)."""
    try:
        return os.stat(path)
    except (OSError, ValueError) as err:
        return getattr(err, 'strerror', None) or str(err)
