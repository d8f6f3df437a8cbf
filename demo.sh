#!/bin/sh
# Installs what the demo needs and brings the demo agent up on podman, from a Debian base
# built locally with debootstrap: no container registry is needed. Run it from anywhere;
# it works in the directory it lives in. `./demo.sh setup` installs and configures only.
set -eu
cd "$(dirname "$0")"
[ "$(id -u)" = 0 ] || { echo "demo.sh: run it as root: apt, debootstrap and rootful podman need it" >&2; exit 1; }

# Debian packages: the engine, its runtime, debootstrap, and npm (fetches Claude Code).
missing=""
for tool in podman runc debootstrap npm; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if [ -n "$missing" ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing
fi

# Engine configuration, not code: runc, and container ulimits within the host's hard
# limits (podman's defaults exceed them on some hosts, and containers then fail to start).
conf=/etc/containers/containers.conf.d/50-claude-bottle.conf
if [ ! -e "$conf" ]; then
    nofile=$(ulimit -Hn); [ "$nofile" = unlimited ] || [ "$nofile" -gt 65536 ] && nofile=65536
    nproc=$(ulimit -Hu); [ "$nproc" = unlimited ] || [ "$nproc" -gt 4096 ] && nproc=4096
    mkdir -p "$(dirname "$conf")"
    printf '[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=%s:%s"]\n\n[engine]\nruntime = "runc"\n' \
        "$nofile" "$nofile" "$nproc" "$nproc" > "$conf"
fi

python3 -m pip install -q -e .
[ "${1:-}" = setup ] && exit 0
BOTTLE_BACKEND=podman exec python3 -m doit launch:demo
