"""KEYS, the one declaration of every manifest key (type, default, description, the Agent attribute it
becomes), from which validation, defaults, the Agent, the README's table and the JSON Schema all come;
and the sections that group dotted keys.

Apart so that what is made from the declaration (load.py, reference.py) stands on it, and the kinds it
names (kinds.py, hosts.py, git.py) stand below it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.manifest.git import GitRepoList
from tasks.manifest.hosts import CLAUDE_CODE_HOSTS, HOSTS, NETWORK, AddressMap
from tasks.manifest.kinds import (MAX_NAME_BYTES, Boolean, Choice, EnvMap, GuestPath, HostPath, ImageBase, Integer,
                                  Kind, ListOf, TemplateName, Text, UserName)
from tasks.manifest.secrets import ENV_NAME, SecretList
from tasks.manifest.names import (BACKEND_ENV, BACKENDS, ENGINE_NAME, MACHINE_NAME, MAX_ENGINE_NAME, MAX_PROJECT_NAME,
                                  PROJECT_KEY)


@dataclass(frozen=True)
class Key:
    """One manifest key: its dotted path, type, default, meaning, and the Agent attribute it becomes
    (`recipe.x` and `user.x` go to the Recipe and the GuestUser)."""
    path: str
    kind: Kind
    default: Any
    description: str
    attribute: str
    default_text: str | None = None    # the README's default column, when the value alone says too little


SKILL_NAME = Text('name', 'a skill directory name (letters, digits, ".", "_" and "-")',
                  r'[A-Za-z0-9][A-Za-z0-9._-]*', max_length=MAX_NAME_BYTES)


MAX_SUPERVISE_WAIT = 3600     # Claude Code's per-server timeout is set past it; "pending" comes long before

KEYS: tuple[Key, ...] = (
    Key('prompt', Text('text', 'text'), '',
        'the system prompt; Claude starts with `--append-system-prompt-file` only when it is non-empty', 'prompt'),
    Key('prompt_file', HostPath('a path to the prompt file'), None,
        'the prompt from a file instead (not both in one file; an agent\'s own key wins over `_defaults.yaml`)',
        'prompt_file'),
    Key('skills', ListOf(SKILL_NAME, 'list of skill names', unique=True), [],
        'each is a directory `<skills_dir>/<name>/` with a `SKILL.md`', 'skills'),
    Key('skills_dir', HostPath('a path to the skills directory'), 'skills',
        'where skills live (so `agents/skills/`)', 'skills_dir'),
    Key('image.base', ImageBase(), 'debian:bookworm-slim',
        'an OCI reference; a local root filesystem (`./rootfs/`, `./rootfs.tar`, `.tar.gz`, `.tgz`); or '
        '`debootstrap:<suite>` (built locally, no registry)', 'recipe.base'),
    Key('image.setup', TemplateName(), 'image-setup.sh.j2',
        'the setup script template, looked up in `templates/`; it may use only the variables the setup '
        'provides. The default one installs git, curl, socat and ca-certificates with apt only when the '
        'base lacks them, Claude Code, and the agent user', 'recipe.setup'),
    Key('image.claude_code', Text('version', 'a Claude Code version such as 2.1.328',
                                  r'[0-9][0-9A-Za-z.+-]*', max_length=128), '2.1.328',
        'the Claude Code release installed in the image', 'recipe.claude_code'),
    Key('image.packages', ListOf(Text('name', 'a Debian package name', r'[a-z0-9][a-z0-9.+-]+', max_length=128),
                                 'list of Debian package names'), [],
        'extra Debian packages (installed with apt, so they need network at build time)', 'recipe.packages'),
    Key('image.run', ListOf(Text('text', 'a shell line'), 'list of shell lines'), [],
        'extra setup steps, run as root after the rest', 'recipe.run'),
    Key('resources.cpus', Integer(1, 64), 2, 'virtual CPUs', 'cpus'),
    Key('resources.memory', Integer(256, 1 << 20, 'MiB'), 2048, 'memory', 'memory_mib'),
    Key('resources.disk', Integer(1, 1 << 14, 'GiB'), 20,
        'what the guest may write, all paths together (its home, `/tmp`, `/var/tmp`, `/etc`, `/root`); past it '
        'a write fails in the guest with "No space left on device". On docker and podman the rest of its root '
        'is read-only; where the host cannot bound it (not root) launch and `doit status` say so. A change '
        'makes the machine again, and what the guest wrote goes with it', 'disk_gib'),
    Key('network.allow_hosts', HOSTS, [],
        'what the bottle may reach: `api.github.com` (that name), `*.github.com` (that domain and every name '
        'under it), or `{host: api.github.com, methods: [GET, HEAD], paths: [/repos/acme/]}` (only those '
        'methods and path prefixes; a path a server could read otherwise, such as `/repos/acme/..;/x` or `%2f`, '
        'never matches, and an override of the method is refused: see the fence); skills add theirs '
        '(`allow_hosts:` in their `SKILL.md` front matter). '
        'Enforced by the project\'s egress proxy, the bottle\'s only way out; a change applies at the next '
        'launch without recreating the machine', 'hosts'),
    Key('network.allow_private', ListOf(NETWORK, 'list of networks', unique=True), [],
        'loopback, private or link-local networks (CIDR) that allowed hosts may resolve to, for internal '
        'registries and tests; every such address is refused otherwise', 'allow_private'),
    Key('network.hosts', AddressMap(), {},
        'names the egress proxy resolves to these addresses for this bottle instead of asking the host\'s '
        'resolver, for an internal host without DNS (`registry.internal: 10.20.0.5`); such a name is still '
        'reached only when allowed (`allow_hosts`, or approved through the supervisor), and a private address '
        'only when `allow_private` lists it', 'addresses'),
    Key('network.claude_code_hosts', HOSTS, CLAUDE_CODE_HOSTS,
        'what Claude Code itself needs, allowed besides `allow_hosts`; `[]` leaves them out', 'claude_code_hosts'),
    Key('git', GitRepoList(), [],
        'repositories the agent clones, fetches and pushes through the project\'s git gate, never with a '
        'credential of its own: `url` (https, ssh or scp-like), `push` (branch patterns it may push, default '
        '`agent/<agent>/*`; a `refs/tags/...` pattern allows tags), `mode` (`forward`: upstream at once; '
        '`review`, the default: held until a person approves; `local`: kept in the gate), `max_push_mb` '
        '(default 100)', 'git'),
    Key('supervise', Boolean(), True,
        'the project\'s supervisor in the bottle\'s Claude Code (an MCP server named `supervise`): the agent asks '
        'it for a host, a push review or an answer, and the human decides on the supervisor\'s page or with '
        '`doit approve`; `false` leaves it out', 'supervise'),
    Key('supervise_wait', Integer(0, MAX_SUPERVISE_WAIT, 'seconds'), 600,
        'how long a question to the supervisor waits for the human before the agent is told "still pending" '
        '(it checks later)', 'supervise_wait'),
    Key('env', EnvMap(ENV_NAME), {},
        'plain environment variables of the machine (merged with `_defaults.yaml` variable by variable)', 'env'),
    Key('secrets', SecretList(), [],
        'host environment variables the agent uses without ever holding them: each is bound to the hosts its value '
        'may go to and the header it goes in (`{name: GITHUB_TOKEN, hosts: [api.github.com], header: Authorization, '
        'format: "Bearer {}"}`, `format` default `{}`); the guest gets a placeholder, and the egress proxy puts the '
        'value, handed to it at attach time, into that header of requests to those hosts (and refuses the '
        'placeholder anywhere else). `ANTHROPIC_API_KEY` (`x-api-key`) and `CLAUDE_CODE_OAUTH_TOKEN` '
        '(`Authorization: Bearer`) may be given by name alone: they go to the Anthropic API (the host of '
        '`env`\'s `ANTHROPIC_BASE_URL` when set). A bound host must be allowed', 'secrets'),
    Key('user.name', UserName(), 'agent',
        'the non-root user Claude runs as', 'user.name'),
    Key('user.uid', Integer(1, 60000), 1000,
        'its uid (and gid); an account or group of the base that has it (`ubuntu`, `node`) is renamed to be the '
        'agent\'s', 'user.uid'),
    Key('user.home', GuestPath(), '/home/agent', 'its home directory', 'user.home'),
    Key(PROJECT_KEY, Text('name', 'a short name such as acme-main (letters, digits, "-" and "_")',
                          MACHINE_NAME.pattern, max_length=MAX_PROJECT_NAME), None,
        'only in `_defaults.yaml`: the checkout\'s part of machine names (`bottle-<project>-<agent>`), so that '
        'worktrees and clones side by side never share a machine; give each checkout its own', 'project',
        default_text='the checkout directory\'s name and a hash of its path, such as `main-3f2a1c`'),
    Key('backend', Choice(*BACKENDS), None, 'where the bottle runs', 'backend',
        default_text=f'`{BACKEND_ENV}` (it also overrides `_defaults.yaml`), else the first that works '
                     'here: smolvm, podman, docker'),
    Key('engine', Text('connection', 'a podman system connection or docker context name such as worker1 (letters, '
                       'digits, ".", "_" and "-")', ENGINE_NAME.pattern, max_length=MAX_ENGINE_NAME), None,
        'the engine the machine runs on, by its CLI\'s own name for it: a `podman system connection` (podman), a '
        '`docker context` (docker); its host, user and key stay in that configuration. The fence stays on this '
        'host: the bottle\'s door is forwarded to it over SSH. Moving an agent to another engine takes its old '
        'machine down',
        'engine', default_text='this host\'s engine'),
)
KEY = {key.path: key for key in KEYS}
SECTIONS = {
    'image': 'what goes into the agent image',
    'resources': 'the machine\'s size',
    'network': 'what the machine may reach',
    'user': 'the user Claude runs as in the guest',
}
TOP_LEVEL = list(dict.fromkeys(key.path.split('.')[0] for key in KEYS))
