#!/bin/sh
# Installs what the demo needs and brings the demo agent up on podman, from a Debian base
# built locally with debootstrap: no container registry is needed. Run it from anywhere;
# it works in the directory it lives in. POSIX sh (Debian's /bin/sh is dash).
#   ./demo.sh            install, configure, bring the demo bottle up
#   ./demo.sh setup      install and configure only
#   ./demo.sh configure  write the podman engine configuration only
# CLAUDE_BOTTLE_ENGINE_CONF moves the engine configuration file (tests write it elsewhere).
set -eu
cd "$(dirname "$0")"
[ "$(id -u)" = 0 ] || { echo "demo.sh: run it as root: apt, debootstrap and rootful podman need it" >&2; exit 1; }

conf=${CLAUDE_BOTTLE_ENGINE_CONF:-/etc/containers/containers.conf.d/50-claude-bottle.conf}

# The hard limit of this process, from the kernel's own table: dash's `ulimit` has no -u.
hard_limit() {
    awk -v name="$1" 'index($0, name) == 1 { print $(NF - 1) }' /proc/self/limits
}

# Engine configuration, not code: runc, and container ulimits within the host's hard
# limits (podman's defaults exceed them on some hosts, and containers then fail to start).
configure() {
    [ -e "$conf" ] && return 0
    nofile=$(hard_limit 'Max open files'); nproc=$(hard_limit 'Max processes')
    [ "$nofile" = unlimited ] || [ "$nofile" -gt 65536 ] && nofile=65536
    [ "$nproc" = unlimited ] || [ "$nproc" -gt 4096 ] && nproc=4096
    mkdir -p "$(dirname "$conf")"
    printf '[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=%s:%s"]\n\n[engine]\nruntime = "runc"\n' \
        "$nofile" "$nofile" "$nproc" "$nproc" > "$conf.new"
    mv "$conf.new" "$conf"
    echo "demo.sh: wrote the podman engine configuration $conf"
}

if [ "${1:-}" = configure ]; then configure; exit 0; fi

# Debian packages: the engine, its runtime, debootstrap, and npm (fetches Claude Code).
missing=""
for tool in podman runc debootstrap npm; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if [ -n "$missing" ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing
fi
configure

python3 -m pip install -q -e .
[ "${1:-}" = setup ] && exit 0
BOTTLE_BACKEND=podman exec python3 -m doit launch:demo
