"""Test harness: a throwaway claude-bottle project driven through the real `doit`
CLI, against one backend. Each backend harness knows how to set the backend up,
how to read its call log, how to look inside a machine, and how to change a
machine behind doit's back; the scenarios are written once, against this API.
"""
from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tasks.backends.disk import release_under
from tasks.manifest import default_project_name, is_local_base, machine_name

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    """One doit invocation and the backend calls it made."""
    args: tuple
    returncode: int
    stdout: str
    stderr: str
    calls: list[list[str]] = field(default_factory=list)   # argv after the program name
    _kinds: list[str] = field(default_factory=list)

    @property
    def kinds(self) -> Counter:
        return Counter(self._kinds)

    def count(self, kind: str, machine: str | None = None) -> int:
        """Calls of one kind, optionally only those naming one machine."""
        if machine is None:
            return self.kinds[kind]
        return sum(1 for argv, k in zip(self.calls, self._kinds)
                   if k == kind and any(a == machine or a.startswith(f'{machine}:') for a in argv))

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def executed(self) -> set[str]:
        """The tasks doit executed (it prints ".  task"; "-- task" for one up to date)."""
        return set(re.findall(r'^\.  (\S+)$', self.stdout, re.M))

    def transferred_skills(self) -> list[str]:
        """Skill names sent by `exec -i ... sh -c <receive> sh <dir> <skill> <owner>`."""
        names = []
        for argv in self.calls:
            if 'sh' in argv and '-c' in argv:
                script_at = argv.index('-c') + 1
                tail = argv[script_at + 1:]
                if 'tar -x' in argv[script_at] and len(tail) == 4:
                    names.append(tail[2])
        return names


@dataclass
class Attached:
    """`doit launch:<agent>` on a terminal: did Claude start, and how."""
    ok: bool
    output: str
    claude: dict           # user, uid, home, args, tty, secret_sha256 of the claude process


def parse_fields(text: str) -> dict:
    return dict(line.split('=', 1) for line in text.splitlines() if '=' in line)


