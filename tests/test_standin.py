"""Tests of the smolvm stand-in (tests/standin/smolvm) itself.

Every test gets its own SMOLVM_DATA_DIR and kills what it started (harness.stop_all).
Expected message texts are smolvm 1.32.2's where tests/test_standin_vs_real.py compares them with the
real binary, elsewhere smolvm's source (v1.9.3); see the stand-in's docstring.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

try:
    from tests.standin import harness
except ImportError:  # tests/ is on sys.path (pytest rootdir-less prepend import mode)
    from standin import harness

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/bwrap")
                                and not any(os.access(os.path.join(p, "bwrap"), os.X_OK)
                                            for p in os.environ.get("PATH", "").split(":")),
                                reason="bubblewrap (bwrap) is required")


@pytest.fixture(scope="session")
def tools_index(tmp_path_factory):
    base = tmp_path_factory.mktemp("images")
    entry = harness.make_tools_rootfs(base / "tools")
    index = base / "images.json"
    harness.write_image_index(index, {"tools": entry})
    return index


class SV:
    def __init__(self, data: Path, env: dict, tmp: Path):
        self.data = data
        self.env = env
        self.tmp = tmp

    def __call__(self, *args, input=None, env=None, timeout=60):
        e = dict(self.env)
        if env:
            e.update(env)
        return harness.run(e, *args, input=input, timeout=timeout)

    def ok(self, *args, **kw):
        r = self(*args, **kw)
        assert r.returncode == 0, (args, r.returncode, r.stdout, r.stderr)
        return r

    def machine(self, name, *extra, cmd=("sleep", "infinity"), start=True):
        self.ok("machine", "create", "--name", name, "--image", "tools", "--net", *extra,
                "--", *cmd)
        if start:
            self.ok("machine", "start", "--name", name)

    def ls(self):
        return {m["name"]: m for m in json.loads(self.ok("machine", "ls", "--json").stdout)}

    def root(self, name):
        return Path(self.ok("machine", "data-dir", "--name", name).stdout.strip()) / "rootfs"


@pytest.fixture
def sv(tmp_path, tools_index):
    data = tmp_path / "smolvm-data"
    env = {**os.environ, **harness.standin_env(data, tools_index)}
    for k in ("SMOLVM_STANDIN_PACK_STALL_SECS",):
        env.pop(k, None)
    s = SV(data, env, tmp_path)
    yield s
    harness.stop_all(data)


def err_line(r):
    return r.stderr.strip().splitlines()[-1]


def _cmdline(proc: Path) -> list[str]:
    try:
        return proc.joinpath("cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:       # the process ended meanwhile
        return []


# ---------------------------------------------------------------------------
# grammar
# ---------------------------------------------------------------------------


def test_version_and_unknown_flag(sv):
    r = sv.ok("--version")
    assert r.stdout == "smolvm 1.32.2 (claude-bottle test stand-in)\n"
    r = sv("machine", "create", "--foo")
    assert r.returncode == 2
    assert "error: unexpected argument '--foo' found" in r.stderr
    assert "Usage: smolvm machine create" in r.stderr
    r = sv("machine", "ls", "--bogus")
    assert r.returncode == 2
    r = sv("machine", "frobnicate")
    assert r.returncode == 2 and "unrecognized subcommand 'frobnicate'" in r.stderr
    # exec has no -n (long --name only)
    r = sv("machine", "exec", "-n", "x", "--", "true")
    assert r.returncode == 2 and "unexpected argument '-n' found" in r.stderr
    # value parsers
    r = sv("machine", "create", "--cpus", "300")
    assert r.returncode == 2 and "invalid value '300' for '--cpus <N>'" in r.stderr
    r = sv("machine", "exec", "--timeout", "soon", "--", "true")
    assert r.returncode == 2
    r = sv("machine", "create", "--from", "x.smolmachine", "--image", "tools")
    assert r.returncode == 2 and "cannot be used with" in r.stderr
    r = sv("pack", "create", "-I", "tools")
    assert r.returncode == 2 and "--output <PATH>" in r.stderr


def test_positional_machine_name_is_usage_error(sv):
    for args in (("machine", "create", "myvm"), ("machine", "start", "myvm"),
                 ("machine", "stop", "myvm"), ("machine", "delete", "myvm", "-f"),
                 ("vm", "status", "myvm")):
        r = sv(*args)
        assert r.returncode == 2, args
        assert "unexpected argument 'myvm' found" in r.stderr
    r = sv("machine", "delete", "-f")
    assert r.returncode == 2
    assert "the following required arguments were not provided" in r.stderr
    assert "--name <NAME>" in r.stderr


def test_real_flags_are_accepted(sv, tmp_path):
    # the full create flag set parses (runtime refusals are exit 1, never 2)
    r = sv("machine", "create", "-n", "full", "-I", "tools", "--label", "a=b", "--cpus", "2",
           "--mem", "1024", "--storage", "30", "--overlay", "12", "--net", "--net-backend",
           "virtio-net", "--allow-host", "pypi.org", "--allow-cidr", "10.0.0.0/8",
           "--outbound-localhost-only", "--init", "true", "-e", "A=1", "-w", "/root",
           "--secret-env", "S=HOME", "--max-image-size", "1GiB", "-p", "8080:80", "--",
           "sleep", "infinity")
    assert r.returncode == 0, r.stderr
    r = sv("machine", "create", "-n", "gpu", "-I", "tools", "--net", "--gpu")
    assert r.returncode == 1 and "not simulated" in r.stderr
    r = sv("machine", "create", "-n", "bare")
    assert r.returncode == 1 and err_line(r) == \
        "Error: stand-in: bare machines (no --image/--from) are not simulated"
    r = sv("machine", "start", "-n", "full", "--proxy", "http://p:3128", "--no-proxy", "x")
    assert r.returncode == 0, r.stderr
    for args in (("machine", "exec", "--name", "full", "-w", "/", "-e", "X=1", "--timeout",
                  "30s", "--stream", "--", "true"),
                 ("machine", "status", "-n", "full", "--json"), ("machine", "list", "-v"),
                 ("machine", "stop", "-n", "full"),
                 ("machine", "update", "-n", "full", "--cpus", "3", "--mem", "2048",
                  "--no-net", "-e", "B=2", "--remove-env", "A", "-w", "/tmp")):
        r = sv(*args)
        assert r.returncode == 0, (args, r.stderr)


def test_name_rules(sv):
    cases = {
        "-bad": 'machine name must start with a letter or digit (got: "-bad")',
        "a--b": "machine name cannot contain consecutive hyphens",
        "bad-": 'machine name cannot end with a hyphen (got: "bad-")',
        "a.b": "machine name contains invalid character: '.'",
        "a/b": "machine name cannot contain path separators",
    }
    for name, msg in cases.items():
        r = sv("machine", "create", f"--name={name}", "--image", "tools", "--net")
        assert r.returncode == 1, name
        assert err_line(r) == f"Error: config operation failed: create machine: {msg}"
    # `--name -bad` is read by clap as flags
    r = sv("machine", "create", "--name", "-bad", "--image", "tools", "--net")
    assert r.returncode == 2
    assert sv.ls() == {}


# ---------------------------------------------------------------------------
# lifecycle and messages
# ---------------------------------------------------------------------------


def test_not_found_messages(sv, tmp_path):
    (tmp_path / "f").write_text("x")
    expect = {
        ("machine", "start", "--name", "ghost"): "Error: vm not found: ghost",
        ("machine", "stop", "--name", "ghost"): "Error: vm not found: ghost",
        ("machine", "delete", "--name", "ghost", "-f"): "Error: vm not found: ghost",
        ("machine", "rm", "-n", "ghost", "-f"): "Error: vm not found: ghost",
        ("machine", "exec", "--name", "ghost", "--", "true"): "Error: vm not found: ghost",
        ("machine", "cp", str(tmp_path / "f"), "ghost:/f"): "Error: vm not found: ghost",
        ("machine", "cp", "ghost:/f", str(tmp_path / "g")): "Error: vm not found: ghost",
        ("machine", "status", "--name", "ghost"): "Error: vm not found: ghost",
        ("machine", "status", "--name", "ghost", "--json"):
            "Error: config operation failed: machine status: machine 'ghost' not found",
        ("machine", "exec", "--", "true"):
            "Error: agent operation failed: connect: machine 'default' not found",
        ("pack", "create", "--from-vm", "ghost", "-o", str(tmp_path / "o")):
            "Error: agent operation failed: pack from VM: VM 'ghost' not found",
        ("machine", "create", "--name", "x", "--from", str(tmp_path / "nope.smolmachine")):
            "Error: config operation failed: create from .smolmachine: file not found: "
            + str(tmp_path / "nope.smolmachine"),
        ("machine", "update", "-n", "ghost", "--cpus", "2"):
            "Error: config operation failed: update: machine 'ghost' not found",
    }
    for args, msg in expect.items():
        r = sv(*args)
        assert r.returncode == 1, (args, r.stderr)
        assert err_line(r) == msg, args
    assert not (tmp_path / "g").exists()
    r = sv.ok("machine", "status")
    assert r.stdout.strip() == "Machine 'default': not running"
    assert sv.ok("machine", "ls").stdout.strip() == "No machines found"
    assert sv.ok("machine", "ls", "--json").stdout.strip() == "[]"


def test_registry_image_needs_network(sv):
    r = sv("machine", "create", "--name", "n", "--image", "tools", "--", "sleep", "1")
    assert r.returncode == 1
    assert err_line(r).startswith(
        "Error: config operation failed: create machine: image 'tools' must be pulled from a "
        "registry, but this machine has no network, so the pull can never succeed. Add --net")
    for extra in (["--allow-host", "example.com"], ["--allow-cidr", "10.0.0.0/8"],
                  ["-p", "8080:80"]):
        sv.ok("machine", "create", "--name", f"n{len(extra[1])}", "--image", "tools", *extra)


def test_lifecycle_messages(sv):
    r = sv.ok("machine", "create", "--name", "m", "--image", "tools", "--net", "--label",
              "owner=bottle", "--", "sleep", "infinity")
    assert r.stdout.splitlines()[:2] == ["Created machine: m", "  CPUs: 4, Memory: 8192 MiB"]
    r = sv("machine", "create", "--name", "m", "--image", "tools", "--net")
    assert r.returncode == 1
    assert err_line(r) == ("Error: config operation failed: create machine: machine 'm' "
                           "already exists or is being created")
    r = sv("machine", "exec", "--name", "m", "--", "true")
    assert r.returncode == 1
    assert err_line(r) == ("Error: agent operation failed: connect: machine 'm' is not running. "
                           "Start it with 'smolvm machine start --name m'; if a start is already in "
                           "progress, retry once it finishes.")
    r = sv.ok("machine", "stop", "--name", "m")
    assert r.stdout.strip() == "Machine 'm' is not running (state: created)"
    assert sv.ok("machine", "status", "--name", "m").stdout.strip() == "Machine 'm': created"
    r = sv.ok("machine", "start", "--name", "m")
    assert "Pulling tools..." in r.stderr
    pid = sv.ls()["m"]["pid"]
    assert r.stdout.strip() == f"Machine 'm' running (PID: {pid})"
    r = sv.ok("machine", "start", "--name", "m")
    assert r.stdout.strip() == f"Machine 'm' already running (PID: {pid})"
    assert sv.ok("machine", "status", "--name", "m").stdout.strip() == \
        f"Machine 'm': running (PID: {pid})"
    r = sv.ok("machine", "stop", "--name", "m")
    assert r.stdout.splitlines() == ["Stopping machine 'm'...", "Stopped machine: m"]
    assert not harness._start_time(pid)
    r = sv.ok("machine", "stop", "--name", "m")
    assert r.stdout.strip() == "Machine 'm' is not running (state: stopped)"
    m = sv.ls()["m"]
    assert m["state"] == "stopped" and m["pid"] is None and m["labels"] == {"owner": "bottle"}
    # second start: no pull
    r = sv.ok("machine", "start", "--name", "m")
    assert "Pulling" not in r.stderr
    # a reference missing from the image index fails the first start like a pull failure
    sv.ok("machine", "create", "--name", "u", "--image", "ghcr.io/nobody/unknown:1", "--net")
    r = sv("machine", "start", "--name", "u")
    assert r.returncode == 1
    assert "Pulling ghcr.io/nobody/unknown:1..." in r.stderr
    assert err_line(r).startswith("Error: agent operation failed: pull image: ")
    assert sv.ls()["u"]["state"] == "created"


def test_delete_prompt_and_force(sv):
    sv.machine("d")
    root = sv.root("d")
    pid = sv.ls()["d"]["pid"]
    r = sv("machine", "delete", "--name", "d", input="y\n")     # no terminal: no question
    assert r.returncode == 1 and err_line(r) == (
        "Error: agent operation failed: delete: machine 'd' needs confirmation but stdin is not a "
        "terminal; pass --force to delete it, or --cascade to remove it together with any machines "
        "branched from it")
    assert "d" in sv.ls()
    for answer in (b"\n", b"n\n"):                                   # on a terminal it asks
        terminal, stdin = pty.openpty()
        os.write(terminal, answer)
        r = subprocess.run([str(harness.SMOLVM), "machine", "delete", "--name", "d"], env=sv.env,
                           stdin=stdin, capture_output=True, text=True, timeout=60)
        os.close(stdin)
        os.close(terminal)
        assert r.returncode == 0 and "Delete machine 'd'? [y/N] " in r.stderr
        assert r.stdout.strip().splitlines()[-1] == "Cancelled"
    assert "d" in sv.ls()
    sv.ok("machine", "start", "--name", "d")
    pid = sv.ls()["d"]["pid"]
    r = sv.ok("machine", "delete", "--name", "d", "-f")
    assert r.stdout.splitlines() == ["Stopping machine 'd'...",
                                     "Cleaning up data directory for vm: d", "Deleted machine: d"]
    assert "d" not in sv.ls()
    assert not root.exists()
    assert not harness._start_time(pid)
    # the name is free again
    sv.ok("machine", "create", "--name", "d", "--image", "tools", "--net")
    r = sv.ok("machine", "rm", "-n", "d", "-f")
    assert r.stdout.splitlines() == ["Deleted machine: d"]  # never started: no data dir


def test_ls_json_fields_and_types(sv):
    sv.machine("j", "--label", "k=v", "--cpus", "2", "--mem", "1024")
    sv.ok("machine", "create", "--name", "j2", "--image", "tools", "--allow-cidr", "1.1.1.1")
    fields = {
        "name": str, "state": str, "pid": (int, type(None)), "created_at": int,
        "ephemeral": bool, "cpus": int, "memory_mib": int, "mounts": int, "ports": int,
        "storage_gb": (int, type(None)), "overlay_gb": (int, type(None)), "network": bool,
        "image": (str, type(None)), "entrypoint": list, "cmd": list, "gpu": bool,
        "gpu_vram_mib": (int, type(None)), "cuda": bool, "forkable": bool,
        "cuda_fork_pool_size": (int, type(None)), "cuda_vram_limit_mib": (int, type(None)),
        "forkpoint_held": bool, "labels": dict, "restart_policy": str,
        "restart_max_retries": int, "restart_count": int, "health_cmd": (str, type(None)),
        "health_interval_secs": (int, type(None)), "health_timeout_secs": (int, type(None)),
        "health_retries": (int, type(None)), "health_startup_grace_secs": (int, type(None)),
        "block_io": str, "branchable": bool, "branchpoint_held": bool,
        "cuda_branch_pool_size": (int, type(None)), "detached": bool, "disk_durability": str,
        "disks": list, "parent_machine": (str, type(None)), "state_reason": (str, type(None)),
    }
    raw = sv.ok("machine", "ls", "--json").stdout
    data = json.loads(raw)
    assert isinstance(data, list) and len(data) == 2
    for m in data:
        assert set(m) == set(fields)
        for k, t in fields.items():
            assert isinstance(m[k], t), (k, m[k])
            if t is int:
                assert not isinstance(m[k], bool), k
    j = {m["name"]: m for m in data}
    assert j["j"]["state"] == "running" and j["j"]["cpus"] == 2 and j["j"]["memory_mib"] == 1024
    assert j["j"]["labels"] == {"k": "v"} and j["j"]["cmd"] == ["sleep", "infinity"]
    assert j["j"]["image"] == "tools" and j["j"]["network"] is True
    assert j["j2"]["state"] == "created" and j["j2"]["pid"] is None
    assert j["j2"]["network"] is True and j["j2"]["restart_policy"] == "never"
    # serde_json pretty format: sorted keys, two-space indent
    assert raw.startswith('[\n  {\n    "block_io": "sync",\n    "branchable": false,')
    st = json.loads(sv.ok("machine", "status", "--name", "j", "--json").stdout)
    assert set(st) == set(fields) and st["pid"] == j["j"]["pid"]


def test_vm_process_death_and_workload_exit(sv):
    sv.machine("w", cmd=("/bin/true",))
    time.sleep(0.2)
    # the workload exited, the machine (VM process) keeps running, as in smolvm
    assert sv.ls()["w"]["state"] == "running"
    sv.ok("machine", "exec", "--name", "w", "--", "true")
    pid = sv.ls()["w"]["pid"]
    os.killpg(pid, signal.SIGKILL)
    deadline = time.time() + 5
    while harness._start_time(pid) and time.time() < deadline:
        time.sleep(0.02)
    m = sv.ls()["w"]
    assert m["state"] == "stopped"
    r = sv("machine", "exec", "--name", "w", "--", "true")
    assert r.returncode == 1 and "is not running" in r.stderr
    assert sv.ok("machine", "stop", "--name", "w").stdout.strip() == \
        "Machine 'w' is not running (state: stopped)"
    r = sv.ok("machine", "start", "--name", "w")
    assert "running (PID:" in r.stdout


# ---------------------------------------------------------------------------
# guest execution
# ---------------------------------------------------------------------------


def test_exec_runs_in_isolated_root(sv, tmp_path):
    marker = Path("/root") / f"standin-host-marker-{os.getpid()}"
    try:
        marker.write_text("host")
    except OSError:
        marker = None
    sv.ok("machine", "create", "--name", "iso", "--image", "tools", "--net", "-e", "FWD",
          "-e", "SET=1", "--", "sleep", "infinity", env={"FWD": "forwarded"})
    sv.ok("machine", "start", "--name", "iso")
    r = sv.ok("machine", "exec", "--name", "iso", "--", "sh", "-c", "echo $FWD$SET")
    assert r.stdout == "forwarded1\n"
    r = sv.ok("machine", "exec", "--name", "iso", "--", "sh", "-c",
              "echo guest > /root/written-in-guest; ls /root; hostname; id -u; cat /etc/hostname"
              " 2>/dev/null || echo no-etc-hostname; echo $HOME; pwd")
    lines = r.stdout.splitlines()
    assert "written-in-guest" in lines
    if marker is not None:
        assert marker.name not in lines
    assert "iso" in lines and "0" in lines and "no-etc-hostname" in lines and "/root" in lines
    assert (sv.root("iso") / "root" / "written-in-guest").read_text() == "guest\n"
    assert not Path("/root/written-in-guest").exists()
    # the guest sees its own process tree only
    r = sv.ok("machine", "exec", "--name", "iso", "--", "sh", "-c", "ls /proc | grep -c '^[0-9]'")
    assert int(r.stdout.strip()) <= 4
    # env is cleared; -e and workdir apply
    r = sv.ok("machine", "exec", "--name", "iso", "-e", "FOO=bar", "-w", "/tmp", "--", "sh",
              "-c", "echo $FOO; pwd; env | sort | cut -d= -f1 | tr '\\n' ' '")
    out = r.stdout.splitlines()
    assert out[0] == "bar" and out[1] == "/tmp"
    assert set(out[2].split()) <= {"FOO", "FWD", "SET", "HOME", "PATH", "PWD", "SHLVL", "_"}
    if marker is not None:
        marker.unlink()


def test_exec_stdin_exit_code_timeout(sv):
    sv.machine("x")
    r = sv.ok("machine", "exec", "--name", "x", "-i", "--", "cat", input="piped data\n")
    assert r.stdout == "piped data\n"
    r = sv.ok("machine", "exec", "--name", "x", "--", "sh", "-c", "cat; echo done",
              input="not forwarded\n")
    assert r.stdout == "done\n"
    r = sv("machine", "exec", "--name", "x", "--", "sh", "-c", "echo out; echo err >&2; exit 42")
    assert (r.returncode, r.stdout, r.stderr) == (42, "out\n", "err\n")
    # the timeout ends a command that would never end by itself, and kills it
    r = sv("machine", "exec", "--name", "x", "--timeout", "1s", "--", "sh", "-c",
           "echo partial; sleep 86399; echo finished")
    assert r.returncode == 124
    assert r.stdout == "partial\n" and "command timed out after 1000ms" in r.stderr
    assert not [p for p in Path("/proc").glob("[0-9]*") if _cmdline(p) == ["sleep", "86399"]]
    # trailing_var_arg: everything after the first positional goes to the guest
    r = sv.ok("machine", "exec", "--name", "x", "echo", "--name", "-e", "--")
    assert r.stdout == "--name -e --\n"
    # detached exec survives the CLI call and dies with the machine
    r = sv.ok("machine", "exec", "--name", "x", "-d", "--", "sleep", "300")
    dpid = int(r.stdout.strip())
    assert harness._start_time(dpid)
    sv.ok("machine", "stop", "--name", "x")
    assert not harness._start_time(dpid)


def test_secret_env_never_written(sv):
    secret = "sEcReT-" + os.urandom(8).hex()
    env = {"BOTTLE_TOKEN": secret}
    sv.ok("machine", "create", "--name", "s", "--image", "tools", "--net", "--secret-env",
          "REC_TOKEN=BOTTLE_TOKEN", "--", "sleep", "infinity", env=env)
    sv.ok("machine", "start", "--name", "s", env=env)
    r = sv.ok("machine", "exec", "--name", "s", "--secret-env", "TOKEN=BOTTLE_TOKEN", "--", "sh",
              "-c", 'echo "$TOKEN"; echo "$REC_TOKEN"', env=env)
    assert r.stdout.splitlines() == [secret, secret]
    r = sv("machine", "exec", "--name", "s", "--secret-env", "TOKEN=UNSET_VAR_XYZ", "--", "true",
           env=env)
    assert r.returncode == 1
    assert err_line(r) == "Error: config operation failed: resolve secret 'TOKEN': env_unset"
    sv.ok("machine", "stop", "--name", "s")
    sv.ok("pack", "create", "--from-vm", "s", "-o", str(sv.tmp / "spack"))
    hits = []
    for base in (sv.data, sv.tmp):
        for p in base.rglob("*"):
            if p.is_file() and not p.is_symlink():
                try:
                    if secret.encode() in p.read_bytes():
                        hits.append(p)
                except OSError:
                    pass
    assert hits == []
    # a pack that carries secret refs is refused by create --from
    r = sv("machine", "create", "--name", "s2", "--from", str(sv.tmp / "spack.smolmachine"))
    assert r.returncode == 1
    assert "(packs may not carry secret refs)" in r.stderr


def test_cp_rules(sv, tmp_path):
    f = tmp_path / "in.txt"
    f.write_text("payload\n")
    (tmp_path / "adir").mkdir()
    sv.ok("machine", "create", "--name", "c", "--image", "tools", "--net", "--", "sleep",
          "infinity")
    r = sv("machine", "cp", str(f), "c:/x")
    assert r.returncode == 1 and err_line(r) == (
        "Error: agent operation failed: connect: machine 'c' is not running. "
        "Start it with 'smolvm machine start --name c'; if a start is already in progress, retry "
        "once it finishes.")
    sv.ok("machine", "start", "--name", "c")
    r = sv("machine", "cp", str(tmp_path / "adir"), "c:/adir")
    assert r.returncode == 1
    assert err_line(r) == "Error: agent operation failed: read source file: Is a directory (os error 21)"
    r = sv("machine", "cp", str(f), "c:/tmp/../etc/passwd")
    assert r.returncode == 1
    assert err_line(r) == ("Error: agent operation failed: write file: invalid guest path "
                           "/tmp/../etc/passwd: parent traversal is not allowed")
    r = sv("machine", "cp", str(f), str(tmp_path / "other"))
    assert r.returncode == 1 and "one of SRC or DST must use machine:path syntax" in r.stderr
    r = sv("machine", "cp", "--mode", "600", "c:/etc/passwd", str(tmp_path / "p"))
    assert r.returncode == 1 and "apply to uploads only" in r.stderr
    sv.ok("machine", "cp", "--mode", "640", "--uid", "1234", "--gid", "4321", str(f),
          "c:deep/new/dir/file.txt")
    target = sv.root("c") / "deep/new/dir/file.txt"
    st = target.stat()
    assert (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid) == ("0o640", 1234, 4321)
    assert target.read_text() == "payload\n"
    assert not [p for p in target.parent.iterdir() if "smolvm-upload" in p.name]
    sv.ok("machine", "cp", str(f), "c:/plain.txt")
    assert oct((sv.root("c") / "plain.txt").stat().st_mode & 0o777) == "0o644"
    # download, including what the guest itself wrote
    sv.ok("machine", "exec", "--name", "c", "--", "sh", "-c", "echo from-guest > /root/g.txt")
    sv.ok("machine", "cp", "c:/root/g.txt", str(tmp_path / "g.txt"))
    assert (tmp_path / "g.txt").read_text() == "from-guest\n"
    r = sv("machine", "cp", "c:/etc", str(tmp_path / "e"))
    assert r.returncode == 1 and err_line(r) == \
        "Error: agent operation failed: read file: not a regular file: /etc"
    assert not (tmp_path / "e").exists()
    r = sv("machine", "cp", "c:/missing", str(tmp_path / "m"))
    assert r.returncode == 1 and "failed to open /missing: No such file or directory" in r.stderr
    # guest symlinks resolve inside the guest root, never on the host
    sv.ok("machine", "exec", "--name", "c", "--", "ln", "-s", "/etc", "/root/etclink")
    sv.ok("machine", "cp", str(f), "c:/root/etclink/standin-test")
    assert (sv.root("c") / "etc/standin-test").exists()
    assert not Path("/etc/standin-test").exists()


# ---------------------------------------------------------------------------
# packs
# ---------------------------------------------------------------------------


def test_pack_preconditions(sv, tmp_path):
    out = str(tmp_path / "o")
    sv.machine("p")
    r = sv("pack", "create", "--from-vm", "p", "-o", out)
    assert r.returncode == 1 and err_line(r) == (
        "Error: agent operation failed: pack from VM: VM 'p' is running. Stop it first with: "
        "smolvm machine stop --name p")
    sv.ok("machine", "stop", "--name", "p")
    r = sv("pack", "create", "--from-vm", "p", "-o", out + ".smolmachine")
    assert r.returncode == 1 and err_line(r) == (
        "Error: config operation failed: pack create: --output names the executable stub, not "
        "the .smolmachine sidecar (which is created automatically as '<output>.smolmachine'). "
        f"Use --output {out} instead.")
    # never started
    sv.ok("machine", "create", "--name", "fresh", "--image", "tools", "--net")
    r = sv("pack", "create", "--from-vm", "fresh", "-o", out)
    assert r.returncode == 1
    assert r.stderr.startswith("Error: agent operation failed: pack from VM: machine 'fresh' "
                               "has no storage disk yet (")
    assert "it has never been started" in r.stderr
    assert err_line(r) == ("Or pack the image it was created from directly with "
                           "`pack create -I <image>`.")
    # created from a local archive / directory
    rootfs = tmp_path / "lr"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "marker").write_text("local-rootfs\n")
    with tarfile.open(tmp_path / "lr.tar", "w") as t:
        t.add(rootfs, arcname=".")
    sv.ok("machine", "create", "--name", "loc", "--image", str(tmp_path / "lr.tar"))
    sv.ok("machine", "start", "--name", "loc")
    sv.ok("machine", "cp", "loc:/etc/marker", str(tmp_path / "marker"))
    assert (tmp_path / "marker").read_text() == "local-rootfs\n"
    assert sv.ls()["loc"]["image"].startswith("local:")
    sv.ok("machine", "stop", "--name", "loc")
    r = sv("pack", "create", "--from-vm", "loc", "-o", out)
    assert r.returncode == 1
    assert err_line(r).startswith("Error: agent operation failed: pack from VM: VM 'loc' was "
                                  "created from a local image (local:")
    sv.ok("machine", "create", "--name", "locdir", "--image", str(rootfs) + "/")
    assert sv.ls()["locdir"]["image"] == "local-dir:" + str(rootfs.resolve())
    r = sv("pack", "create", "--from-vm", "locdir", "-o", out)     # 1.32: never started, first
    assert r.returncode == 1 and "machine 'locdir' has no storage disk yet" in r.stderr
    sv.ok("machine", "start", "--name", "locdir")
    sv.ok("machine", "stop", "--name", "locdir")
    r = sv("pack", "create", "--from-vm", "locdir", "-o", out)
    assert r.returncode == 1 and "was created from a local image (local-dir:" in r.stderr
    # pack create --image <local path> is a registry pull in real smolvm: refused
    r = sv("pack", "create", "--image", str(tmp_path / "lr.tar"), "-o", out)
    assert r.returncode == 1 and "Error: agent operation failed: pull image:" in r.stderr
    # the happy path writes the stub and the sidecar
    r = sv.ok("pack", "create", "--from-vm", "p", "-o", out)
    assert f"Packed: {out}" in r.stdout and f"Assets: {out}.smolmachine" in r.stdout
    assert os.access(out, os.X_OK) and Path(out + ".smolmachine").is_file()
    assert not Path(out + ".smolmachine.smolmachine").exists()


def test_create_from_pack_carries_state(sv, tmp_path):
    sv.machine("src", "--cpus", "2", "--mem", "2048", "--allow-host", "pypi.org", "-e",
               "SRC_ENV=1", "-w", "/root")
    sv.ok("machine", "exec", "--name", "src", "--", "sh", "-c",
          "useradd -m -u 1500 agent && echo baked > /home/agent/state.txt && "
          "chown agent /home/agent/state.txt && echo tmpfile > /tmp/gone")
    sv.ok("machine", "stop", "--name", "src")
    pack = tmp_path / "base"
    sv.ok("pack", "create", "--from-vm", "src", "-o", str(pack), "--cpus", "3")
    with tarfile.open(str(pack) + ".smolmachine") as t:
        names = t.getnames()
        manifest = json.load(t.extractfile("manifest.json"))
    assert "rootfs/home/agent/state.txt" in names and "rootfs/tmp/gone" not in names
    assert manifest["network"] is True and manifest["cmd"] == ["sleep", "infinity"]
    assert manifest["cpus"] == 3 and manifest["mem"] == 8192
    assert manifest["entrypoint"] == ["/bin/sh"] and manifest["workdir"] == "/root"
    assert "SRC_ENV=1" in manifest["env"]
    assert "pypi.org" not in json.dumps(manifest)
    r = sv.ok("machine", "create", "--name", "dst", "--from", str(pack) + ".smolmachine", "-e",
              "EXTRA=2", "--", "sleep", "infinity")
    assert r.stdout.startswith("Extracting .smolmachine assets...\nCreated machine: dst\n")
    m = sv.ls()["dst"]
    assert (m["cpus"], m["memory_mib"], m["network"], m["cmd"], m["entrypoint"]) == \
        (3, 8192, True, ["sleep", "infinity"], [])
    assert m["image"] == "tools"
    # the pack is no longer needed once extracted
    Path(str(pack) + ".smolmachine").rename(tmp_path / "moved.smolmachine")
    sv.ok("machine", "start", "--name", "dst")
    r = sv.ok("machine", "exec", "--name", "dst", "--", "sh", "-c",
              "id -u agent; stat -c %u /home/agent/state.txt; cat /home/agent/state.txt; "
              "echo $SRC_ENV$EXTRA; pwd; ls /tmp | wc -l")
    assert r.stdout.split() == ["1500", "1500", "baked", "12", "/root", "0"]
    # no --net given, but the pack's network=true is ORed in: the host network is shared
    r = sv.ok("machine", "exec", "--name", "dst", "--", "grep", "-c", ":", "/proc/net/dev")
    host = sum(1 for line in Path("/proc/net/dev").read_text().splitlines() if ":" in line)
    assert host > 1 and int(r.stdout) == host
    # non-default flags win over the manifest; the pack's cmd is used without `--`
    sv.ok("machine", "create", "--name", "dst2", "--from", str(tmp_path / "moved.smolmachine"),
          "--cpus", "1", "--mem", "512")
    m = sv.ls()["dst2"]
    assert (m["cpus"], m["memory_mib"], m["cmd"], m["entrypoint"]) == \
        (1, 512, ["sleep", "infinity"], ["/bin/sh"])
    # a pack from a --from machine works without starting it (disks exist since create)
    sv.ok("pack", "create", "--from-vm", "dst2", "-o", str(tmp_path / "again"))


def test_pack_from_image_has_no_network(sv, tmp_path):
    pack = tmp_path / "img"
    r = sv.ok("pack", "create", "-I", "tools", "-o", str(pack), "--entrypoint", "/bin/sleep")
    assert "Image: tools" in r.stdout
    sv.ok("machine", "create", "--name", "offline", "--from", str(pack) + ".smolmachine", "--",
          "sleep", "infinity")
    m = sv.ls()["offline"]
    assert m["network"] is False and m["cpus"] == 4
    # --net is ORed with the manifest's network
    sv.ok("machine", "create", "--name", "ored", "--from", str(pack) + ".smolmachine", "--net")
    assert sv.ls()["ored"]["network"] is True
    r = sv("pack", "create", "-I", "tools", "-o", str(tmp_path / "sf"), "--single-file")
    assert r.returncode == 1 and "not simulated" in r.stderr
    sv.ok("machine", "start", "--name", "offline")
    r = sv.ok("machine", "exec", "--name", "offline", "--", "sh", "-c",
              "grep -c : /proc/net/dev")
    assert r.stdout.strip() == "1"  # loopback only
    # and a --net machine shares the host network
    sv.machine("online")
    r = sv.ok("machine", "exec", "--name", "online", "--", "sh", "-c", "grep -c : /proc/net/dev")
    host = sum(1 for line in Path("/proc/net/dev").read_text().splitlines() if ":" in line)
    assert int(r.stdout.strip()) == host
    # update --no-net on the stopped machine removes it
    sv.ok("machine", "stop", "--name", "online")
    r = sv("machine", "update", "-n", "offline", "--cpus", "2")
    assert r.returncode == 1 and err_line(r) == \
        "Error: invalid vm state: expected stopped, got Running"
    r = sv.ok("machine", "update", "-n", "online", "--no-net")
    assert "  network: disabled" in r.stdout
    assert sv.ls()["online"]["network"] is False


def test_pack_kill_midway_leaves_unusable_payload(sv, tmp_path):
    sv.machine("k")
    sv.ok("machine", "stop", "--name", "k")
    out = tmp_path / "k"
    env = dict(sv.env, SMOLVM_STANDIN_PACK_STALL_SECS="30")
    p = subprocess.Popen([str(harness.SMOLVM), "pack", "create", "--from-vm", "k", "-o",
                          str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sidecar = Path(str(out) + ".smolmachine")
    deadline = time.time() + 20
    while time.time() < deadline and not (sidecar.exists() and sidecar.stat().st_size > 0):
        time.sleep(0.02)
    assert out.exists() and sidecar.stat().st_size > 0
    p.kill()
    p.wait()
    r = sv("machine", "create", "--name", "k2", "--from", str(sidecar))
    assert r.returncode == 1
    assert err_line(r).startswith("Error: agent operation failed: read .smolmachine:")
    assert "k2" not in sv.ls()


# ---------------------------------------------------------------------------
# concurrency, call log, knobs
# ---------------------------------------------------------------------------


def test_parallel_invocations_keep_state_consistent(sv):
    names = [f"par{i}" for i in range(8)]
    results = {}

    def worker(n):
        rs = [sv("machine", "create", "--name", n, "--image", "tools", "--net", "--label",
                 f"who={n}", "--", "sleep", "infinity"),
              sv("machine", "start", "--name", n),
              sv("machine", "exec", "--name", n, "--", "sh", "-c", f"echo {n} > /root/me; cat /root/me"),
              sv("machine", "ls", "--json")]
        results[n] = rs

    threads = [threading.Thread(target=worker, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n in names:
        rs = results[n]
        assert [r.returncode for r in rs] == [0, 0, 0, 0], [(r.args, r.stderr) for r in rs]
        assert rs[2].stdout.strip() == n
        json.loads(rs[3].stdout)
    ls = sv.ls()
    assert set(ls) == set(names)
    assert all(m["state"] == "running" and m["labels"] == {"who": n} for n, m in ls.items())
    assert len({m["pid"] for m in ls.values()}) == 8
    for n in names:
        assert (sv.root(n) / "root" / "me").read_text() == n + "\n"
    # racing creates of one name: exactly one wins
    rs = []
    ts = [threading.Thread(target=lambda: rs.append(
        sv("machine", "create", "--name", "same", "--image", "tools", "--net")))
        for _ in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted(r.returncode for r in rs) == [0, 1, 1, 1, 1, 1]
    calls = harness.read_calls(sv.data)
    assert harness.count_calls(calls, "machine", "create") == 14
    assert harness.count_calls(calls, "machine", "exec") == 8


def test_call_log(sv):
    sv("machine", "ls", "--json")
    sv("machine", "bogus")
    sv("machine", "start", "--name", "nope")
    sv("vm", "list")
    calls = harness.read_calls(sv.data)
    assert [c["argv"] for c in calls] == [["machine", "ls", "--json"], ["machine", "bogus"],
                                          ["machine", "start", "--name", "nope"], ["vm", "list"]]
    assert [c["rc"] for c in calls] == [0, 2, 1, 0]
    assert all(isinstance(c["start"], float) and c["seconds"] >= 0 for c in calls)
    assert harness.count_calls(calls, "machine", "ls") == 2
    assert harness.count_calls(calls, "machine", rc=2) == 1


def test_latency_knob_delays_a_call_before_it_does_anything(sv):
    # A call held by a ten-minute latency is overtaken by a machine created and started after it.
    env = {**sv.env, "SMOLVM_STANDIN_LATENCY_MS": "600000"}
    held = subprocess.Popen([str(harness.SMOLVM), "machine", "create", "--name", "held", "--image",
                             "tools", "--", "sleep", "infinity"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sv.machine("later")
        assert held.poll() is None
        assert set(sv.ls()) == {"later"}
        assert [c["argv"][1] for c in harness.read_calls(sv.data)] == ["create", "start", "ls"]
    finally:
        held.kill()
        held.wait()
    assert "held" not in sv.ls()


def test_stop_all_kills_everything(sv):
    sv.machine("z")
    pid = sv.ls()["z"]["pid"]
    dpid = int(sv.ok("machine", "exec", "--name", "z", "-d", "--", "sleep", "300").stdout)
    harness.stop_all(sv.data)
    assert not harness._start_time(pid) and not harness._start_time(dpid)
    assert sv.ls()["z"]["state"] == "stopped"


# ---------------------------------------------------------------------------
# --mount-socket
# ---------------------------------------------------------------------------


class HostSocketServer:
    """A host Unix socket service: answers each line with ``<tag>:<line>``."""

    def __init__(self, path: Path, tag: str):
        import socketserver

        self.path = path
        self.lines: list[str] = []
        self.new_line = threading.Condition()
        server = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                line = self.rfile.readline().decode()
                with server.new_line:
                    server.lines.append(line.strip())
                    server.new_line.notify_all()
                self.wfile.write(f"{tag}:{line}".encode())

        self.server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
        os.chmod(path, 0o777)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def received(self, line: str) -> bool:
        """Whether ``line`` arrives (waits for it: a guest workload runs detached)."""
        with self.new_line:
            return self.new_line.wait_for(lambda: line in self.lines, timeout=60)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.path.unlink()


def guest_says(sv, name, line, address, *, uid=None):
    """Send one line to a socat address from inside the guest (socat from the host's
    /usr): a guest path, or the workload's TCP relay (retried until it listens)."""
    if address.startswith("TCP:"):
        address += ",retry=100,interval=0.1"
    else:
        address = f"UNIX-CONNECT:{address}"
    cmd = ["socat", "-", address]
    if uid is not None:
        cmd = ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups"] + cmd
    return sv("machine", "exec", "--name", name, "-i", "--", *cmd, input=line + "\n")


