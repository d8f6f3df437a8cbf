"""The docker CLI family: `docker` or `podman`, with the same contract as smolvm.

Build container from the base, setup, `commit`, `save` to an archive that plays
the part of the .smolmachine; a machine is a container created from that image
(loaded from the archive when the engine does not have it). Engine settings a
host may need (podman's runtime or ulimits, say) belong in the engine's own
configuration (containers.conf, daemon.json), not here.
"""
from __future__ import annotations

import json
import os
import posixpath
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from daemons.forward.connections import ENGINES, EngineError, connection, docker_default_host
from tasks.backends import confine, disk
from tasks.backends.detect import alternatives
from tasks.backends.protocol import (WORKLOAD, Backend, BackendError, BackendMissing, ImageBuild, Machine, MachineSpec,
                                     on, run)
from tasks.progress import progress

# One JSON object per container, with only what the probe needs: `{{json .}}` would make
# docker compute every container's disk usage as well.
# docker joins the labels with commas; the disk's file, a host path, is asked for by itself.
DOCKER_PS_FORMAT = ('{"name": {{json .Names}}, "state": {{json .State}}, "labels": {{json .Labels}}, '
                    f'"disk": {{{{json (.Label "{disk.FILE_LABEL}")}}}}}}')
# What would take a call to another engine or key than its --connection's (podman) or --context's (docker).
ENGINE_VARIABLES = ('CONTAINER_HOST', 'CONTAINER_CONNECTION', 'CONTAINER_SSHKEY', 'CONTAINER_PASSPHRASE',
                    'DOCKER_HOST', 'DOCKER_CONTEXT')
# The workload ignores SIGTERM as PID 1; stopping it should not take the default 10 s.
STOP = ['--stop-signal', 'SIGKILL']

# One-call atomic file copy with owner and mode, through exec (docker cp can set neither). It
# runs as root, so it refuses a destination below a symbolic link or a directory root does not
# own; the temporary file is a new name (mktemp), and the rename replaces whatever is at dest.
RECEIVE_FILE = r'''set -eu
dest=$1 owner=$2 mode=$3
at=$(dirname "$dest")
while :; do
  if [ -L "$at" ] || { [ -e "$at" ] && [ ! -O "$at" ]; }; then
    cat > /dev/null     # podman may drop the message of a command that leaves its stdin unread
    echo "claude-bottle: not writing $dest as root: $at is a symbolic link or not owned by root" >&2
    exit 1
  fi
  [ "$at" != / ] || break
  at=$(dirname "$at")
done
mkdir -p "$(dirname "$dest")"
tmp=$(mktemp "$dest.XXXXXX")
trap 'rm -f "$tmp"' EXIT
cat > "$tmp"
chown "$owner" "$tmp"; chmod "$mode" "$tmp"
mv -fT "$tmp" "$dest"
'''


