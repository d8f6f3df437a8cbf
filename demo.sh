#!/bin/sh
# Installs what the demo needs and brings the demo agent up on podman, from a Debian base
# built locally with debootstrap: no container registry is needed. Run it from anywhere;
# it works in the directory it lives in. POSIX sh (Debian's /bin/sh is dash).
#   ./demo.sh            install, configure, bring the demo bottle up
#   ./demo.sh setup      install and configure only
#   ./demo.sh configure  write the podman engine configuration only
# It installs, each only when missing: the Debian packages of the demo's host programs (the one list,
# daemons/hostprograms.py), ca-certificates (pip and npm fetch over https), python3-venv when Python
# cannot make a virtual environment, and claude-bottle itself, with pip, into the virtual environment
# .venv in this directory (Debian's Python is externally managed: PEP 668).
# CLAUDE_BOTTLE_ENGINE_CONF moves the engine configuration file (tests write it elsewhere).
set -eu
cd "$(dirname "$0")"
[ "$(id -u)" = 0 ] || { echo "demo.sh: run it as root: apt, debootstrap and rootful podman need it" >&2; exit 1; }

conf=${CLAUDE_BOTTLE_ENGINE_CONF:-/etc/containers/containers.conf.d/50-claude-bottle.conf}
venv=.venv

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

updated=""
apt_install() {
    [ -n "$updated" ] || { apt-get update -q; updated=yes; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

command -v python3 >/dev/null 2>&1 || apt_install python3
# The demo's host programs (podman, runc, debootstrap, npm, git, ...), each from its Debian
# package; ca-certificates: pip and npm fetch over https; python3-venv: ensurepip, for the venv.
packages=$(python3 -m daemons.hostprograms missing demo)
[ -e /etc/ssl/certs/ca-certificates.crt ] || packages="$packages ca-certificates"
"$venv/bin/python" -m pip --version >/dev/null 2>&1 || python3 -c 'import ensurepip' 2>/dev/null ||
    packages="$packages python3-venv"
# shellcheck disable=SC2086 # one word per package
[ -z "$packages" ] || apt_install $packages
configure

# claude-bottle and its dependencies in the venv; again only when pyproject.toml changed since.
if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    python3 -m venv --clear "$venv"
    rm -f "$venv/.installed"
fi
if ! cmp -s pyproject.toml "$venv/.installed"; then
    "$venv/bin/python" -m pip install -q -e .
    cp pyproject.toml "$venv/.installed"
fi
[ "${1:-}" = setup ] && exit 0
BOTTLE_BACKEND=podman exec "$venv/bin/python" -m doit launch:demo
