"""Helpers for test suites that drive the smolvm stand-in (stdlib only).

Typical use in a pytest fixture::

    from tests.standin import harness

    rootfs = tmp_path / "tools-rootfs"
    index = tmp_path / "images.json"
    harness.write_image_index(index, {"tools": harness.make_tools_rootfs(rootfs)})
    env = {**os.environ, **harness.standin_env(tmp_path / "smolvm", index)}
    try:
        subprocess.run(["smolvm", "machine", "create", "--name", "a", "--image", "tools",
                        "--net", "--", "sleep", "infinity"], env=env, check=True)
        ...
    finally:
        harness.stop_all(tmp_path / "smolvm")

The stand-in itself is ``STANDIN_DIR / "smolvm"``; its docstring documents the
environment variables and knobs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

STANDIN_DIR = Path(__file__).resolve().parent
SMOLVM = STANDIN_DIR / "smolvm"

# Host directories bound read-only into a "tools" guest (only those that exist).
TOOLS_HOST_BINDS = ["/usr/bin", "/usr/sbin", "/usr/lib", "/usr/lib64", "/usr/libexec",
                    "/usr/share"]

_PASSWD = "root:x:0:0:root:/root:/bin/sh\n"
_GROUP = "root:x:0:\n"
_SHADOW = "root:*:19000:0:99999:7:::\n"
_GSHADOW = "root:*::\n"
_NSSWITCH = ("passwd: files\ngroup: files\nshadow: files\ngshadow: files\n"
             "hosts: files dns\nnetworks: files\n")
_HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def make_tools_rootfs(dest: Path) -> dict:
    """Build a tiny guest root at ``dest`` and return its image-index entry.

    The root holds etc/ (passwd, group, shadow, gshadow, nsswitch.conf, hosts,
    login.defs and ld.so.cache copied from the host when present, skel/), root/,
    home/, tmp/ (1777), var/{tmp,lib,log,cache}, run/, srv/, opt/, usr/local/{bin,sbin,lib,
    share} (writable in the guest), and the top-level bin/sbin/lib/lib64 entries shaped
    as on the host (merged-usr symlinks, or empty dirs to be bound).  The returned entry
    binds the host's /usr/bin, /usr/sbin, /usr/lib, /usr/lib64, /usr/libexec, /usr/share
    (those present) read-only, so sh, tar, useradd, setpriv, chown, python3... work.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for d in ("etc/skel", "root", "home", "var/tmp", "var/lib", "var/log", "var/cache",
              "run", "srv", "opt", "mnt", "usr/local/bin", "usr/local/sbin", "usr/local/lib",
              "usr/local/share", "workspace"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    (dest / "tmp").mkdir(exist_ok=True)
    os.chmod(dest / "tmp", 0o1777)
    os.chmod(dest / "var" / "tmp", 0o1777)
    os.chmod(dest / "root", 0o700)
    etc = dest / "etc"
    for name, text, mode in (("passwd", _PASSWD, 0o644), ("group", _GROUP, 0o644),
                             ("shadow", _SHADOW, 0o640), ("gshadow", _GSHADOW, 0o640),
                             ("nsswitch.conf", _NSSWITCH, 0o644), ("hosts", _HOSTS, 0o644)):
        p = etc / name
        p.write_text(text)
        os.chmod(p, mode)
    for name in ("login.defs", "ld.so.cache"):
        src = Path("/etc") / name
        if src.is_file():
            shutil.copyfile(src, etc / name)
    binds = []
    host_top = {}
    for d in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        p = Path("/") / d
        if p.is_symlink():
            host_top[d] = os.readlink(p)
        elif p.is_dir():
            host_top[d] = None
    for d, target in host_top.items():
        link = dest / d
        if link.is_symlink() or link.exists():
            continue
        if target is not None:
            os.symlink(target, link)
        else:  # not merged-usr: bind the host directory itself
            link.mkdir()
            binds.append(f"/{d}")
    for b in TOOLS_HOST_BINDS:
        if os.path.isdir(b):
            (dest / b.lstrip("/")).mkdir(parents=True, exist_ok=True)
            binds.append(b)
    return {"rootfs": str(dest), "host_ro_binds": binds}


def write_image_index(path: Path, entries: dict) -> None:
    """Write the SMOLVM_STANDIN_IMAGES index: ``{"<ref>": {"rootfs": ..., ...}}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(entries, indent=2, sort_keys=True))
    os.replace(tmp, path)


def standin_env(data_dir: Path, index: Path, latency_ms: int = 0) -> dict:
    """Environment additions that route ``smolvm`` to the stand-in.

    Returns PATH (STANDIN_DIR first), SMOLVM_DATA_DIR, SMOLVM_STANDIN_IMAGES and
    SMOLVM_STANDIN_LATENCY_MS; merge it over ``os.environ``.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": str(STANDIN_DIR) + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
        "SMOLVM_DATA_DIR": str(data_dir),
        "SMOLVM_STANDIN_IMAGES": str(index),
        "SMOLVM_STANDIN_LATENCY_MS": str(int(latency_ms)),
    }


