"""The smolvm stand-in (tests/standin/smolvm) held to the real smolvm 1.32.2 (tests/real_smolvm.py; test.sh
installs it) on every command and flag the backend uses (issue 24, its third point).

One list of command lines is given, in order, to both binaries, each in a fresh state of its own (the real
one: a HOME of its own; the stand-in: a HOME of its own and SMOLVM_DATA_DIR where smolvm keeps its machines,
HOME/.cache/smolvm), from the same working directory, with the same absolute paths in the argv (a rootfs
directory, a host file for cp, a socket path for --mount-socket, a .smolmachine that does not exist). Each
line's (exit code, stdout, stderr) must be the same from both, after replacing only what must differ: each
binary's own directory, and the created_at of `machine ls --json`. The real binary cannot boot a VM here, so
the list holds what needs none: machines that exist but never ran, and machines that do not exist.

The list is made of the backend's own command lines (tasks.backends.smolvm.Smolvm, run with a recorder for
`_smolvm`, and its attach_argv), so it follows the backend when that changes, and of wrong ones: misspelt
flags, an unknown short flag, missing arguments, bad values, a positional where `--` is wanted, unknown
subcommands, a machine created twice and deleted twice. A stand-in launch shows every form the backend sends
(its command words and flags); each must be in the list, so a new flag cannot escape the comparison."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tasks.backends.protocol import ImageBuild, MachineSpec
from tasks.backends.smolvm import Smolvm
from tests.conftest import CACHE_ENV
from tests.real_smolvm import VERSION, binary
from tests.scenario import sent_in_a_launch
from tests.standin.harness import SMOLVM as STANDIN

pytestmark = pytest.mark.fast
CALL_SECONDS = 60
BUILD, AGENT, MISSING = 'cb-build', 'cb-agent', 'cb-missing'
BASE = 'cb-base-image'                   # the build's base in the recorded lines: the rootfs directory replaces it
OWN = '<own>'                            # in an argv: the directory of the binary that runs it


class Recorder(Smolvm):
    """The smolvm backend with every command line kept instead of run (ls --json answers [])."""

    def __init__(self):
        super().__init__()
        self.sent: list[list[str]] = []

    def _smolvm(self, *args: str, stdin: bytes | None = None, check: bool = True, timeout: float | None = None):
        self.sent.append(list(args))
        listing = list(args) == ['machine', 'ls', '--json']
        return subprocess.CompletedProcess(list(args), 0, b'[]' if listing else b'', b'')


def backend_lines(work: Path) -> dict[str, list[str]]:
    """The command lines the backend sends, by what they do, from its own code."""
    build = Recorder()
    stub = work / 'image'
    stub.write_text('')                  # build_image removes the stub pack create wrote
    build.build_image(ImageBuild(key='k', machine=BUILD, base=BASE, setup='true',
                                 files={'/etc/cb-file': work / 'file'}, artifact=work / 'image.smolmachine'))
    sent = [[str(work / 'rootfs') if arg == BASE else arg for arg in argv] for argv in build.sent]
    lines = {}
    for argv in sent:
        kind = argv[1] if argv[0] == 'machine' else 'pack'
        lines.setdefault(f'build {kind}' + (' -i' if '-i' in argv else ''), argv)
    agent = Recorder()
    agent._create(MachineSpec(name=AGENT, image=work / 'missing.smolmachine', image_key='k', cpus=2, memory_mib=2048,
                              labels={'claude-bottle.agent': 'a', 'claude-bottle.id': 'x1'},
                              env={'BOTTLE_TEST_SECRET': 'placeholder'}, door=work / 'door.sock',
                              guest_door='/run/claude-bottle/door.sock', workload=('sleep', 'infinity'),
                              disk_gib=20))
    agent._start(AGENT)
    agent.copy_in(AGENT, work / 'file', '/etc/cb-file', mode=0o644, uid=0, gid=0)
    agent.exec(AGENT, ['true'])
    agent.exec(AGENT, ['sh', '-s'], stdin=b'true')
    agent.exec(AGENT, ['true'], user='a')
    agent.exec(AGENT, ['sh', '-c', 'cat > "$tmp"'], stdin=b'', user='a')
    agent._stop(AGENT)
    agent._delete(AGENT)
    for name, argv in zip(('agent create', 'agent start', 'agent cp', 'agent exec', 'agent exec -i',
                           'agent exec as agent', 'agent exec -i as agent', 'agent stop', 'agent delete'),
                          agent.sent, strict=True):
        lines[name] = argv
    lines['agent attach'] = agent.attach_argv(AGENT, ['claude'], user='a', home='/home/a',
                                              env={'BOTTLE_TEST_SECRET': 'placeholder'})[1:]
    return lines


def on(argv: list[str], name: str) -> list[str]:
    """The same command line, about machine `name` instead."""
    def rename(arg: str) -> str:
        for machine in (BUILD, AGENT):
            if arg == machine:
                return name
            if arg.startswith(f'{machine}:'):
                return name + arg[len(machine):]
        return arg
    cut = argv.index('--') if '--' in argv else len(argv)
    return [rename(arg) for arg in argv[:cut]] + argv[cut:]


def with_flag(argv: list[str], *flag: str) -> list[str]:
    """argv with `flag` just before its `--` (or at its end), unless it has it already."""
    if flag[0] in argv:
        return argv
    cut = argv.index('--') if '--' in argv else len(argv)
    return argv[:cut] + list(flag) + argv[cut:]


def instead(argv: list[str], old: str, new: str) -> list[str]:
    return [new if arg == old else arg for arg in argv]


def command_lines(work: Path) -> list[list[str]]:
    """What both binaries are given, in this order."""
    b = backend_lines(work)
    rootfs, file, pack = str(work / 'rootfs'), str(work / 'file'), str(work / 'missing.smolmachine')
    create = b['build create']
    agent_create = with_flag(b['agent create'], '--overlay', '20')     # the manifest's resources.disk
    from_rootfs = instead(instead(agent_create, '--from', '--image'), pack, rootfs)   # it creates, so ls shows it
    needs_running = [b['build cp'], b['build exec -i'], b['agent exec'], b['agent exec as agent'],
                     b['agent exec -i as agent'], b['agent attach']]
    lines = [
        b['build ls'],
        create,
        b['build ls'],
        create,                                                      # twice: it exists
        *[on(argv, BUILD) for argv in needs_running],                # not running
        *[on(argv, MISSING) for argv in needs_running],              # no such machine
        on(b['agent start'], MISSING),                               # the one start that boots nothing
        b['build stop'],                                             # not running: said, exit 0
        on(b['build stop'], MISSING),
        b['build update'],
        on(b['build update'], MISSING),
        b['build pack'],                                             # never started
        on(b['build pack'], MISSING),
        b['agent create'],                                           # the pack is missing
        agent_create,
        from_rootfs,
        b['build ls'],
        *[on(argv, AGENT) for argv in needs_running],
        b['agent stop'],
        on(with_flag(create, '--storage', '30', '--overlay', '12'), 'cb-disks'),
        b['build ls'],
        ['machine', 'update', '--name', 'cb-disks', '--overlay', '8'],           # shrunk
        ['machine', 'update', '--name', 'cb-disks', '--overlay', '16', '--cpus', '2'],   # no disk yet
        ['machine', 'update', '--name', 'cb-disks', '--overlay', '16', '--storage', '40'],
        ['machine', 'delete', '--name', 'cb-disks'],                 # no -f, no terminal to ask on: refused
        b['agent delete'],
        b['build delete'],
        b['build delete'],                                           # twice: it is gone
        on(b['agent delete'], MISSING),
        on(b['agent delete'], 'cb-disks'),
        b['build ls'],
        # misspelt long flags: the most similar is suggested, and joins the usage
        ['machine', 'exec', '--nmae', BUILD, '--', 'true'],
        ['machine', 'exec', '--name', BUILD, '--intractive', '--', 'true'],
        ['machine', 'exec', '--name', BUILD, '--workdri', '/', '--', 'true'],
        ['machine', 'create', '--name', 'x', '--memory', '512'],
        ['machine', 'create', '--name', 'x', '--lable', 'k=v'],
        ['machine', 'create', '--name', 'x', '--mount-sockt', f'{work}/door.sock:/d'],
        ['machine', 'create', '--name', 'x', '--image', rootfs, '--overlya', '20', '--', 'sleep', 'infinity'],
        ['machine', 'create', '--name', 'x', '--evn', 'K=V'],
        ['machine', 'create', '--froom', pack],
        ['machine', 'ls', '--jsn'],
        ['machine', 'cp', file, f'{BUILD}:/etc/x', '--mod', '644'],
        ['machine', 'cp', file, f'{BUILD}:/etc/x', '--mode', '644', '--uidd', '0'],
        ['machine', 'update', '--name', BUILD, '--no-nett'],
        ['machine', 'update', '--nmae', BUILD, '--no-net'],
        ['machine', 'stop', '--nam', BUILD],
        ['machine', 'start', '--nmae', BUILD],
        ['machine', 'delete', '--name', BUILD, '--forse'],
        ['pack', 'create', '--from-mv', BUILD, '-o', f'{work}/out'],
        ['pack', 'create', '--from-vm', BUILD, '--ouput', f'{work}/out'],
        ['machine', 'exec', '--name', '--nmae', BUILD, '--', 'true'],
        ['machine', 'ls', '--zzzzzz'],
        # an unknown short flag
        ['machine', 'exec', '--name', BUILD, '-Z', '--', 'true'],
        ['machine', 'create', '--name', 'x', '-Z'],
        ['machine', 'ls', '-Z'],
        # missing arguments
        ['machine', 'exec', '--name', BUILD],
        ['machine', 'exec', '--name', BUILD, '-i', '--'],
        ['machine', 'update', '--no-net'],
        ['machine', 'delete', '-f'],
        ['machine', 'cp', file],
        ['pack', 'create', '--from-vm', BUILD],
        ['pack', 'create', '-o', f'{work}/out'],
        ['machine', 'exec', '--name'],
        ['machine', 'create', '--name', 'x', '--mount-socket'],
        # bad values
        ['machine', 'create', '--name', 'x', '--cpus', '0'],
        ['machine', 'create', '--name', 'x', '--cpus', 'abc'],
        ['machine', 'create', '--name', 'x', '--cpus', '300'],
        ['machine', 'create', '--name', 'x', '--mem', 'abc'],
        ['machine', 'create', '--name', 'x', '--mem', '10', '--image', rootfs],
        ['machine', 'create', '--name', 'x', '--overlay', 'abc'],
        ['machine', 'create', '--name', 'x', '--image', rootfs, '--overlay', '0'],
        ['machine', 'create', '--name', 'x', '--image', rootfs, '--storage', '0'],
        ['machine', 'create', '--name', 'x', '--image', rootfs, '--label', 'novalue'],
        ['machine', 'create', '--name', 'x', '--image', rootfs, '--label', '=v'],
        ['machine', 'create', '--name', 'cb-env', '--image', rootfs, '-e', '=v'],           # accepted
        ['machine', 'create', '--name', 'cb-relative', '--image', rootfs, '--mount-socket', 'relative:/x'],
        ['machine', 'ls', '--json'],
        ['machine', 'delete', '--name', 'cb-env', '-f'],
        ['machine', 'delete', '--name', 'cb-relative', '-f'],
        ['machine', 'create', '--name', 'x', '--image', rootfs, '--mount-socket', 'nocolon'],
        ['machine', 'create', '--name', 'x', '--image', rootfs, '--mount-socket', f'{work}/door.sock:relative'],
        ['machine', 'create', '--name', 'x', '--image', rootfs, '--mount-socket', ':/run/door.sock'],
        ['machine', 'create', '--name', '-bad', '--image', rootfs],
        ['machine', 'create', '--name', 'bad--name', '--image', rootfs],
        ['machine', 'create', '--name', 'bad/name', '--image', rootfs],
        ['machine', 'create', '--name', 'bad-', '--image', rootfs],
        ['machine', 'create', '--name', 'x', '--image', f'{work}/no-such-rootfs'],
        ['machine', 'create', '--name', 'x', '--from', pack, '--image', rootfs],
        ['machine', 'create', '--name', 'x', '--name', 'y'],
        ['machine', 'create', '--name', 'x', '--net=yes'],
        ['machine', 'exec', '--name', BUILD, '--timeout', 'soon', '--', 'true'],
        ['machine', 'cp', file, f'{BUILD}:/etc/x', '--uid', '-1'],
        ['machine', 'cp', file, f'{BUILD}:/etc/x', '--uid', 'root'],
        ['machine', 'cp', file, f'{work}/elsewhere'],
        # a positional where `last = true` wants `--`, and others where none is taken
        ['machine', 'create', '--name', 'x', '--image', rootfs, 'sleep', 'infinity'],
        ['machine', 'stop', BUILD],
        ['machine', 'delete', BUILD, '-f'],
        ['machine', 'ls', 'extra'],
        ['machine', 'exec', '--name', BUILD, 'true'],                # exec takes a command without `--`
        # unknown subcommands
        ['machine', 'frobnicate'],
        ['machine', 'exce', '--name', BUILD],
        ['pack', 'frobnicate'],
        ['frobnicate'],
        ['machine', '--frob', 'ls'],
        ['machine', '--nmae', 'exec', '--name', BUILD],              # a flag of the subcommand named after it
        ['machine'],                                                 # no subcommand: its help, on stderr
        ['machine', '--state-dir', f'{OWN}/state'],
        ['--stat-dir', f'{OWN}/state', 'machine', 'ls'],
        # the global options 1.32 has on every command
        ['--state-dir', f'{OWN}/state', 'machine', 'ls', '--json'],
        ['machine', '--state-dir', f'{OWN}/state', 'create', '--name', 'cb-elsewhere', '--image', rootfs],
        ['machine', 'ls', '--state-dir', f'{OWN}/state', '--json'],
        ['machine', 'ls', '--json'],                                 # not in the default state
        ['pack', 'create', '--state-dir', f'{OWN}/state', '--from-vm', 'cb-elsewhere', '-o', f'{work}/out'],
        ['machine', 'delete', '--state-dir', f'{OWN}/state', '--name', 'cb-elsewhere', '-f'],
        ['machine', 'ls', '--error-format', 'text'],
        ['--error-format', 'text', 'machine', 'exec', '--name', MISSING, '--', 'true'],
        ['machine', 'ls', '--error-format', 'xml'],
        ['machine', 'ls', '--state-dir'],
    ]
    return lines


def form(argv: list[str]) -> tuple:
    """A command line's shape: its command words, the flags before its `--`, whether it drops root."""
    words = tuple(arg for arg in argv[:2] if not arg.startswith('-'))
    head = argv[:argv.index('--')] if '--' in argv else argv
    return (words, frozenset(arg.split('=')[0] for arg in head if arg.startswith('-')), 'setpriv' in argv)


