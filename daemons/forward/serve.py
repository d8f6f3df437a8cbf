"""The door forward daemon: one SSH connection to a worker carrying a Unix socket forward per bottle.

    python -P -m daemons.forward.serve STATE_DIR CLI ENGINE PROJECT_KEY FILES_DIR CONTROL_SOCKET BOTTLE_KEY=DOOR...

CLI and ENGINE name the podman system connection or docker context whose host, port, user and key it uses (asked
of the CLI at each start, never written down). First it prepares the worker, in one SSH session: its private directory
`~/.claude-bottle/PROJECT_KEY` (0700) with a directory per bottle, a stale socket of an earlier forward removed,
and `files/` replaced by FILES_DIR's files (the confinement files its machines mount); it records the worker's
home in STATE_DIR/forward-ENGINE.json. Then it runs OpenSSH as a control master (CONTROL_SOCKET) with
`-R <bottle dir>/egress.sock:DOOR` for each bottle, strict host key checking and keep-alives, and lives as long as
that connection: SIGTERM ends both. Nothing it runs reads what a guest sends: the forward is OpenSSH's.
"""
from __future__ import annotations

import ctypes
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

from daemons.atomic import write_atomic
from daemons.forward.connections import EngineError, connection
from daemons.proxy import logbound
from daemons.proxy.control import private_dir

PREPARE_SECONDS = 60
SOCKET = 'egress.sock'
FILES = 'files'
# Run by the worker's shell for the SSH user: $1 the project's directory, then the bottles' keys; the files on
# stdin as a tar. Prints the home.
PREPARE = r'''set -eu
umask 077
base=$HOME/.claude-bottle/$1; shift
mkdir -p "$HOME/.claude-bottle" "$base"
chmod 700 "$HOME/.claude-bottle" "$base"
for bottle; do mkdir -p "$base/$bottle"; chmod 700 "$base/$bottle"; rm -f "$base/$bottle/egress.sock"; done
rm -rf "$base/files.new"; mkdir "$base/files.new"
tar -C "$base/files.new" --no-same-owner -xf -
chmod -R go-rwx "$base/files.new"
rm -rf "$base/files"; mv "$base/files.new" "$base/files"
printf '%s' "$HOME"
'''


def ssh_argv(cli: str, engine: str) -> list[str]:
    """`ssh` to the worker of an engine: its port, user and key (podman's; docker's comes from ssh's own config), host
    keys checked strictly against the
    known_hosts podman reads too ($HOME's, where ssh alone would take the password database's home; an unknown
    key is refused, not learnt), no password prompt, keep-alives so a dead worker is noticed."""
    conn = connection(cli, engine)
    if not conn.ssh:
        raise EngineError(f'{cli} engine {engine} is not reached over SSH ({conn.uri}): nothing to forward')
    argv = ['ssh', '-p', str(conn.port), '-o', 'BatchMode=yes', '-o', 'StrictHostKeyChecking=yes',
            '-o', 'ConnectTimeout=15', '-o', 'ServerAliveInterval=15', '-o', 'ServerAliveCountMax=3']
    if conn.known_hosts:
        known = str(conn.known_hosts)
        argv += ['-o', f'UserKnownHostsFile={known if " " not in known else chr(34) + known + chr(34)}']
    if conn.identity:
        argv += ['-i', conn.identity, '-o', 'IdentitiesOnly=yes']
    return [*argv, f'{conn.user}@{conn.host}' if conn.user else conn.host]


def _die_with_parent():
    """In the SSH child before exec: SIGTERM when this daemon ends, however it ends (PR_SET_PDEATHSIG), so a
    killed daemon never leaves its connection (and the worker's sockets) behind."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def _files_tar(directory: Path) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode='w', format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(directory.iterdir()) if directory.is_dir() else []:
            if path.is_file() and not path.is_symlink():
                info = tar.gettarinfo(str(path), arcname=path.name)
                info.uid = info.gid = 0
                info.uname = info.gname = ''
                info.mode = 0o600
                with open(path, 'rb') as f:
                    tar.addfile(info, f)
    return out.getvalue()


# The worker's directory of the project removed, when its last bottle there is gone.
REMOVE = r'''rm -rf "$HOME/.claude-bottle/$1"; rmdir "$HOME/.claude-bottle" 2>/dev/null; true'''


def remote_shell(script: str, *args: str) -> str:
    """A command line for the worker's login shell that runs `script` with `args`."""
    return 'sh -c ' + shlex.quote(script) + ' sh ' + shlex.join(args)


def main(argv: list[str]) -> int:
    logbound.bound_output()
    state_dir, cli, engine, project_key, files, control = argv[:6]
    bottles = dict(item.split('=', 1) for item in argv[6:])
    try:
        ssh = ssh_argv(cli, engine)
    except EngineError as err:          # the connection is gone from the CLI's configuration, say
        print(err, file=sys.stderr)
        return 1
    prepare = subprocess.run([*ssh, remote_shell(PREPARE, project_key, *bottles)],
                             input=_files_tar(Path(files)), capture_output=True, timeout=PREPARE_SECONDS)
    sys.stderr.write(prepare.stderr.decode(errors='replace'))
    if prepare.returncode != 0:
        print(f'preparing the worker failed (exit code {prepare.returncode})', file=sys.stderr)
        return 1
    home = prepare.stdout.decode(errors='replace')
    if not home.startswith('/') or '\n' in home or len(home) > 200:
        print(f'the worker named no home directory (it said {home[:100]!r})', file=sys.stderr)
        return 1
    base = f'{home}/.claude-bottle/{project_key}'
    private_dir(Path(control).parent)
    Path(control).unlink(missing_ok=True)
    forwards = [arg for key, door in bottles.items() for arg in ('-R', f'{base}/{key}/{SOCKET}:{door}')]
    master = subprocess.Popen([*ssh, '-M', '-S', control, '-N', '-o', 'ControlPersist=no',
                               '-o', 'ExitOnForwardFailure=yes', *forwards],
                              stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    write_atomic(Path(state_dir) / f'forward-{engine}.json', json.dumps({'pid': os.getpid(), 'home': home, 'cli': cli}))

    def stop(signum, frame):
        master.terminate()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = master.wait()
    Path(control).unlink(missing_ok=True)
    print(f'the SSH connection to the worker of {cli} engine {engine} ended (exit code {code})', file=sys.stderr)
    return 1 if code else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
