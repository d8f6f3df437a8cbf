"""Records, when CLAUDE_BOTTLE_AUDIT_LOG names a file, what a Python process of the project does on the host:
every program it starts, one JSON line {"program", "by"} (`by`: the recording process's own program, as its
argv[0] says), and every file it writes under a project's state directory (`.bottle/`), one line
{"wrote", "writer"} (`writer`: module:function that wrote it, the atomic writer's caller for what goes through
daemons/atomic.py). Loaded by every Python whose PYTHONPATH has this directory first (tests/bottles.py
`Bottles.record_host_programs`): doit, the daemons, the mitmproxy environment's Python. Processes started
without site (`python -S`: the git gate's receive hooks) are not seen."""
import os
import sys

_LOG = os.environ.get('CLAUDE_BOTTLE_AUDIT_LOG')
_STATE = f'{os.sep}.bottle{os.sep}'
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PLUMBING = (f'daemons{os.sep}atomic.py', f'{os.sep}tempfile.py', f'{os.sep}pathlib.py', f'{os.sep}shutil.py')


def _line(entry: dict) -> None:
    import json
    fd = os.open(_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(entry) + '\n').encode())
    finally:
        os.close(fd)


def _record(program) -> None:
    if isinstance(program, bytes):
        program = os.fsdecode(program)
    _line({'program': os.path.basename(str(program)),
           'by': sys.argv[0] if sys.argv and sys.argv[0] else sys.executable})


def _writer() -> str:
    """module:function of the nearest caller that is not the writing plumbing (or this file)."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.endswith(_PLUMBING) or frame.f_code.co_filename == __file__
                                 or frame.f_code.co_filename.startswith('<frozen')):
        frame = frame.f_back
    if frame is None:
        return '?'
    return f'{frame.f_globals.get("__name__", "?")}:{frame.f_code.co_name}'


def _wrote(path) -> None:
    path = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    if _STATE in path and not os.path.basename(path).startswith('.'):     # not a temporary name: the file itself
        _line({'wrote': path, 'writer': _writer()})


def _hook(event: str, args: tuple) -> None:
    if event == 'subprocess.Popen':          # (executable, args, cwd, env)
        executable, argv = args[0], args[1]
        if executable is None:
            executable = argv if isinstance(argv, (str, bytes, os.PathLike)) else argv[0]
        _record(executable)
    elif event in ('os.posix_spawn', 'os.exec'):     # (path, argv, env)
        _record(args[0])
    elif event == 'os.system':
        _record('sh')
    elif event == 'os.rename':               # (src, dst, ...): os.replace too, the atomic writer's last step
        if isinstance(args[1], (str, bytes, os.PathLike)):
            _wrote(args[1])
    elif event == 'open':                    # (path, mode, flags)
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in 'wax+')) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writing and isinstance(path, (str, bytes, os.PathLike)):
            _wrote(path)


if _LOG:
    sys.addaudithook(_hook)