# -- running both

def fresh(own: Path) -> dict:
    """A state of its own for each binary: its HOME (the stand-in keeps its machines where smolvm does)."""
    home = own / 'home'
    home.mkdir(parents=True)
    return {'own': own, 'home': home}


def run(argv0: str, env: dict, own: Path, cwd: Path, argv: list[str]) -> tuple[int, str, str]:
    argv = [arg.replace(OWN, str(own)) for arg in argv]
    proc = subprocess.run([argv0, *argv], env=env, cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=CALL_SECONDS)
    return proc.returncode, proc.stdout, proc.stderr


def normalised(answer: tuple[int, str, str], own: Path) -> tuple[int, str, str]:
    """What must differ between the two, replaced: the binary's own directory, the time of a creation."""
    def same(text: str) -> str:
        text = text.replace(str(own), OWN)
        return re.sub(r'"created_at": \d+', '"created_at": 0', text)
    code, out, err = answer
    return code, same(out), same(err)


def differences(argv: list[str], real: tuple[int, str, str], standin: tuple[int, str, str]) -> list[str]:
    """Each way the stand-in's answer differs from the real one's (both normalised), said in full."""
    said = []
    for what, want, got in zip(('exit code', 'stdout', 'stderr'), real, standin):
        if want != got:
            said.append(f'{shlex.join(argv)}: {what} differs\n--- real smolvm {VERSION}:\n{want}\n'
                        f'--- stand-in:\n{got}')
    return said