def offline_pack(sv, tmp_path) -> str:
    pack = tmp_path / "offline"
    sv.ok("pack", "create", "-I", "tools", "-o", str(pack), "--entrypoint", "/bin/sleep")
    return str(pack) + ".smolmachine"


def test_mount_socket_grammar(sv, tmp_path):
    pack = offline_pack(sv, tmp_path)
    bad = {
        "/only-host": "mount-socket: expected HOST_PATH:GUEST_PATH, got '/only-host'",
        ":/g.sock": "mount-socket: both HOST_PATH and GUEST_PATH are required in ':/g.sock'",
        "/h.sock:": "mount-socket: both HOST_PATH and GUEST_PATH are required in '/h.sock:'",
        "/h.sock:g.sock": "publish-socket: guest path 'g.sock' must be absolute",
        "/h.sock:/a|b": "publish-socket: guest path '/a|b' contains an unsupported character "
                        "(';' or '|')",
        # split at the first ':' only: the rest is the guest path
        "/h.sock:x:/g": "publish-socket: guest path 'x:/g' must be absolute",
    }
    for spec, msg in bad.items():
        for source in (("--image", "tools", "--net"), ("--from", pack)):
            r = sv("machine", "create", "--name", "s", *source, "--mount-socket", spec)
            assert r.returncode == 1, (spec, source, r.stderr)
            assert err_line(r) == f"Error: config operation failed: {msg}", (spec, source)
    r = sv("machine", "create", "--name", "s", "--from", pack, "--mount-socket", "/h1:/g.sock",
           "--mount-socket", "/h2:/g.sock")
    assert r.returncode == 1 and err_line(r) == ("Error: config operation failed: mount-socket: "
                                                 "guest path '/g.sock' is mounted more than once")
    many = [a for i in range(65) for a in ("--mount-socket", f"/h{i}:/g{i}.sock")]
    r = sv("machine", "create", "--name", "s", "--from", pack, *many)
    assert r.returncode == 1 and err_line(r) == \
        "Error: config operation failed: publish-socket: too many published sockets (65); max is 64"
    r = sv("machine", "create", "--name", "s", "--from", pack, "--mount-socket")
    assert r.returncode == 2
    assert "a value is required for '--mount-socket <HOST_PATH:GUEST_PATH>'" in r.stderr
    r = sv("machine", "create", "--name", "s", "--from", pack, "--expose-socket", "/g.sock")
    assert r.returncode == 1 and "not simulated" in r.stderr
    assert sv.ls() == {}
    # valid: repeatable, on both paths; ls --json shows nothing of it (mounts counts volumes)
    sv.ok("machine", "create", "--name", "s", "--from", pack, *many[:4])
    sv.ok("machine", "create", "--name", "t", "--image", "tools", "--net", "--mount-socket",
          "/h:/g.sock")
    ls = sv.ls()
    assert ls["s"]["mounts"] == 0 and ls["t"]["mounts"] == 0
    assert not any("sock" in json.dumps(m) for m in ls.values())


