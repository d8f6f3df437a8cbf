"""Names and the rules they follow: the agents directory's files, machine names (smolvm's rules and the
checkout's part of them), the backends, and the kinds of image base.

Apart because tasks outside the manifest (image, bases, launch) and the tests use these alone, and every
other module of the package stands on them.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

DEFAULTS_FILE = '_defaults.yaml'
MANIFEST_SUFFIX = '.yaml'

# smolvm's machine-name rules (src/data/mod.rs validate_vm_name): letters,
# digits, '-' and '_', starting alphanumeric, no trailing '-', no '--'.
MACHINE_NAME = re.compile(r'[A-Za-z0-9](?:[A-Za-z0-9_]|-(?!-))*(?<!-)')
MACHINE_PREFIX = 'bottle-'
MAX_MACHINE_NAME = 128
MAX_PROJECT_NAME = 32
MAX_AGENT_NAME = MAX_MACHINE_NAME - len(MACHINE_PREFIX) - MAX_PROJECT_NAME - 1
PROJECT_KEY = 'project'      # the checkout's, so only in _defaults.yaml
BACKENDS = ('smolvm', 'docker', 'podman')
BACKEND_ENV = 'BOTTLE_BACKEND'     # the backend of agents whose manifests name none
ENGINE_BACKENDS = ('podman', 'docker')   # the backends whose engines may be elsewhere (key `engine`)
ENGINE_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]*')
MAX_ENGINE_NAME = 64
DEBOOTSTRAP = 'debootstrap:'
TARBALL_SUFFIXES = ('.tar', '.tar.gz', '.tgz')


def default_project_name(root: Path) -> str:
    """The checkout's part of machine names: its directory's name, readable, and a short hash of its
    path, so that two worktrees or clones of one project (even in directories of the same name)
    never share a machine."""
    readable = re.sub(r'[^a-z0-9]+', '-', root.name.lower()).strip('-')[:MAX_PROJECT_NAME - 7] or 'project'
    return f'{readable.rstrip("-")}-{hashlib.sha256(str(root).encode()).hexdigest()[:6]}'


def is_local_base(base: str) -> bool:
    """A root filesystem on this host (directory or tarball), as opposed to an OCI reference."""
    return base.startswith(('./', '../', '/')) or base.endswith(TARBALL_SUFFIXES)


def machine_name(project: str, agent: str) -> str:
    return f'{MACHINE_PREFIX}{project}-{agent}'
