"""smolvm (libkrun microVMs): argv exactly as smolvm 1.32 parses it (and 1.9 did).

See ../shared/research/smolvm-cli.md (1.9.3; where 1.32 differs, the real binary was asked). The facts this
module leans on:
- the machine name is always `--name` (`exec` has no `-n`), except `cp NAME:PATH`;
- `delete` without `-f` asks on a terminal (and exits 0 without deleting), and exits 1 without one: `-f`;
- `exec` and `cp` need a running machine; `cp` takes single regular files only;
- `pack create --from-vm` needs a stopped machine that has run; `-o OUT` writes
  the stub OUT and the payload OUT.smolmachine;
- a pack keeps the machine's `network` flag, so the build machine is switched to
  `--no-net` before packing: an agent machine has no network at all, only its door
  (`--mount-socket HOST:GUEST`, which libkrun dials anew for each guest connection);
- `pack create --from-vm` refuses a machine made from a local archive or directory (1.9.3; 1.32 may not,
  its `--rebase-from-image` speaks of imported layers, but that needs a booted machine to learn), so a
  local base is served as a registry image on 127.0.0.1 from the build machine's create through its pack,
  which pulls it again (registry.py says why that works);
- 1.9 had no `--user` on exec (1.32 has `-u`, whose groups and HOME cannot be seen without a booted
  machine): attach and exec as the agent user drop root with setpriv, which both versions run;
- `cp` writes as root: it is used only for destinations no one but root can change;
- a machine's changes to its root go to its overlay disk, `--overlay GiB`: the manifest's resources.disk;
- where smolvm cannot boot a machine, the first start says so in one line and is remembered, so later
  starts fail at once (smolvm_boot.py).
The real smolvm 1.32.2 parses every command line here (tests/test_smolvm_contract.py), and the stand-in answers
them as it does (tests/test_standin_vs_real.py).
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import nullcontext
from collections.abc import Mapping
from pathlib import Path

from tasks.backends import smolvm_boot
from tasks.backends.detect import alternatives
from tasks.backends.disk import DISK_LABEL
from tasks.backends.protocol import (WORKLOAD, Backend, BackendError, BackendMissing, ImageBuild, Machine, MachineSpec,
                                     failure, run)
from tasks.progress import progress

INSTALL_HELP = (
    'smolvm is not installed: there is no `smolvm` on PATH. claude-bottle runs each agent in a '
    'smolvm microVM by default. Install it with `curl -sSL https://smolmachines.com/install.sh | bash` '
    '(or a release from https://github.com/smol-machines/smolvm/releases), then open a new shell so '
    'that `smolvm --version` answers, and run doit again.')



class Smolvm(Backend):
    name = 'smolvm'
    artifact_name = 'image.smolmachine'

    @staticmethod
    def _exe() -> str:
        exe = shutil.which('smolvm')
        if exe is None:
            raise BackendMissing(INSTALL_HELP + alternatives('smolvm'))
        return exe

    def _smolvm(self, *args: str, stdin: bytes | None = None, check: bool = True, timeout: float | None = None):
        return run([self._exe(), *args], stdin=stdin, check=check, timeout=timeout)

    def _bootable(self):
        """Before a machine is made or started: fail at once where this smolvm could not boot one before (a
        missing smolvm is said by the call itself)."""
        exe = shutil.which('smolvm')
        problem = smolvm_boot.known_problem(exe) if exe else None
        if problem:
            raise problem

    def _probe(self) -> dict[str, Machine]:
        out = self._smolvm('machine', 'ls', '--json').stdout
        try:
            return {m['name']: Machine(m['name'], m['state'], dict(m.get('labels') or {}))
                    for m in json.loads(out)}
        except (ValueError, LookupError, TypeError, AttributeError) as err:
            shown = out[:200].decode(errors='replace')
            raise BackendError(f'`smolvm machine ls --json` printed what is not a list of machines '
                               f'({type(err).__name__}: {err}; it began {shown!r}); is the smolvm on PATH '
                               'a supported version (1.32; 1.9 spoke the same commands)?') from None

    def build_image(self, build: ImageBuild):
        from tasks.backends.registry import serve_base  # an HTTP server: imported when an image is built
        self._bootable()
        local = os.path.isabs(build.base)
        with serve_base(Path(build.base)) if local else nullcontext(build.base) as image, \
                self.build_machine(build.machine):
            self._smolvm('machine', 'create', '--name', build.machine, '--image', image, '--net',
                         '--', *WORKLOAD)
            self.set_up(build)
            self._smolvm('machine', 'update', '--name', build.machine, '--no-net')
            stub = build.artifact.with_suffix('')
            progress(f'packing {build.machine} into {build.artifact.name}')
            self._smolvm('pack', 'create', '--from-vm', build.machine, '-o', str(stub))
            os.unlink(stub)                      # only the .smolmachine payload is used

    def _create(self, spec: MachineSpec) -> dict[str, str]:
        self._bootable()
        args = ['machine', 'create', '--name', spec.name, '--from', str(spec.image),
                '--cpus', str(spec.cpus), '--mem', str(spec.memory_mib)]
        added = {}
        if spec.disk_gib is not None:
            args += ['--overlay', str(spec.disk_gib)]       # the overlay disk: what the guest changes
            added[DISK_LABEL] = f'{spec.disk_gib} GiB'
        for key, value in {**spec.labels, **added}.items():
            args += ['--label', f'{key}={value}']
        for key, value in spec.env.items():
            args += ['-e', f'{key}={value}']
        args += ['--mount-socket', f'{spec.door}:{spec.guest_door}']
        self._smolvm(*args, '--', *spec.workload)
        return added

    def _start(self, name: str):
        self._bootable()
        proc = self._smolvm('machine', 'start', '--name', name, check=False, timeout=smolvm_boot.start_seconds())
        if proc.returncode != 0:
            reason = smolvm_boot.boot_problem(proc.stderr.decode(errors='replace'))
            raise smolvm_boot.remember(self._exe(), reason) if reason else failure(proc)

    def _stop(self, name: str):
        self._smolvm('machine', 'stop', '--name', name)

    def _delete(self, name: str):
        self._smolvm('machine', 'delete', '--name', name, '-f')

    def copy_in(self, name: str, src: Path, dest: str, *, mode: int, uid: int, gid: int):
        if ':' in str(src):
            # smolvm splits SRC on its first ':' and would read it as NAME:PATH
            raise BackendError(f'cannot copy {src}: smolvm cp does not accept a ":" in a host path; '
                               'move the project to a path without ":"')
        self._smolvm('machine', 'cp', str(src), f'{name}:{dest}', '--mode', f'{mode:o}',
                     '--uid', str(uid), '--gid', str(gid))

    def exec(self, name: str, argv: list[str], *, stdin: bytes | None = None, user: str = 'root') -> str:
        flags = ['-i'] if stdin is not None else []
        if user != 'root':
            argv = _as_user(user, argv)
        return self._smolvm('machine', 'exec', '--name', name, *flags, '--', *argv,
                            stdin=stdin).stdout.decode(errors='replace')

    def attach_argv(self, name: str, argv: list[str], *, user: str, home: str,
                    env: Mapping[str, str]) -> list[str]:
        variables = ['-e', f'HOME={home}', '-e', f'USER={user}', '-e', f'LOGNAME={user}', '-e', 'TERM']
        variables += [arg for item in env.items() for arg in ('-e', '='.join(item))]
        return ['smolvm', 'machine', 'exec', '--name', name, '-it', '-w', home, *variables, '--',
                'setpriv', '--reuid', user, '--regid', user, '--init-groups', '--', *argv]


def _as_user(user: str, argv: list[str]) -> list[str]:
    """argv run as `user`: exec has no --user, so the guest's setpriv drops root first
    (as the attach command does)."""
    return ['setpriv', '--reuid', user, '--regid', user, '--init-groups', '--', *argv]