def run_on_terminal(cwd: Path, args: list[str], env: dict, timeout: float = 600) -> tuple[int, str]:
    """Run a command with a pseudo-terminal as stdin/stdout/stderr; return (exit code, output)."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdin=terminal, stdout=terminal, stderr=terminal,
                            start_new_session=True)
    os.close(terminal)
    output = b''
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 1)
        if ready:
            try:
                chunk = os.read(controller, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        elif proc.poll() is not None:
            break
    os.close(controller)
    return proc.wait(timeout=60), output.decode(errors='replace')


class Bottles:
    """A project directory with its own agents, run with `python -m doit`."""

    def __init__(self, root: Path, backend):
        self.root = root
        self.backend = backend
        self.extra_env: dict[str, str] = {}      # for every doit run of this project
        self.audit_log: Path | None = None          # where host programs are recorded (record_host_programs)
        self.shares_images = True                   # see ImageStash; own_images() for a test about building them
        root.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / 'dodo.py', root / 'dodo.py')
        (root / 'agents' / 'skills').mkdir(parents=True, exist_ok=True)
        # Unsupervised unless a test is about the supervisor: its health check, a real MCP session, imports
        # the MCP client (about 1.5 s) in every doit run that reaches it, hundreds of runs in the suite.
        self.write(root / 'agents' / '_defaults.yaml', yaml.safe_dump({**backend.manifest_defaults(),
                                                                        'supervise': False}))

    def own_images(self):
        """Build and pack every image this project needs itself: for tests about building and packing."""
        self.shares_images = False

    def record_host_programs(self, log: Path):
        """From now on, every program a Python process of this project (doit, its daemons) starts on the
        host is a line in `log` (tests/audit/sitecustomize.py)."""
        self.audit_log = log

    def use_real_claude(self):
        """Images with the real Claude Code, for tests that run it (the test images have a script)."""
        self._defaults(image={**self._defaults().get('image', {}), 'claude_code': real_claude_version()})

    def supervise(self):
        """Agents supervised, as by default outside the tests (a manifest may still say otherwise)."""
        defaults = self._defaults()
        defaults.pop('supervise', None)
        self.write(self.root / 'agents' / '_defaults.yaml', yaml.safe_dump(defaults))

    def _defaults(self, **changes) -> dict:
        """agents/_defaults.yaml, with `changes` written into it first."""
        defaults_file = self.root / 'agents' / '_defaults.yaml'
        defaults = {**(yaml.safe_load(defaults_file.read_text()) or {}), **changes}
        if changes:
            self.write(defaults_file, yaml.safe_dump(defaults))
        return defaults

    def stop_daemons(self):
        self.stop_daemons_of(self.root)

    @staticmethod
    def stop_daemons_of(root: Path):
        """Stop the project's daemons at `root` that it ever started: the supervisor, the git gate, the egress
        proxy and its door relays, the forwards to workers."""
        from daemons.gate.control import GitGate
        from daemons.lifecycle import Daemon
        from daemons.proxy.control import EgressProxy
        from daemons.supervise.control import Supervisor
        state = root / '.bottle'
        for name, stop in (('supervise', lambda d: Supervisor(d).stop()), ('gate', lambda d: GitGate(d).stop()),
                           ('egress', lambda d: EgressProxy(d, Path('/nonexistent')).stop())):
            if (state / name).exists():
                stop(state / name)
        for forward in sorted((state / 'forward').glob('forward-*.pid')):      # the doors forwarded to workers
            Daemon(forward.stem, forward.parent, []).stop()

    # -- writing the project

    @staticmethod
    def write(path: Path, text: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def agent(self, name: str, **manifest):
        self.write(self.root / 'agents' / f'{name}.yaml', yaml.safe_dump(manifest, sort_keys=False))

    def agent_text(self, name: str, text: str):
        self.write(self.root / 'agents' / f'{name}.yaml', text)

    def skill(self, name: str, files: dict[str, str] | None = None):
        files = files or {'SKILL.md': f'---\nname: {name}\ndescription: test skill {name}\n---\nDo {name}.\n'}
        for rel, text in files.items():
            self.write(self.root / 'agents' / 'skills' / name / rel, text)

    def skill_tree(self, name: str) -> dict[str, str]:
        base = self.root / 'agents' / 'skills' / name
        return {str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(base.rglob('*')) if p.is_file()}

    # -- running doit

    def env(self, **extra) -> dict:
        env = {**os.environ, **self.backend.env(), **self.extra_env}
        # The dodo.py copied into the project imports `tasks`: from this checkout, not from
        # whatever claude-bottle site-packages holds.
        audit = [str(REPO / 'tests' / 'audit')] if self.audit_log else []
        env['PYTHONPATH'] = os.pathsep.join(filter(None, [*audit, str(REPO), extra.pop('PYTHONPATH', None)]))
        if self.audit_log:
            env['CLAUDE_BOTTLE_AUDIT_LOG'] = str(self.audit_log)
        env.update({k: v for k, v in extra.items() if v is not None})
        for key in [k for k, v in extra.items() if v is None]:
            env.pop(key, None)
        return env

    def doit(self, *args: str, check: bool = True, env: dict | None = None, timeout: float = 600) -> Run:
        stash = ImageStash.current if self.shares_images else None
        if stash:
            stash.lend(self)
        mark = self.backend.call_mark()
        proc = subprocess.run([sys.executable, '-m', 'doit', *args], cwd=self.root,
                              env=env or self.env(), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        calls = self.backend.calls_since(mark)
        if stash:
            stash.keep(self)
        run = Run(args, proc.returncode, proc.stdout, proc.stderr, calls,
                  [self.backend.kind(c) for c in calls])
        if check and proc.returncode != 0:
            raise AssertionError(f'doit {" ".join(args)} exited {proc.returncode}\n{run.output}')
        return run

    # -- looking inside

    def machine(self, agent: str) -> str:
        """The agent's machine: bottle-<project>-<agent>, the project part this checkout's (README)."""
        defaults_file = self.root / 'agents' / '_defaults.yaml'
        defaults = yaml.safe_load(defaults_file.read_text()) if defaults_file.exists() else None
        return machine_name((defaults or {}).get('project') or default_project_name(self.root), agent)

    def guest(self, agent: str, script: str) -> str:
        return self.backend.guest(self.machine(agent), script)

    def guest_process(self, agent: str, script: str) -> subprocess.Popen:
        """`sh -c script` as root in the agent's machine, its stdout a pipe read as it comes."""
        return subprocess.Popen(self.backend.guest_argv(self.machine(agent), script), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=self.env())

    def put(self, agent: str, host_file: Path, guest_path: str):
        """A host file into the agent's running machine, behind doit's back."""
        self.backend.put(self.machine(agent), host_file, guest_path)

    def door_dir(self, agent: str) -> Path:
        """The host directory of the agent's door, as the project's proxy records it."""
        doors = json.loads((self.root / '.bottle' / 'egress' / 'doors.json').read_text())['bottles']
        return Path(doors[agent]['door'])

    def guest_tree(self, agent: str, directory: str) -> dict[str, str]:
        out = self.guest(agent, f'cd {directory} && find . -type f -exec sha256sum {{}} +')
        tree = {}
        for line in out.splitlines():
            digest, path = line.split(None, 1)
            tree[path.removeprefix('./')] = digest
        return tree

    def manifest(self, agent: str) -> dict:
        return yaml.safe_load((self.root / 'agents' / f'{agent}.yaml').read_text())

    def prompt_text(self, agent: str) -> str:
        return (self.root / '.bottle' / 'agents' / agent / 'prompt.md').read_text()