@pytest.fixture
def both(tmp_path):
    """Each binary with a fresh state of its own, and the work directory both are run from."""
    found = binary(Path(os.environ[CACHE_ENV])) if os.environ.get(CACHE_ENV) else None
    if found is None:
        pytest.skip(f'the real smolvm {VERSION} is not installed: ./test.sh installs it (python -m tests.real_smolvm)')
    work = tmp_path / 'work'
    (work / 'rootfs' / 'etc').mkdir(parents=True)
    (work / 'rootfs' / 'etc' / 'os-release').write_text('ID=debian\n')
    (work / 'file').write_text('a host file\n')
    real, standin = fresh(tmp_path / 'real'), fresh(tmp_path / 'standin')
    path = os.environ['PATH']
    real['run'] = lambda argv: normalised(
        run(str(found), {'PATH': path, 'HOME': str(real['home'])}, real['own'], work, argv), real['own'])
    standin['run'] = lambda argv: normalised(
        run(str(STANDIN), {'PATH': path, 'HOME': str(standin['home']),
                           'SMOLVM_DATA_DIR': str(standin['home'] / '.cache' / 'smolvm')},
            standin['own'], work, argv), standin['own'])
    return {'work': work, 'real': real['run'], 'standin': standin['run']}


@pytest.mark.extended          # 133 command lines to each binary, in states of their own: a minute and more
def test_the_stand_in_answers_every_command_line_as_the_real_smolvm_does(both):
    said = []
    for argv in command_lines(both['work']):
        said += differences(argv, both['real'](argv), both['standin'](argv))
    assert not said, '\n\n'.join(said)


