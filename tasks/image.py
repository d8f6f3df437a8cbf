"""Agent images, and the Claude Code package they install.

claude_code:<version>  the native Claude Code binary package of @anthropic-ai/claude-code,
                       fetched once on the host with `npm pack` into the user cache.
image:<key>            build machine from the recipe's base, setup rendered from
                       templates/, stopped, packed. The key hashes everything that goes
                       in, so agents with the same recipe share one image and an unchanged
                       recipe is never packed again. The small image.json is the doit
                       target; the large artifact is only checked for presence.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from daemons.hostprograms import require
from daemons.lifecycle import locked
from tasks import bases, setup_template
from tasks.backends.pick import backend
from tasks.backends.protocol import ImageBuild
from tasks.cache import cache_dir
from tasks.checks import FileExists
from tasks.errors import BottleError
from tasks.manifest import MACHINE_PREFIX, Recipe
from tasks.progress import progress
from tasks.project import Project, action, write_json

NPM_PLATFORMS = {'x86_64': 'linux-x64', 'amd64': 'linux-x64', 'aarch64': 'linux-arm64', 'arm64': 'linux-arm64'}


def npm_platform() -> str:
    machine = os.uname().machine.lower()
    if machine not in NPM_PLATFORMS:
        raise BottleError(f'Claude Code has no Linux build for this host architecture ({machine})')
    return NPM_PLATFORMS[machine]


def claude_code_package(version: str) -> str:
    return f'@anthropic-ai/claude-code-{npm_platform()}@{version}'


def claude_code_archive(version: str) -> Path:
    return cache_dir() / 'claude-code' / f'anthropic-ai-claude-code-{npm_platform()}-{version}.tgz'


@dataclass(frozen=True)
class Image:
    key: str
    recipe: Recipe
    dir: Path
    build_machine: str     # the checkout's own: two checkouts may build one recipe at once

    @property
    def manifest(self) -> Path:
        return self.dir / 'image.json'

    @property
    def artifact(self) -> Path:
        return self.dir / backend(self.recipe.backend).artifact_name


@functools.cache
def image_of(project: Project, recipe: Recipe) -> Image:
    # The key covers the rendered setup (with the key itself left blank), the base (for a built
    # one, what goes into it) and the backend.
    setup = project.rendered(recipe.setup, **setup_template.values(recipe, key=''))
    ingredients = {'backend': recipe.backend, 'base': bases.resolve(recipe).identity, 'setup': setup,
                   'platform': npm_platform()}
    key = hashlib.sha256(json.dumps(ingredients, sort_keys=True).encode()).hexdigest()[:16]
    return Image(key=key, recipe=recipe, dir=project.image_dir(key),
                 build_machine=f'{MACHINE_PREFIX}build-{project.name}-{key}')


def claude_code_tasks(project: Project):
    for version in sorted({a.recipe.claude_code for a in project.agents.values()}):
        archive = claude_code_archive(version)
        yield {
            'name': version,
            'doc': f'fetch {claude_code_package(version)} into {archive.parent}',
            'actions': [(fetch_claude_code, [version])],
            'targets': [archive],
            'uptodate': [FileExists(archive, 'Claude Code package')],
        }


def tasks(project: Project):
    users: dict[Image, list[str]] = {}
    for agent in project.agents.values():
        users.setdefault(image_of(project, agent.recipe), []).append(agent.name)
    for image, agents in users.items():
        recipe = image.recipe
        source = bases.resolve(recipe)
        yield {
            'name': image.key,
            'doc': f'image for {", ".join(agents)}: {recipe.base} + {recipe.setup}, '
                   f'Claude Code {recipe.claude_code}, on {recipe.backend}',
            'actions': [(build, [project, image])],
            'file_dep': [source.file] if source.file else [],
            # Fetched only when the image is built: a cached image needs neither.
            'setup': [f'claude_code:{recipe.claude_code}'] + ([source.task] if source.task else []),
            'targets': [image.manifest],
            'uptodate': [FileExists(image.artifact, 'packed image')],
            'clean': [(remove, [image])],
        }


@action
def fetch_claude_code(version: str):
    archive = claude_code_archive(version)
    npm = require('npm')
    archive.parent.mkdir(parents=True, exist_ok=True)
    with locked(archive.parent / f'.{archive.name}.lock'):      # another run (a checkout beside) may fetch it now
        if not archive.is_file():
            _fetch(npm, version, archive)


def _fetch(npm: str, version: str, archive: Path):
    progress(f'fetching Claude Code {version} with npm pack (once per version)')
    with tempfile.TemporaryDirectory(dir=archive.parent, prefix='.fetch-') as tmp:
        proc = subprocess.run([npm, 'pack', claude_code_package(version), '--pack-destination', tmp],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        packed = Path(tmp) / (proc.stdout.strip().splitlines() or [''])[-1]
        if proc.returncode != 0 or not packed.is_file():
            raise BottleError(f'`npm pack {claude_code_package(version)}` failed (exit {proc.returncode}); '
                              f'is the version right and the npm registry reachable?\n{proc.stderr.strip()}')
        os.replace(packed, archive)


@action
def build(project: Project, image: Image):
    recipe = image.recipe
    image.dir.mkdir(parents=True, exist_ok=True)
    for leftover in image.dir.glob('.partial-*'):     # an interrupted build: never reused
        shutil.rmtree(leftover, ignore_errors=True)
    partial = Path(tempfile.mkdtemp(dir=image.dir, prefix='.partial-'))
    progress(f'building image {image.key} on {recipe.backend} from {recipe.base}')
    try:
        backend(recipe.backend).build_image(ImageBuild(
            key=image.key, machine=image.build_machine,
            base=bases.resolve(recipe).reference,
            setup=project.render(recipe.setup, **setup_template.values(recipe, image.key)),
            files={setup_template.GUEST_CLAUDE_ARCHIVE: claude_code_archive(recipe.claude_code)},
            artifact=partial / image.artifact.name))
        os.replace(partial / image.artifact.name, image.artifact)
        write_json(image.manifest, {
            'key': image.key, 'backend': recipe.backend, 'base': recipe.base, 'setup': recipe.setup,
            'claude_code': recipe.claude_code, 'user': recipe.user.name,
            'artifact': image.artifact.name, 'bytes': image.artifact.stat().st_size})
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def remove(image: Image):
    shutil.rmtree(image.dir, ignore_errors=True)