class ImageStash:
    """The packed images the suite's workers have built, by key, lent to every new project that needs one (hard
    links into its .bottle/images/, which makes its image task up to date, as a restored CI cache does), so a
    recipe is built and packed about once per run, not once per test. A key names everything that goes into its
    image (tasks/image.py), so a lent image is the one the project would have built. Not for the real
    smolvm, whose images share keys with the stand-in's; a test about building images calls own_images()."""
    current: ImageStash | None = None       # set for the session by tests/conftest.py

    def __init__(self, directory: Path):
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)

    def lend(self, bottles: Bottles):
        if not bottles.backend.shares_images:
            return
        for key in self._keys(bottles):
            kept, target = self.dir / key, bottles.root / '.bottle' / 'images' / key
            if (kept / 'image.json').exists() and not target.exists():
                shutil.copytree(kept, target, copy_function=os.link)

    def keep(self, bottles: Bottles):
        if not bottles.backend.shares_images:
            return
        for built in (bottles.root / '.bottle' / 'images').glob('*/image.json'):
            key = built.parent.name
            # a local base's key is its path as the manifest says it, not its content: never shared
            if not (self.dir / key).exists() and not is_local_base(json.loads(built.read_text())['base']):
                partial = self.dir / f'.{key}.{os.getpid()}'
                shutil.rmtree(partial, ignore_errors=True)
                shutil.copytree(built.parent, partial, copy_function=os.link,
                                ignore=shutil.ignore_patterns('.partial-*'))
                try:
                    os.replace(partial, self.dir / key)
                except OSError:         # another worker kept the same image first
                    shutil.rmtree(partial, ignore_errors=True)

    @staticmethod
    def _keys(bottles: Bottles) -> set[str]:
        """The image keys the project's manifests name now; none when they cannot be read."""
        from tasks.image import image_of
        from tasks.project import Project
        try:
            project = Project(bottles.root, remember_renders=False)
            return {image_of(project, agent.recipe).key for agent in project.agents.values()}
        except Exception:           # an invalid manifest is the test's business, not the stash's
            return set()


# --- the Claude Code that stand-in images install --------------------------------------------



def real_claude_version() -> str:
    """The Claude Code a manifest gets by default: the real one, 370 MB in every image."""
    from tasks.manifest import KEYS
    return next(key.default for key in KEYS if key.path == 'image.claude_code')

# Stands in for the native claude binary in stand-in images only (a real one is 370 MB;
# the podman suite installs the real one). It records how it was started.
FAKE_CLAUDE = r'''#!/bin/sh
if [ "${1:-}" = "--version" ]; then echo "@VERSION@ (Claude Code)"; exit 0; fi
if [ "${1:-}" = "mcp" ]; then   # user-scope registrations, one file each, refused as the real one refuses
  servers="$HOME/.claude-test-mcp"
  case "$2 $3 $4" in
    "add-json -s user")
      [ ! -e "$servers/$5" ] || { echo "MCP server $5 already exists in user config" >&2; exit 1; }
      mkdir -p "$servers" && printf '%s\n' "$6" > "$servers/$5" && echo "Added MCP server $5 to user config" ;;
    "remove -s user")
      [ -e "$servers/$5" ] || { echo "No user-scoped MCP server found with name: $5" >&2; exit 1; }
      rm "$servers/$5" && echo "Removed MCP server $5 from user config" ;;
    *) echo "claude (test stand-in): unexpected: $*" >&2; exit 2 ;;
  esac
  exit 0
fi
out="$HOME/claude-started.txt"
{
  echo "uid=$(id -u)"
  echo "user=$(id -un)"
  echo "home=$HOME"
  echo "args=$*"
  if [ -t 0 ]; then echo "tty=yes"; else echo "tty=no"; fi
  if [ -n "${BOTTLE_TEST_SECRET:-}" ]; then
    echo "secret_sha256=$(printf %s "$BOTTLE_TEST_SECRET" | sha256sum | cut -d' ' -f1)"
  fi
  if [ "${1:-}" = "--append-system-prompt-file" ]; then
    echo "prompt_sha256=$(sha256sum < "$2" | cut -d' ' -f1)"
  fi
} > "$out"
echo "claude (test stand-in) started"
'''