def test_mount_socket_reaches_host_listener_without_network(sv, tmp_path):
    host_dir = tmp_path / "relay"
    host_dir.mkdir()
    host_sock = host_dir / "egress.sock"
    first = HostSocketServer(host_sock, "one")
    # a host TCP service the guest must not reach: the socket is its only way out
    tcp = __import__("socket").create_server(("127.0.0.1", 0))
    guest_sock = "/run/bottle/egress.sock"
    sv.ok("machine", "create", "--name", "door", "--from", offline_pack(sv, tmp_path),
          "--mount-socket", f"{host_sock}:{guest_sock}", "--init",
          f"echo init | socat - UNIX-CONNECT:{guest_sock}", "--", "sh", "-c",
          f"echo workload | socat - UNIX-CONNECT:{guest_sock}; exec socat "
          f"TCP-LISTEN:3128,bind=127.0.0.1,fork,reuseaddr UNIX-CONNECT:{guest_sock}")
    relay = "TCP:127.0.0.1:3128"
    assert sv.ls()["door"]["network"] is False
    sv.ok("machine", "start", "--name", "door")
    try:
        # init (at start) and the workload reached it too
        assert first.lines[0] == "init"
        assert first.received("workload")
        r = guest_says(sv, "door", "hi", guest_sock)
        assert (r.returncode, r.stdout) == (0, "one:hi\n"), r.stderr
        # the workload and the execs share one loopback, as in one VM
        r = guest_says(sv, "door", "via-relay", relay)
        assert (r.returncode, r.stdout) == (0, "one:via-relay\n"), r.stderr
        # any guest uid reaches it
        sv.ok("machine", "exec", "--name", "door", "--", "useradd", "-u", "1500", "agent")
        r = guest_says(sv, "door", "as-agent", guest_sock, uid=1500)
        assert (r.returncode, r.stdout) == (0, "one:as-agent\n"), r.stderr
        # the guest has loopback only, and the host's TCP service is out of reach
        r = sv.ok("machine", "exec", "--name", "door", "--", "sh", "-c",
                  "grep : /proc/net/dev | cut -d: -f1 | tr -d ' '")
        assert r.stdout.split() == ["lo"]
        port = tcp.getsockname()[1]
        r = sv("machine", "exec", "--name", "door", "-i", "--", "socat", "-",
               f"TCP:127.0.0.1:{port}", input="x\n")
        # refused by the guest's own loopback (the host's listener would accept)
        assert r.returncode != 0 and "Connection refused" in r.stderr
        # the host listener restarts (socket file recreated): the next guest connection
        # reaches the new one without a machine restart, also from the workload that
        # has been running since start
        first.close()
        second = HostSocketServer(host_sock, "two")
        try:
            r = guest_says(sv, "door", "again", guest_sock)
            assert (r.returncode, r.stdout) == (0, "two:again\n"), r.stderr
            r = guest_says(sv, "door", "again-via-relay", relay)
            assert (r.returncode, r.stdout) == (0, "two:again-via-relay\n"), r.stderr
            # the mount survives stop/start
            sv.ok("machine", "stop", "--name", "door")
            sv.ok("machine", "start", "--name", "door")
            r = guest_says(sv, "door", "after-restart", guest_sock)
            assert (r.returncode, r.stdout) == (0, "two:after-restart\n"), r.stderr
            r = guest_says(sv, "door", "after-restart-via-relay", relay)
            assert (r.returncode, r.stdout) == (0, "two:after-restart-via-relay\n"), r.stderr
        finally:
            second.close()
    finally:
        tcp.close()
        if host_sock.exists():
            first.close()