def test_the_stand_in_says_the_version_it_follows(both):
    code, real, _ = both['real'](['--version'])
    assert code == 0 and real == f'smolvm {VERSION}\n', real
    assert both['standin'](['--version']) == (0, f'smolvm {VERSION} (claude-bottle test stand-in)\n', '')


def test_a_difference_is_caught(both):
    """The comparison can fail: the stand-in given a misspelt flag where the real one has the right one, or
    holding a machine the real one has not; a created_at that differs only in its time is no difference."""
    listed = ['machine', 'ls', '--json']
    assert differences(listed, both['real'](listed), both['standin'](['machine', 'ls', '--jsn']))
    created = ['machine', 'create', '--name', 'cb-one', '--image', str(both['work'] / 'rootfs')]
    assert not differences(created, both['real'](created), both['standin'](created))
    assert not differences(listed, both['real'](listed), both['standin'](listed))
    assert both['standin'](instead(created, 'cb-one', 'cb-two'))[0] == 0      # the stand-in alone has it
    said = differences(listed, both['real'](listed), both['standin'](listed))
    assert len(said) == 1 and '"name": "cb-two"' in said[0], said
    now = normalised((0, '"created_at": 1796524041', ''), Path('/nowhere'))
    assert now == normalised((0, '"created_at": 1796524999', ''), Path('/nowhere')) == (0, '"created_at": 0', '')


@pytest.mark.extended          # a build, a launch and a teardown of its own
def test_the_list_holds_every_form_the_backend_sends(standin, tmp_path):
    """A stand-in launch and teardown send each form (command words and flags) that is in the list."""
    sent = sent_in_a_launch(standin)
    work = tmp_path / 'forms'
    (work / 'rootfs').mkdir(parents=True)
    listed = {form(argv) for argv in command_lines(work)}
    missing = sorted({shlex.join(argv) for argv in sent if form(argv) not in listed})
    assert missing == [], missing
    create = next(argv for argv in sent if form(argv)[0] == ('machine', 'create'))
    assert form(with_flag(create, '--nested')) not in listed         # a flag the backend does not send
    kinds = {form(argv)[0] for argv in sent}
    assert {('machine', 'ls'), ('machine', 'create'), ('machine', 'update'), ('pack', 'create'),
            ('machine', 'start'), ('machine', 'exec'), ('machine', 'cp'), ('machine', 'stop'),
            ('machine', 'delete')} <= kinds, kinds