# Its version names its contents, so images made with an older script (kept by an engine between
# runs) are never taken for current ones.
TEST_CLAUDE_VERSION = f'0.0.0-test.{hashlib.sha256(FAKE_CLAUDE.encode()).hexdigest()[:8]}'


def extract_member(archive: Path, name: str, target: Path, mode: int = 0o755) -> Path:
    """One regular file of a tarball (an npm package's binary) written to `target`, whole or not at all; read
    through extractfile, so no member's path or link is ever followed (Debian's Python 3.11.2 has no
    extraction filters)."""
    import tarfile
    with tarfile.open(archive) as tar:
        member = tar.getmember(name)
        if not member.isfile():
            raise ValueError(f'{name} in {archive} is not a regular file')
        source = tar.extractfile(member)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f'.{target.name}.{os.getpid()}')
        with open(partial, 'wb') as out:
            shutil.copyfileobj(source, out)
        partial.chmod(mode)
        os.replace(partial, target)
    return target


def make_fake_claude_archive(cache: Path) -> Path:
    """Put a package for TEST_CLAUDE_VERSION into the claude-bottle download cache."""
    import io
    import tarfile

    from tasks.image import npm_platform
    archive = (cache / 'claude-bottle' / 'claude-code'
               / f'anthropic-ai-claude-code-{npm_platform()}-{TEST_CLAUDE_VERSION}.tgz')
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(f'.{archive.name}.{os.getpid()}')     # test workers share the cache
    with tarfile.open(partial, 'w:gz') as tar:
        data = FAKE_CLAUDE.replace('@VERSION@', TEST_CLAUDE_VERSION).encode()
        info = tarfile.TarInfo('package/claude')
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
    os.replace(partial, archive)
    return archive


def make_standin_images(base: Path) -> Path:
    """The stand-in's image index: `debian:bookworm-slim` is a tiny root that borrows the
    host's /usr read-only, plus what the ca-certificates package would have laid down."""
    from tests.standin import harness
    entry = harness.make_tools_rootfs(base / 'rootfs')
    (base / 'rootfs/etc/ssl/certs').mkdir(parents=True, exist_ok=True)
    (base / 'rootfs/etc/ca-certificates.conf').touch()
    index = base / 'index.json'
    harness.write_image_index(index, {'debian:bookworm-slim': entry})
    return index


# --- backends -----------------------------------------------------------------------------------

