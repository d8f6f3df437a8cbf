"""The git gate's host side, for a test: an upstream over TLS on a loopback address that asks for Basic
auth only the host's git knows, the host HOME holding that credential, and the gate running with it
(Setup); git run as a bottle would through the gate (Setup.guest); host-side git helpers, the id of
a push the gate holds for review (held_id), and an upstream that accepts connections and never answers
(Stalled)."""
from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import threading
import time
from pathlib import Path

from daemons.gate.control import GitGate
from tests.proxy_upstreams import Upstream, make_upstream_ca, random_loopback_address

USER = 'host-user'
PASSWORD = f'host-secret-{secrets.token_hex(8)}'
IDENTITY = {'GIT_AUTHOR_NAME': 'Agent', 'GIT_AUTHOR_EMAIL': 'agent@example.invalid',
            'GIT_COMMITTER_NAME': 'Agent', 'GIT_COMMITTER_EMAIL': 'agent@example.invalid'}


class Setup:
    """A test module's upstream, host HOME and gate; repositories are added per test."""

    def __init__(self, root: Path, env: dict[str, str] | None = None):
        """`env`: more of the host's environment, the gate's included (BOTTLE_GATE_*_SECONDS)."""
        self.root = root
        self.address = random_loopback_address()
        self.ca, cert, key = make_upstream_ca(root, self.address)
        self.git_root = root / 'upstream'
        self.git_root.mkdir()
        self.upstream = Upstream(self.address, cert, key, git_root=self.git_root, git_credentials=(USER, PASSWORD))
        home = root / 'host-home'
        home.mkdir()
        credentials = home / '.git-credentials'
        credentials.write_text(f'https://{USER}:{PASSWORD}@{self.address}\n')
        credentials.chmod(0o600)
        (home / '.gitconfig').write_text(f'[credential]\n\thelper = store\n[http]\n\tsslCAInfo = {self.ca}\n')
        self.host_env = {'PATH': os.environ['PATH'], 'HOME': str(home), 'GIT_CONFIG_NOSYSTEM': '1', **(env or {})}
        self.state = root / 'gate'
        self.gate = GitGate(self.state, env=self.host_env)
        self.bottles: dict[str, list[dict]] = {}

    def add_repo(self, name: str, bottle: str = 'a', mode: str = 'forward', max_push_bytes: int = 10 ** 8,
                 push: list[str] | None = None) -> str:
        """Serve upstream repository `name` (made with one commit on main if new) to `bottle`;
        returns its upstream URL."""
        bare = self.git_root / f'{name}.git'
        if not bare.exists():
            work = self.root / 'seed' / name
            work.mkdir(parents=True)
            host_git(work, 'init', '-q', '-b', 'main')
            (work / 'README').write_text(f'{name}\n')
            host_git(work, 'add', 'README')
            host_git(work, 'commit', '-q', '-m', 'first')
            host_git(self.root, 'clone', '-q', '--bare', str(work), str(bare))
        self.bottles.setdefault(bottle, []).append({
            'upstream': self.url(name), 'path': f'{self.address}/git/{name}', 'push': push or [f'refs/heads/agent/{bottle}/*'],
            'mode': mode, 'max_push_bytes': max_push_bytes})
        self.gate.write_bottles({b: {'repos': repos} for b, repos in self.bottles.items()})
        return self.url(name)

    def set_upstream(self, bottle: str, name: str, url: str) -> None:
        """Serve repository `name` to `bottle` from `url` from now on, at the same path (the same mirror)."""
        for repo in self.bottles[bottle]:
            if repo['path'] == f'{self.address}/git/{name}':
                repo['upstream'] = url
        self.gate.write_bottles({b: {'repos': repos} for b, repos in self.bottles.items()})

    def url(self, name: str) -> str:
        return f'https://{self.address}/git/{name}.git'

    def guest(self, bottle: str, cwd: Path, *args: str, key: str | None = None,
              headers: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        """git as in bottle `bottle`: no credential, the gate's headers, the upstream rewritten to the gate."""
        home = self.root / f'guest-{bottle}'
        home.mkdir(exist_ok=True)
        gate = f'http://127.0.0.1:{self.gate.port()}/{self.address}/git/'
        key = self.gate.key_file.read_text() if key is None else key
        config = [f'http.extraHeader=X-Claude-Bottle: {bottle}', f'http.extraHeader=X-Claude-Bottle-Gate-Key: {key}',
                  *(f'http.extraHeader={header}' for header in headers),
                  f'url.{gate}.insteadOf=https://{self.address}/git/']
        env = {'PATH': os.environ['PATH'], 'HOME': str(home), 'GIT_CONFIG_NOSYSTEM': '1', **IDENTITY}
        return subprocess.run(['git', *(arg for item in config for arg in ('-c', item)), *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=120)

    def clone(self, bottle: str, name: str, into: Path) -> Path:
        proc = self.guest(bottle, into.parent, 'clone', '-q', self.url(name), into.name)
        assert proc.returncode == 0, proc.stderr
        return into

    def branch(self, bottle: str, name: str, branch: str, into: Path) -> tuple[Path, str]:
        """A guest clone of `name` on a new `branch` with a commit of its own: (work tree, commit)."""
        work = self.clone(bottle, name, into)
        host_git(work, 'checkout', '-q', '-b', branch)
        return work, commit(work, f'{branch.rsplit("/", 1)[-1]}.txt')

    def upstream_ref(self, name: str, ref: str) -> str | None:
        return rev_parse(self.git_root / f'{name}.git', ref)

    def gate_ref(self, bottle: str, name: str, ref: str) -> str | None:
        return rev_parse(self.state / 'mirrors' / bottle / self.address / 'git' / f'{name}.git', ref)

    def upstream_commit(self, name: str, file: str) -> str:
        """A new commit on the upstream's main, made there directly."""
        work = self.root / 'seed' / name
        host_git(work, 'pull', '-q', str(self.git_root / f'{name}.git'), 'main')
        return commit(work, file, push_to=(str(self.git_root / f'{name}.git'), 'main'))

    def receipts(self) -> list[dict]:
        return [json.loads(line) for line in self.gate.receipts_file.read_text().splitlines()]


def host_git(cwd: Path, *args: str) -> str:
    env = {'PATH': os.environ['PATH'], 'HOME': str(cwd), 'GIT_CONFIG_NOSYSTEM': '1', **IDENTITY}
    return subprocess.run(['git', *args], cwd=cwd, env=env, capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip()


def commit(work: Path, file: str, content: bytes | None = None, push_to: tuple[str, str] | None = None) -> str:
    (work / file).write_bytes(content if content is not None else f'{file}\n'.encode())
    host_git(work, 'add', file)
    host_git(work, 'commit', '-q', '-m', f'add {file}')
    if push_to:
        host_git(work, 'push', '-q', *push_to)
    return host_git(work, 'rev-parse', 'HEAD')


def rev_parse(git_dir: Path, ref: str) -> str | None:
    proc = subprocess.run(['git', '--git-dir', str(git_dir), 'rev-parse', '--verify', '--quiet', ref],
                          capture_output=True, text=True)
    return proc.stdout.strip() or None


def held_id(stderr: str) -> str:
    found = re.search(r'remote: gate: \S+ is held for review as (\w+)', stderr)
    assert found, stderr
    return found.group(1)


# Subjects that split a line for Python's splitlines or move a terminal's cursor.
TRICKY_SUBJECT = b'looks fine\r\x1b[2Kapproved\x0bv\x0cf\x1c\x1d\x1e \xc2\x85 \xe2\x80\xa8 \xe2\x80\xae'


def hiding_commits(work, branch: str, count: int) -> None:
    """`count` empty commits on `branch`, on top of HEAD, by one `git fast-import`; the newest has TRICKY_SUBJECT."""
    stream = []
    for n in range(count):
        message = TRICKY_SUBJECT + b'\n' if n == count - 1 else b'nothing to see %d\n' % n
        stream.append(b'commit refs/heads/%s\ncommitter Agent <agent@example.invalid> %d +0000\ndata %d\n%s%s\n'
                      % (branch.encode(), 1_700_000_000 + n, len(message), message,
                         b'from HEAD^0\n' if n == 0 else b''))
    subprocess.run(['git', 'fast-import', '--quiet'], cwd=work, input=b''.join(stream), check=True,
                   capture_output=True, env={'PATH': os.environ['PATH'], 'GIT_CONFIG_NOSYSTEM': '1', 'HOME': str(work)})


class Stalled:
    """A TCP server on 127.0.0.1 that accepts connections and never answers them (`mode` silent); or answers
    a request with the first bytes of an HTTP response, then nothing (partial), or then a byte every half
    second, too many for git's stall setting to see a stall (trickle). `connections` counts those accepted,
    `open()` those the other end has not closed; release() closes them all from this end."""

    def __init__(self, mode: str = 'silent'):
        self.mode = mode
        self.server = socket.create_server(('127.0.0.1', 0))
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self.accepted = threading.Event()
        self.sockets: list[socket.socket] = []
        self.closed: set[socket.socket] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, name: str, scheme: str = 'http') -> str:
        return f'{scheme}://127.0.0.1:{self.port}/git/{name}.git'

    def _accept(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                self.sockets.append(conn)
            self.accepted.set()
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn: socket.socket):
        """Read whatever comes, until the other end closes; answer the first bytes once, but when silent."""
        answered = False
        try:
            while conn.recv(65536):
                if self.mode != 'silent' and not answered:
                    conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Type: application/x-git-upload-pack-advertisement\r\n'
                                 b'Content-Length: 100000\r\n\r\n001e# service=git-upload-pack\n')
                    answered = True
                    if self.mode == 'trickle':
                        threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()
        except OSError:
            pass
        with self.lock:
            self.closed.add(conn)

    def _trickle(self, conn: socket.socket):
        try:
            while conn not in self.closed:
                conn.sendall(b'#')
                time.sleep(0.5)
        except OSError:
            pass

    def open(self) -> int:
        with self.lock:
            return len(self.sockets) - len(self.closed)

    def wait_closed(self, seconds: float = 60) -> bool:
        """Every connection accepted so far was closed by the other end (or by release), within `seconds`."""
        deadline = time.monotonic() + seconds
        while self.open() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.open()

    def release(self):
        with self.lock:
            for conn in self.sockets:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.release()
        self.server.close()


def processes_naming(text: str) -> list[str]:
    """The command lines of this machine's processes that contain `text` (a stalled upstream's port)."""
    found = []
    for cmdline in Path('/proc').glob('[0-9]*/cmdline'):
        try:
            line = cmdline.read_bytes().replace(b'\0', b' ').decode(errors='replace')
        except OSError:
            continue
        if text in line:
            found.append(line)
    return found
