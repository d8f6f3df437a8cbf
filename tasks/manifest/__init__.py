"""Agent manifests: `agents/<name>.yaml`, validated before any task runs.

Every manifest key is declared once, in KEYS (type, default, description, the Agent attribute it
becomes); validation, defaults, the Agent, the README's reference table and the JSON Schema in
schema/ all come from there. Every problem in every manifest is collected and reported at once,
each naming the file, the line (where there is one), the key and the fix.

Manifests are untrusted input that must never hang or crash the tool: only regular files of
bounded size are read, YAML is loaded with bounded nesting and alias expansion, and every value
is checked before it is used. Relative paths in a manifest are relative to the directory that
holds it.

    python -m tasks.manifest --reference   the README's reference table
    python -m tasks.manifest --schema      the JSON Schema (committed as schema/agent.schema.json)

The modules, each standing only on those above it:

    names.py      file names, machine names, backends, kinds of image base
    kinds.py      Kind and the value kinds; how a problem message shows a value
    yaml_file.py  bounded, line-numbered reading of one untrusted file; Problem, ManifestError
    hosts.py      HostEntry, the host lists, CLAUDE_CODE_HOSTS, the hosts a skill declares
    git.py        GitRepo and the repository list
    secrets.py    Secret, the secret list, the default bindings
    keys.py       KEYS, the one declaration
    agent.py      Agent, Recipe, GuestUser: what load_agents returns
    load.py       load_agents: reading, checking and merging with _defaults.yaml
    reference.py  the README's table and the JSON Schema, from KEYS (only for __main__.py)

Other modules import from here, the package, what this lists in __all__.
"""
from tasks.manifest.agent import Agent, GuestUser, Recipe
from tasks.manifest.git import GitRepo
from tasks.manifest.hosts import HostEntry
from tasks.manifest.keys import KEYS, SECTIONS
from tasks.manifest.load import load_agents
from tasks.manifest.names import (BACKEND_ENV, DEBOOTSTRAP, MACHINE_PREFIX, default_project_name, is_local_base,
                                  machine_name)
from tasks.manifest.secrets import Secret
from tasks.manifest.yaml_file import ManifestError, Problem

__all__ = ['Agent', 'GuestUser', 'Recipe', 'GitRepo', 'HostEntry', 'Secret', 'KEYS', 'SECTIONS', 'load_agents', 'BACKEND_ENV',
           'DEBOOTSTRAP', 'MACHINE_PREFIX', 'default_project_name', 'is_local_base', 'machine_name', 'ManifestError',
           'Problem']