class StandinSmolvm:
    """smolvm, played by the project's stand-in (tests/standin/smolvm)."""
    name = 'standin'
    cli = 'smolvm'
    shares_images = True            # ImageStash

    def __init__(self, tmp: Path, images_index: Path, cache: Path, latency_ms: int = 0):
        from tests.standin import harness
        self.harness = harness
        self.data = tmp / 'smolvm-data'
        self.data.mkdir(parents=True, exist_ok=True)
        self.images_index, self.cache, self.latency_ms = images_index, cache, latency_ms

    def env(self) -> dict:
        return {**self.harness.standin_env(self.data, self.images_index, self.latency_ms),
                'XDG_CACHE_HOME': str(self.cache)}

    def manifest_defaults(self) -> dict:
        return {'backend': 'smolvm', 'image': {'claude_code': TEST_CLAUDE_VERSION}}

    @staticmethod
    def stall_pack_env() -> dict:
        return {'SMOLVM_STANDIN_PACK_STALL_SECS': '60'}

    def call_mark(self) -> int:
        return len(self.harness.read_calls(self.data))

    def calls_since(self, mark: int) -> list[list[str]]:
        return [c['argv'] for c in self.harness.read_calls(self.data)[mark:]]

    @staticmethod
    def kind(argv: list[str]) -> str:
        if argv[:2] == ['pack', 'create']:
            return 'pack'
        if argv[:2] == ['machine', 'exec'] and any('cat > "$tmp"' in a for a in argv):
            return 'cp'                    # the prompt is copied through exec, as the agent user
        if argv and argv[0] in ('machine', 'vm') and len(argv) > 1:
            return {'ls': 'probe', 'list': 'probe', 'rm': 'delete'}.get(argv[1], argv[1])
        return ' '.join(argv[:2])

    def smolvm(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, **self.env()}
        return subprocess.run(['smolvm', *args], env=env, input=stdin, capture_output=True, check=True)

    def guest(self, machine: str, script: str) -> str:
        return self.smolvm('machine', 'exec', '--name', machine, '--', 'sh', '-c', script).stdout.decode()

    @staticmethod
    def guest_argv(machine: str, script: str) -> list[str]:
        return ['smolvm', 'machine', 'exec', '--name', machine, '--', 'sh', '-c', script]

    def put(self, machine: str, host_file: Path, guest_path: str):
        self.smolvm('machine', 'cp', str(host_file), f'{machine}:{guest_path}', '--mode', '755')

    def machine_state(self, machine: str) -> str | None:
        listed = json.loads(self.smolvm('machine', 'ls', '--json').stdout)
        return next((m['state'] for m in listed if m['name'] == machine), None)

    def delete_behind_back(self, machine: str):
        self.smolvm('machine', 'delete', '--name', machine, '-f')

    def stop_behind_back(self, machine: str):
        self.smolvm('machine', 'stop', '--name', machine)

    def state_dirs(self) -> list[Path]:
        return [self.data]

    def attach(self, bottles: Bottles, agent: str, env: dict) -> Attached:
        """The stand-in images' claude records how it was started, then exits."""
        code, output = run_on_terminal(bottles.root, [sys.executable, '-m', 'doit', f'launch:{agent}'], env)
        if code != 0:
            return Attached(False, output, {})
        return Attached(True, output, parse_fields(bottles.guest(agent, 'cat /home/agent/claude-started.txt')))

    def close(self, project_label):
        self.harness.stop_all(self.data)