class Docker(Backend):
    artifact_name = 'image.tar'

    def __init__(self, cli: str, engine: str | None = None):
        super().__init__()
        self.name = cli
        self.engine = engine            # a podman connection, a docker context (daemons/forward); None: this host's
        self._prefix = [ENGINES[cli].flag, engine] if engine else []
        self._engine_env: dict[str, str] | None = None

    @property
    def where(self) -> str:
        return on(self.name, self.engine)

    def _exe(self) -> str:
        exe = shutil.which(self.name)
        if exe is None:
            raise BackendMissing(
                f'{self.name} is not installed: there is no `{self.name}` on PATH. Install it '
                f'(Debian: `apt-get install {"podman runc" if self.name == "podman" else "docker.io"}`), '
                'or pick another backend with BOTTLE_BACKEND=smolvm|docker|podman or the manifest '
                'key backend.' + alternatives(self.name))
        return exe

    def _cli(self, *args: str, stdin: bytes | None = None, check: bool = True):
        return run([self._exe(), *self._prefix, *args], stdin=stdin, check=check, env=self._env())

    def _env(self) -> dict[str, str] | None:
        """For an engine elsewhere: checked once (its host key known here), and the variables that would
        take podman to another engine or key left out (CONTAINER_HOST wins over --connection)."""
        if not self.engine:
            return None
        if self._engine_env is None:
            conn = connection(self.name, self.engine)
            problem = conn.host_key_problem() if conn.ssh else None
            if problem:
                raise EngineError(problem)
            self._engine_env = {k: v for k, v in os.environ.items() if k not in ENGINE_VARIABLES}
        return self._engine_env

    def _probe(self) -> dict[str, Machine]:
        if self.name == 'podman':
            out = self._cli('ps', '-a', '--format', 'json').stdout
        else:
            out = self._cli('ps', '-a', '--no-trunc', '--format', DOCKER_PS_FORMAT).stdout
        try:
            return self._machines_listed(out)
        except (ValueError, LookupError, TypeError, AttributeError) as err:
            shown = out[:200].decode(errors='replace')
            raise BackendError(f'`{self.name} ps -a` printed what is not a list of containers '
                               f'({type(err).__name__}: {err}; it began {shown!r}); is the {self.name} on '
                               'PATH a supported version?') from None

    def _machines_listed(self, out: bytes) -> dict[str, Machine]:
        if self.name == 'podman':
            return {m['Names'][0]: Machine(m['Names'][0], _state(m['State']), dict(m.get('Labels') or {}))
                    for m in json.loads(out or b'[]')}
        machines = {}
        for line in filter(None, out.splitlines()):
            m = json.loads(line)
            # docker prints the labels joined by commas: a value with a comma in it (only
            # another tool's) comes out cut, one of ours never does.
            labels = dict(kv.split('=', 1) for kv in m['labels'].split(',') if '=' in kv)
            labels.pop(disk.FILE_LABEL, None)
            if m.get('disk'):
                labels[disk.FILE_LABEL] = m['disk']
            machines[m['name']] = Machine(m['name'], _state(m['state']), labels)
        return machines

    def _has_image(self, ref: str) -> bool:
        return self._cli('image', 'inspect', ref, check=False).returncode == 0

    def _base_ref(self, base: str) -> str:
        """An OCI reference as it is; a local root filesystem imported once per version of it,
        from the same cached layer the smolvm backend serves (registry.base_image)."""
        if not base.startswith('/'):
            return base
        from tasks.backends.registry import base_image  # the registry's server is not needed to probe
        image = base_image(Path(base))
        ref = f'localhost/claude-bottle-base:{image.tag}'
        if not self._has_image(ref):
            progress(f'importing the local base {base} into {self.name}')
            self._cli('import', str(image.layer), ref)
        return ref

    def build_image(self, build: ImageBuild):
        tag = image_ref(build.key)
        if not self._has_image(tag):
            self._build(build, tag)
        progress(f'saving {tag} to {build.artifact.name}')
        self._cli('save', '-o', str(build.artifact), tag)

    def _build(self, build: ImageBuild, tag: str):
        with self.build_machine(build.machine):
            self._cli('create', '--name', build.machine, *STOP, self._base_ref(build.base), *WORKLOAD)
            self.set_up(build)
            self._cli('commit', build.machine, tag)

    def forget_image(self, key: str) -> bool:
        if not self._has_image(image_ref(key)):
            return False
        self._cli('rmi', image_ref(key))
        return True

    def _create(self, spec: MachineSpec) -> dict[str, str]:
        if self.name == 'docker' and not self.engine and docker_default_host().startswith('ssh://'):
            raise BackendError(
                f'{spec.name} would be made on {docker_default_host()}, where docker goes by default here (DOCKER_HOST '
                'or its current context), and the bottle\'s door and files are paths of this host, absent there. '
                'Name that engine in the manifest (`engine: NAME`, a docker context: `docker context create NAME '
                '--docker host=ssh://USER@HOST`) so its door is forwarded, or point docker at this host\'s engine')
        ref = image_ref(spec.image_key)
        if not self._has_image(ref):
            progress(f'loading {ref} into {self.where} from {spec.image}')
            self._cli('load', '-i', str(spec.image))
        args = ['create', '--name', spec.name, *STOP, '--cpus', str(spec.cpus),
                '--memory', f'{spec.memory_mib}m']
        disk_flags, disk_labels = self._disk(spec, ref)
        args += disk_flags
        for key, value in {**spec.labels, **disk_labels}.items():
            args += ['--label', f'{key}={value}']
        for key, value in spec.env.items():
            args += ['-e', f'{key}={value}']
        # No network card; the door's directory, not its socket file, is mounted: a proxy that
        # recreates the socket after a restart is then reached again without a container restart. Read-only:
        # guest root connects to the door but can neither replace it nor leave a file on the host.
        args += ['--network', 'none', '-v', f'{spec.door.parent}:{posixpath.dirname(spec.guest_door)}:ro']
        # the least kernel surface (confine.py); not for build machines
        args += confine.create_flags(self.name, at=spec.engine_files)
        try:
            self._cli(*args, ref, *spec.workload)
        except BackendError:
            self._release_disk(disk_labels)
            raise
        return disk_labels

    def _disk(self, spec: MachineSpec, ref: str) -> tuple[list[str], dict[str, str]]:
        """The flags and labels of the machine's disk: made, mounted and seeded from the image when
        it can be bounded here (disk.py), said once and labelled when not."""
        if spec.disk is None or spec.disk_gib is None:
            return [], {}
        bounded = disk.Disk(spec.disk)
        why = (f'it runs on {self.where}, and a disk is made only on this host' if spec.engine_files else
               disk.why_not_bounded())
        if not why:
            progress(f'making the {spec.disk_gib} GiB disk of {spec.name}')
            try:
                disk.make(bounded, spec.disk_gib)
            except BackendError as err:     # no loop device here, say: the host cannot bound it
                disk.release(bounded)
                why = str(err).replace('\n', ' ')
        if why:
            print(f'note: the disk of {spec.name} is not bounded: {why}', file=sys.stderr, flush=True)
            return [], {disk.DISK_LABEL: f'{disk.NOT_BOUNDED}: {why}'.replace(',', ';')}
        writable = disk.outermost(spec.writable)
        try:
            self._cli(*disk.seed_argv(bounded, ref, writable))
        except BaseException:
            disk.release(bounded)
            raise
        return disk.mount_flags(bounded, writable), {disk.DISK_LABEL: f'{spec.disk_gib} GiB',
                                                     disk.FILE_LABEL: str(bounded.image)}

    @staticmethod
    def _release_disk(labels):
        if labels.get(disk.FILE_LABEL):
            disk.release(disk.Disk(Path(labels[disk.FILE_LABEL])))

    def _start(self, name: str):
        known = self.machine(name)
        if known and known.labels.get(disk.FILE_LABEL):
            disk.mount(disk.Disk(Path(known.labels[disk.FILE_LABEL])))    # after a restart of the host
        self._cli('start', name)

    def _stop(self, name: str):
        self._cli('stop', name)

    def _delete(self, name: str):
        known = self.machine(name)
        self._cli('rm', '-f', name)
        if known:
            self._release_disk(known.labels)

    def copy_in(self, name: str, src: Path, dest: str, *, mode: int, uid: int, gid: int):
        self.exec(name, ['sh', '-c', RECEIVE_FILE, 'sh', dest, f'{uid}:{gid}', f'{mode:o}'],
                  stdin=src.read_bytes())

    def exec(self, name: str, argv: list[str], *, stdin: bytes | None = None, user: str = 'root') -> str:
        flags = ['-i'] if stdin is not None else []
        return self._cli('exec', *flags, '-u', user, name, *argv, stdin=stdin).stdout.decode(errors='replace')

    def attach_argv(self, name: str, argv: list[str], *, user: str, home: str,
                    env: Mapping[str, str]) -> list[str]:
        variables = [arg for item in env.items() for arg in ('-e', '='.join(item))]
        return [self.name, *self._prefix, 'exec', '-it', '-u', user, '-w', home, '-e', f'HOME={home}', *variables,
                name, *argv]


def image_ref(key: str) -> str:
    return f'localhost/claude-bottle-image:{key}'


def _state(engine_state: str) -> str:
    """Engine states in smolvm's words."""
    return {'exited': 'stopped', 'configured': 'created'}.get(engine_state.lower(), engine_state.lower())