def read_calls(data_dir: Path) -> list[dict]:
    """Every logged invocation, oldest first: ``{"argv", "rc", "start", "seconds"}``."""
    p = Path(data_dir) / "standin-calls.jsonl"
    try:
        text = p.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


_ALIASES = {"vm": "machine", "rm": "delete", "list": "ls", "sh": "shell"}


def call_path(call: dict) -> tuple:
    """The (normalised) subcommand words of a logged call, e.g. ('machine', 'cp')."""
    words = []
    for w in call.get("argv", [])[:2]:
        if w.startswith("-"):
            break
        words.append(_ALIASES.get(w, w))
    return tuple(words)


def count_calls(calls: list[dict], *path: str, rc: int | None = None) -> int:
    """Count calls whose subcommand path starts with ``path`` (aliases folded).

    ``count_calls(calls, "machine", "cp")``; ``rc=`` narrows to one exit code.
    """
    n = 0
    for c in calls:
        if call_path(c)[:len(path)] == tuple(path) and (rc is None or c.get("rc") == rc):
            n += 1
    return n


def _start_time(pid: int):
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    rest = data[data.rfind(b")") + 2:].split()
    if not rest or rest[0] in (b"Z", b"X"):
        return None
    return int(rest[19])


def _kill(pid: int, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except OSError:
        if group:
            _kill(pid, False)


def _vm_pids(state: dict) -> set:
    return {rec.get("pid") for rec in (state.get("machines") or {}).values() if rec.get("pid")}


def stop_all(data_dir: Path) -> None:
    """Kill every process the stand-in started under ``data_dir`` (VMs, workloads, execs).

    Safe to call from a pytest finalizer; it never touches processes of other data dirs.
    """
    data_dir = Path(data_dir).resolve()
    victims = []
    try:
        state = json.loads((data_dir / "state.json").read_text())
    except (OSError, ValueError):
        state = {}
    for rec in (state.get("machines") or {}).values():
        pid, st = rec.get("pid"), rec.get("pid_start_time")
        if pid and _start_time(pid) is not None and (st is None or _start_time(pid) == st):
            victims.append((pid, True))
    for procs in (data_dir / "vms").glob("*/procs"):
        for f in procs.iterdir():
            try:
                pid = int(f.name)
                st = f.read_text().strip()
            except (OSError, ValueError):
                continue
            if _start_time(pid) is not None and (not st or str(_start_time(pid)) == st):
                victims.append((pid, True))
    # Sweep: anything whose argv names this data dir (bwrap sandboxes) or whose
    # environment points SMOLVM_DATA_DIR at it (forked VM supervisors).
    me = os.getpid()
    needle = str(data_dir).encode()
    env_needle = b"SMOLVM_DATA_DIR=" + needle + b"\0"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid == me:
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        hit = needle + b"/" in cmd
        if not hit:
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                env = b""
            hit = env_needle in env and b"smolvm" in cmd
        if hit:
            victims.append((pid, False))
    # VM supervisors first, gracefully: on SIGTERM they kill and reap their workload.
    vms = [pid for pid, group in victims if group and pid in _vm_pids(state)]
    for pid in vms:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + 1.0
    while vms and time.monotonic() < deadline:
        if all(_start_time(pid) is None for pid in vms):
            break
        time.sleep(0.01)
    for pid, group in victims:
        _kill(pid, group)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if all(_start_time(pid) is None for pid, _ in victims):
            break
        time.sleep(0.01)


def run(env: dict, *args: str, input: bytes | str | None = None, timeout: float = 120,
        check: bool = False) -> subprocess.CompletedProcess:
    """Run ``smolvm ARGS`` with ``env`` (text mode unless ``input`` is bytes)."""
    text = not isinstance(input, bytes)
    return subprocess.run([str(SMOLVM), *args], env=env, input=input, capture_output=True,
                          text=text, timeout=timeout, check=check)
