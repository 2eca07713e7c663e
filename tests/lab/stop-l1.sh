#!/bin/bash
# stop-l1.sh - stop an L1 instance started by run-l1.sh.
# ACPI powerdown via QMP, wait (L1_STOP_TIMEOUT, default 60 s), then QMP quit,
# and finally SIGKILL to the recorded qemu pid (only that pid).
# usage: stop-l1.sh [--force]     (--force: skip the graceful powerdown)
# Environment: HOSTDEVD_LAB_DIR (default /var/tmp/hostdevd-lab), L1_NAME (default l1),
#              L1_KEEP=1 keeps the disk overlay and NVMe backing files.
set -u
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
LAB_DIR=${HOSTDEVD_LAB_DIR:-/var/tmp/hostdevd-lab}
NAME=${L1_NAME:-l1}
RUN=$LAB_DIR/run/$NAME
TIMEOUT=${L1_STOP_TIMEOUT:-60}
FORCE=0
[ "${1:-}" = --force ] && FORCE=1

if [ ! -s "$RUN/qemu.pid" ]; then
    echo "[stop-l1] no pid file in $RUN; nothing to stop" >&2
    exit 0
fi
PID=$(cat "$RUN/qemu.pid")
alive() { kill -0 "$PID" 2>/dev/null; }
# make sure the pid really is our qemu (pid files can go stale)
if alive && ! tr '\0' ' ' < "/proc/$PID/cmdline" 2>/dev/null | grep -q -- "$RUN/qga.sock"; then
    echo "[stop-l1] pid $PID is not this lab's qemu; not touching it" >&2
    exit 1
fi
waitfor() { # seconds
    local i=0
    while alive && [ "$i" -lt "$(( $1 * 5 ))" ]; do sleep 0.2; i=$((i + 1)); done
    ! alive
}
if alive && [ "$FORCE" = 0 ]; then
    python3 "$SCRIPT_DIR/qga.py" "$RUN/qmp.sock" powerdown 2>/dev/null
    if waitfor "$TIMEOUT"; then echo "[stop-l1] powered off" >&2; fi
fi
if alive; then
    python3 "$SCRIPT_DIR/qga.py" "$RUN/qmp.sock" quit 2>/dev/null
    waitfor 10 && echo "[stop-l1] quit via QMP" >&2
fi
if alive; then
    kill -9 "$PID" 2>/dev/null
    waitfor 5
    echo "[stop-l1] killed pid $PID" >&2
fi
rm -f "$RUN/qemu.pid"
if [ "${L1_KEEP:-0}" != 1 ]; then
    rm -f "$RUN/overlay.qcow2" "$RUN/nvme1.img" "$RUN/nvme2.img"
fi
exit 0
