"""Records every program a Python process starts on the host, when CLAUDE_BOTTLE_AUDIT_LOG names a file: one
JSON line {"program", "by"} per start (`by`: the recording process's own program, as its argv[0] says). Loaded by every Python
whose PYTHONPATH has this directory first (tests/bottles.py `Bottles.record_host_programs`): doit, the
daemons, the mitmproxy environment's Python. Processes started without site (`python -S`: the git gate's
receive hooks) are not seen."""
import os
import sys

_LOG = os.environ.get('CLAUDE_BOTTLE_AUDIT_LOG')


def _record(program) -> None:
    import json
    if isinstance(program, bytes):
        program = os.fsdecode(program)
    line = json.dumps({'program': os.path.basename(str(program)),
                       'by': sys.argv[0] if sys.argv and sys.argv[0] else sys.executable})
    fd = os.open(_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + '\n').encode())
    finally:
        os.close(fd)


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


if _LOG:
    sys.addaudithook(_hook)
