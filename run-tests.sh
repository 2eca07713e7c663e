#!/bin/bash
# run-tests.sh - the whole test suite: unit tests (simulated kernel, libvirt corpus,
# libvirt's test driver), then the lab (nested VM: real kernel, real libvirtd).
#
#   ./run-tests.sh            everything (unit + lab)
#   ./run-tests.sh --unit     unit tests alone, for quick work (seconds)
#   ./run-tests.sh --l2       also the lab tests that keep a nested L2 guest running
#                             (hot-unplug; excluded by default, see README "Tests")
#   ./run-tests.sh -- ARGS    extra pytest arguments
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python
[ -x "$PY" ] || { echo "run-tests: .venv missing; run ./setup.sh first" >&2; exit 2; }
mode=all
lab_filter="lab and not lab_l2"
if [ "${1:-}" = --unit ]; then mode=unit; shift; fi
if [ "${1:-}" = --l2 ]; then lab_filter=lab; shift; fi
[ "${1:-}" = -- ] && shift
"$PY" -m pytest tests -m "not lab" -q "$@"
if [ "$mode" = all ]; then
    "$PY" -m pytest tests/lab -m "$lab_filter" -v "$@"
fi
