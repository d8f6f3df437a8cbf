#!/bin/sh
# The suite's real-smolvm scenarios, for a developer on a host where smolvm boots machines (Linux with KVM:
# bare metal, or a VM with nested virtualization, vmx/svm in /proc/cpuinfo). Every test with a `smolvm`
# backend parameter runs on the real smolvm: the one on PATH, else the suite's own (1.32.2, test.sh installs
# it). Where smolvm cannot boot, the run fails with smolvm's reason instead of skipping them (as the default
# suite does, tests/conftest.py real_smolvm). POSIX sh; as root, like ./test.sh, whose arguments it passes on.
#   tests/real-smolvm.sh                    every real-smolvm scenario, default and extended tier
#   tests/real-smolvm.sh -n 1 -x            one worker, stop at the first failure
set -eu
cd "$(dirname "$0")/.."
tiers='extended or not extended'
ids=$(./test.sh -q --co -p no:randomly -m "$tiers" tests | grep -E '\[smolvm(-[^]]*)?\]$' || true)
if [ -z "$ids" ]; then
    echo "real-smolvm: no test with a smolvm parameter was collected" >&2
    exit 1
fi
echo "real-smolvm: $(echo "$ids" | wc -l) tests on the real smolvm ($(command -v smolvm || echo "the suite's own"))"
BOTTLE_REAL_SMOLVM=require
export BOTTLE_REAL_SMOLVM
# shellcheck disable=SC2086 # one node id per word
exec ./test.sh -m "$tiers" "$@" $ids
