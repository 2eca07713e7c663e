#!/bin/bash
# run-tests.sh - the whole test suite: ruff and mypy, unit tests (simulated kernel, libvirt corpus,
# libvirt's test driver), then the lab (nested VM: real kernel, real libvirtd).
#
#   ./run-tests.sh            everything (unit + lab)
#   ./run-tests.sh --unit     lint, types and unit tests alone, for quick work (minutes)
#   ./run-tests.sh -- ARGS    extra pytest arguments
#
# The lab runs as three pytest sessions, each on a fresh L1: on Debian 12 every lab test but
# those marked lab_l2 or lab_igb, then the lab_l2 ones (they keep a nested L2 guest running,
# which is what has, now and then, broken L1's kernel under TCG) after the lab_igb ones, on an
# L1 booted with a QEMU that has the igb SR-IOV NIC (tests/lab/qemu-igb.sh); then on Debian 13 the tests marked
# lab_trixie, with hostdevd installed from its .deb. A session in which L1's *kernel* failed
# (RCU stall, soft lockup, panic; see README "L1 stalls") has its failed tests run again on a
# fresh L1 (pytest --last-failed), at most $HOSTDEVD_LAB_RERUNS times (default 2), and says so
# loudly; any other failure fails the run.
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python
[ -x "$PY" ] || { echo "run-tests: .venv missing; run ./setup.sh first" >&2; exit 2; }
mode=all
if [ "${1:-}" = --unit ]; then mode=unit; shift; fi
[ "${1:-}" = -- ] && shift
# The lint and type gate first: a finding fails the run before any test starts.
echo "run-tests: ruff check"
.venv/bin/ruff check daemon tests bench
echo "run-tests: mypy"
.venv/bin/mypy
t0=$SECONDS
"$PY" -m pytest tests -m "not lab" -q "$@"
echo "run-tests: unit tests took $((SECONDS - t0)) s"
[ "$mode" = all ] || exit 0

stall_file=$(mktemp /tmp/hostdevd-lab-stall.XXXXXX)
trap 'rm -f "$stall_file"' EXIT
export HOSTDEVD_LAB_STALL_FILE=$stall_file

lab_session() { # MARK-EXPRESSION [pytest args]
    local expr=$1 left=${HOSTDEVD_LAB_RERUNS:-2} t=$SECONDS again=(); shift
    while :; do
        : > "$stall_file"
        if "$PY" -m pytest tests/lab -m "$expr" -v --durations=12 "${again[@]}" "$@"; then
            echo "run-tests: lab session '$expr' passed in $((SECONDS - t)) s"
            return 0
        fi
        [ -s "$stall_file" ] && [ "$left" -gt 0 ] || return 1
        left=$((left - 1))
        echo "run-tests: *** L1's kernel failed under TCG (the emulator, not hostdevd): $(head -1 "$stall_file")"
        echo "run-tests: *** running the failed tests of the '$expr' lab session again on a fresh L1" \
             "($left more reruns allowed)"
        # only what failed (every test after a stall fails at once): what passed stays passed
        again=(--last-failed)
    done
}
rc=0
lab_session "lab and not lab_l2 and not lab_igb and not trixie_only" "$@" || rc=1
HOSTDEVD_LAB_IGB=1 lab_session "(lab_l2 or lab_igb) and not trixie_only" "$@" || rc=1
# The Debian 13 lab: its own image in $HOSTDEVD_LAB13_DIR, hostdevd built as a .deb and installed
# with apt; test_lab_trixie.py plus every test marked lab_trixie. HOSTDEVD_LAB_TRIXIE=0 skips it
# (and says so).
if [ "${HOSTDEVD_LAB_TRIXIE:-1}" = 1 ]; then
    HOSTDEVD_LAB_SUITE=trixie HOSTDEVD_LAB_DIR=${HOSTDEVD_LAB13_DIR:-/var/tmp/hostdevd-lab13} \
        lab_session "lab_trixie" "$@" || rc=1
else
    echo "run-tests: *** HOSTDEVD_LAB_TRIXIE=0: the Debian 13 lab did NOT run"
fi
exit $rc