def tmux_attach(root: Path, command: str, env: dict, inspect, timeout: float = 600) -> Attached:
    """Run `command` in a detached tmux session (a real terminal); wait until `inspect()` finds
    claude running or the command ends; return what was seen. The session is killed afterwards."""
    socket = root.parent / f'tmux-{uuid.uuid4().hex[:8]}.sock'
    tmux = ['tmux', '-S', str(socket)]
    subprocess.run([*tmux, 'new-session', '-d', '-x', '200', '-y', '50', '-c', str(root),
                    f'{command}; echo "EXIT=$?"; sleep 600'], env=env, check=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pane = subprocess.run([*tmux, 'capture-pane', '-p', '-S', '-200'], capture_output=True,
                                  text=True).stdout
            claude = inspect()
            if claude:
                return Attached(True, pane, claude)
            if 'EXIT=' in pane:
                return Attached(False, pane, {})
            time.sleep(0.5)
        raise AssertionError(f'claude did not start within {timeout} s:\n{pane}')
    finally:
        subprocess.run([*tmux, 'kill-server'], capture_output=True)


SKIP_ONBOARDING = ('echo \'{"hasCompletedOnboarding": true}\' > /home/agent/.claude.json && '
                   'chown agent:agent /home/agent/.claude.json')


def make_logging_shim(shim_dir: Path, program: str, log: Path, real: Path | None = None) -> Path:
    """`program` on PATH that logs its argv (one JSON line) and execs the real one (`real`, else the one on
    PATH)."""
    real = str(real) if real else shutil.which(program)
    shim_dir.mkdir(parents=True, exist_ok=True)
    shim = shim_dir / program
    shim.write_text(f'''#!{sys.executable}
import json, os, sys
line = (json.dumps({{"argv": sys.argv[1:]}}) + "\\n").encode()
fd = os.open({str(log)!r}, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
os.write(fd, line)
os.close(fd)
os.execv({real!r}, [{real!r}] + sys.argv[1:])
''')
    shim.chmod(0o755)
    return shim


def read_log(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    return [json.loads(line)['argv'] for line in log.read_text().splitlines() if line.strip()]


class Engine:
    """One engine of the docker CLI family as the tests call it, behind the backend's back."""

    def __init__(self, cli: str, env: dict | None = None, top: tuple[str, ...] = ('hpid',)):
        self.cli = cli
        self.env = env or {}
        self.top = top            # `top` arguments that list the host PID of each process

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([self.cli, *args], capture_output=True, check=check,
                              env={**os.environ, **self.env})

    def claude_process(self, machine: str) -> dict:
        """How claude runs in the container, read from the host's /proc: Claude Code makes
        itself non-dumpable, so even root in the container cannot read its environment."""
        top = self('top', machine, *self.top, check=False).stdout.decode(errors='replace')
        for hpid in top.split()[1:]:
            proc = Path('/proc') / hpid
            try:
                argv = proc.joinpath('cmdline').read_text().split('\0')[:-1]
                if argv[:1] != ['claude']:
                    continue
                env = dict(item.split('=', 1) for item in proc.joinpath('environ').read_text().split('\0')
                           if '=' in item)
                uid = next(line.split()[1] for line in proc.joinpath('status').read_text().splitlines()
                           if line.startswith('Uid:'))
                tty = os.readlink(proc / 'fd' / '0').startswith('/dev/pts/')
            except OSError:
                continue                # the process ended meanwhile
            passwd = self('exec', machine, 'getent', 'passwd', uid, check=False).stdout.decode()
            info = {'uid': uid, 'user': passwd.split(':')[0], 'home': env.get('HOME', ''),
                    'args': ' '.join(argv[1:]), 'tty': 'yes' if tty else 'no'}
            if 'BOTTLE_TEST_SECRET' in env:
                info['secret_sha256'] = hashlib.sha256(env['BOTTLE_TEST_SECRET'].encode()).hexdigest()
            return info
        return {}

    def containers(self, project_label: str) -> list[str]:
        return self('ps', '-a', '--format', '{{.Names}}', '--filter',
                    f'label=claude-bottle.project={project_label}', check=False).stdout.decode().split()

    def remove_containers(self, project_label: str):
        names = self.containers(project_label)
        if names:
            self('rm', '-f', *names, check=False)


PODMAN = Engine('podman')
podman_claude_process = PODMAN.claude_process
podman_containers = PODMAN.containers
remove_podman_containers = PODMAN.remove_containers


class Dockerd:
    """A Docker engine of the tests' own: data, state and socket in one directory, no iptables
    rules and no bridge (bottles run with `--network none`). dockerd starts a containerd of its
    own, in the same directory, unless the system already runs one. The suite's workers share one:
    the first to need it starts it (under a lock), the session's end stops it."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.host = f'unix://{directory}/docker.sock'
        self.proc: subprocess.Popen | None = None

    def answers(self) -> bool:
        return Engine('docker', {'DOCKER_HOST': self.host})('version', check=False).returncode == 0

    def start_or_join(self, timeout: float = 120) -> str | None:
        """Use the engine another worker started here, or start it; None, or why it cannot run here."""
        from daemons.lifecycle import locked
        with locked(self.dir / 'start.lock'):
            if (self.dir / 'dockerd.pid').exists() and self.answers():
                return None
            return self.start(timeout)

    def start(self, timeout: float = 120) -> str | None:
        """Start it and wait until it answers; None, or why it cannot run here."""
        exe = shutil.which('dockerd', path=f'{os.environ["PATH"]}{os.pathsep}/usr/sbin')
        if exe is None:
            return 'dockerd is not installed (Debian: apt-get install docker.io)'
        if shutil.which('docker') is None:
            return 'the docker CLI is not on PATH (Debian: apt-get install docker.io)'
        if os.geteuid() != 0:
            return 'dockerd needs root'
        log = self.dir / 'dockerd.log'
        with open(log, 'wb') as out:
            self.proc = subprocess.Popen(
                [exe, '--iptables=false', '--bridge=none', '--data-root', str(self.dir / 'data'),
                 '--exec-root', str(self.dir / 'exec'), '--pidfile', str(self.dir / 'dockerd.pid'),
                 '-H', self.host], stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        engine = Engine('docker', {'DOCKER_HOST': self.host})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                return f'dockerd exited with code {self.proc.returncode}:\n{log.read_text()[-2000:]}'
            if engine('version', check=False).returncode == 0:
                return None
            time.sleep(0.2)
        self.stop()
        return f'dockerd did not answer within {timeout} s:\n{log.read_text()[-2000:]}'

    def stop(self):
        """Stop dockerd (it stops its containers and its containerd), then remove its data. Another
        process's (the worker that started it) is stopped by its pid file."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        else:
            try:
                pid = int((self.dir / 'dockerd.pid').read_text())
                if str(self.dir) not in Path(f'/proc/{pid}/cmdline').read_text():
                    return
            except (OSError, ValueError):
                return
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 120
            while Path(f'/proc/{pid}').exists() and time.monotonic() < deadline:
                try:
                    os.waitpid(pid, os.WNOHANG)      # this process's child (an earlier Dockerd object started it)
                except ChildProcessError:
                    pass
                time.sleep(0.2)
            if Path(f'/proc/{pid}').exists():
                os.kill(pid, signal.SIGKILL)
        # dockerd stops its containerd itself, unless it had to be killed
        try:
            pid = int((self.dir / 'exec' / 'containerd' / 'containerd.pid').read_text())
            if str(self.dir) in Path(f'/proc/{pid}/cmdline').read_text():
                os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            pass
        # a dockerd that failed to start leaves its data root mounted on itself
        subprocess.run(['umount', '--recursive', str(self.dir / 'data')], capture_output=True)
        shutil.rmtree(self.dir / 'data', ignore_errors=True)


class LoggedCli:
    """A real backend CLI whose calls a shim on PATH logs, for counting."""
    cli: str

    def __init__(self, tmp: Path, cache: Path, real: Path | None = None):
        self.log = tmp / f'{self.cli}-calls.jsonl'
        self.shims = tmp / 'shims'
        make_logging_shim(self.shims, self.cli, self.log, real)
        self.cache = cache

    def env(self) -> dict:
        return {'PATH': f'{self.shims}{os.pathsep}{os.environ["PATH"]}', 'XDG_CACHE_HOME': str(self.cache)}

    def call_mark(self) -> int:
        return len(read_log(self.log))

    def calls_since(self, mark: int) -> list[list[str]]:
        return read_log(self.log)[mark:]


class DockerFamily(LoggedCli):
    """The docker backend on a real engine of the docker CLI family, on the debootstrap base; the
    images get the real Claude Code where a test runs it (Bottles.use_real_claude), else the script
    the stand-in's images have (saving an image is half as long without the real one's 370 MB)."""
    engine: Engine
    shares_images = True            # ImageStash

    def manifest_defaults(self) -> dict:
        return {'backend': self.name, 'image': {'base': 'debootstrap:bookworm', 'claude_code': TEST_CLAUDE_VERSION}}

    @staticmethod
    def stall_pack_env() -> dict:
        return {}            # `save` of a real image takes seconds: time enough to kill it

    @staticmethod
    def kind(argv: list[str]) -> str:
        if argv[:1] in (['--connection'], ['--context']):
            argv = argv[2:]             # a call to an engine elsewhere is of the same kind
        verb = argv[0] if argv else ''
        if verb == 'ps':
            return 'probe'
        if verb == 'save':
            return 'pack'
        if verb == 'rm':
            return 'delete'
        if verb == 'exec' and any('cat > "$tmp"' in a for a in argv):
            return 'cp'                    # a file copied through exec (RECEIVE_FILE, the prompt)
        if verb == 'image':
            return ' '.join(argv[:2])
        return verb

    def guest(self, machine: str, script: str) -> str:
        return self.engine('exec', machine, 'sh', '-c', script).stdout.decode()

    def guest_argv(self, machine: str, script: str) -> list[str]:
        return [self.engine.cli, 'exec', machine, 'sh', '-c', script]

    def put(self, machine: str, host_file: Path, guest_path: str):
        self.engine('cp', str(host_file), f'{machine}:{guest_path}')

    def machine_state(self, machine: str) -> str | None:
        proc = self.engine('container', 'inspect', '--format', '{{.State.Status}}', machine, check=False)
        if proc.returncode != 0:
            return None
        state = proc.stdout.decode().strip()
        return {'exited': 'stopped'}.get(state, state)

    def delete_behind_back(self, machine: str):
        self.engine('rm', '-f', machine)

    def stop_behind_back(self, machine: str):
        self.engine('stop', machine)

    def attach(self, bottles: Bottles, agent: str, env: dict) -> Attached:
        """The real claude keeps running: it is inspected in the bottle, then left to teardown.
        With onboarding marked done it waits at its trust prompt instead of checking the
        network first (the bottles here have none)."""
        bottles.use_real_claude()
        bottles.doit(f'provision:{agent}', env=env)
        self.guest(bottles.machine(agent), SKIP_ONBOARDING)
        return tmux_attach(bottles.root, f'{sys.executable} -m doit launch:{agent}', env,
                           lambda: self.engine.claude_process(bottles.machine(agent)))

    def state_dirs(self) -> list[Path]:
        """The writable layers of every bottle: where a guest would have written a secret."""
        names = self.engine('ps', '-a', '--format', '{{.Names}}', '--filter', 'name=^bottle-').stdout.split()
        return [Path(self.engine('inspect', '--format', '{{.GraphDriver.Data.UpperDir}}', n.decode())
                     .stdout.decode().strip()) for n in names]

    def close(self, project_label):
        self.engine.remove_containers(project_label)
        release_under(self.log.parent)      # their disks, which the engine's `rm -f` leaves mounted


class Podman(DockerFamily):
    name = 'podman'
    cli = 'podman'
    engine = PODMAN


class Docker(DockerFamily):
    """On the tests' own dockerd, with the `docker` CLI first on PATH (its API version is
    negotiated down to the engine's)."""
    name = 'docker'
    cli = 'docker'

    def __init__(self, tmp: Path, cache: Path, dockerd: Dockerd):
        super().__init__(tmp, cache)
        # `docker top` takes ps options and runs ps on the host, so its PIDs are the host's.
        self.engine = Engine('docker', {'DOCKER_HOST': dockerd.host}, top=('-o', 'pid'))

    def env(self) -> dict:
        return {**super().env(), **self.engine.env}


# How the claude process runs, read from /proc inside a smolvm guest (whose root, unlike a
# container's, has CAP_SYS_PTRACE and may read a non-dumpable process's environment).
INSPECT_CLAUDE = r'''for d in /proc/[0-9]*; do
  cmd=$(tr '\0' ' ' < "$d/cmdline" 2>/dev/null) || continue
  case "$cmd" in claude*) ;; *) continue ;; esac
  uid=$(sed -n 's/^Uid:[[:space:]]*\([0-9]*\).*/\1/p' "$d/status")
  echo "uid=$uid"
  echo "user=$(getent passwd "$uid" | cut -d: -f1)"
  echo "home=$(tr '\0' '\n' < "$d/environ" | sed -n 's/^HOME=//p')"
  args=${cmd#claude}; args=${args# }; echo "args=${args% }"
  case "$(readlink "$d/fd/0")" in /dev/pts/*) echo tty=yes ;; *) echo tty=no ;; esac
  secret=$(tr '\0' '\n' < "$d/environ" | sed -n 's/^BOTTLE_TEST_SECRET=//p')
  [ -z "$secret" ] || echo "secret_sha256=$(printf %s "$secret" | sha256sum | cut -d' ' -f1)"
  exit 0
done
exit 1
'''


class RealSmolvm(LoggedCli, StandinSmolvm):
    """The real smolvm (`real`: the one on PATH or the suite's own, tests/real_smolvm.py), where it boots a
    machine: its calls logged by a shim, real images and Claude. What it shares with the stand-in (argv
    kinds, exec, state) comes from StandinSmolvm."""
    name = 'smolvm'
    cli = 'smolvm'
    shares_images = False           # its images share keys with the stand-in's

    def manifest_defaults(self) -> dict:
        return {'image': {'base': 'debootstrap:bookworm'}}

    @staticmethod
    def stall_pack_env() -> dict:
        return {}            # a real pack takes seconds: time enough to kill it

    def state_dirs(self) -> list[Path]:
        return []            # smolvm's own disks are images of whole machines; the project is scanned

    def attach(self, bottles: Bottles, agent: str, env: dict) -> Attached:
        bottles.doit(f'provision:{agent}', env=env)
        self.guest(bottles.machine(agent), SKIP_ONBOARDING)

        def inspect():
            try:
                return parse_fields(self.guest(bottles.machine(agent), INSPECT_CLAUDE))
            except subprocess.CalledProcessError:
                return {}
        return tmux_attach(bottles.root, f'{sys.executable} -m doit launch:{agent}', env, inspect)

    def close(self, project_label):
        listed = json.loads(self.smolvm('machine', 'ls', '--json').stdout)
        for machine in listed:
            if (machine.get('labels') or {}).get('claude-bottle.project') == project_label:
                self.smolvm('machine', 'delete', '--name', machine['name'], '-f')
