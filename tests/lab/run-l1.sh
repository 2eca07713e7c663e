#!/bin/bash
# run-l1.sh - boot the L1 guest (q35 + emulated Intel IOMMU + PCI test topology)
# in the background under QEMU TCG, sharing a host directory at /mnt/src (9p).
#
# usage: run-l1.sh [SHARE_DIR]        (default SHARE_DIR: current directory)
#
# Environment:
#   HOSTDEVD_LAB_DIR  lab data dir (default /var/tmp/hostdevd-lab); image from build-image.sh
#   L1_NAME        instance name (default l1); state in $LAB_DIR/run/$L1_NAME
#   L1_MEM         guest RAM (default 3G)         L1_SMP   vCPUs (default 2)
#   L1_IOMMU_PT    1 (default): "intel_iommu=on iommu=pt"; 0: "intel_iommu=on" only
#   L1_APPEND      extra kernel command line
#   L1_ACCEL       -accel value (default tcg,thread=multi,tb-size=512)
#   L1_TIMEOUT     seconds to wait for the guest agent (default 300)
#   L1_NVME_SIZE   size of each emulated NVMe backing file (default 256M)
#   L1_SHARE_RW    1: share SHARE_DIR read-write (default 0: read-only)
#   L1_OWNER       pid recorded in $RUN/owner (labvm.py reaps instances whose owner died)
#   L1_REUSE_DISK  1: boot the disk of the last run of this instance again (reboot, power cut)
# Prints shell-style variables (L1_QGA=..., L1_QMP=..., ...) on success.
set -eu

SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
LAB_DIR=${HOSTDEVD_LAB_DIR:-/var/tmp/hostdevd-lab}
[ -d "$LAB_DIR" ] || { echo "[run-l1] ERROR: $LAB_DIR missing - run build-image.sh first" >&2; exit 1; }
LAB_DIR=$(cd "$LAB_DIR" && pwd)
SHARE=${1:-$PWD}
SHARE=$(cd "$SHARE" && pwd)
NAME=${L1_NAME:-l1}
MEM=${L1_MEM:-3G}
SMP=${L1_SMP:-2}
TIMEOUT=${L1_TIMEOUT:-300}
NVME_SIZE=${L1_NVME_SIZE:-256M}
QEMU=${QEMU:-qemu-system-x86_64}
IMG=$LAB_DIR/img
RUN=$LAB_DIR/run/$NAME

die() { printf '[run-l1] ERROR: %s\n' "$*" >&2; exit 1; }
for f in l1-base.raw vmlinuz initrd.img; do
    [ -s "$IMG/$f" ] || die "$IMG/$f missing - run build-image.sh first (same LAB_DIR)"
done
command -v "$QEMU" >/dev/null || die "$QEMU not found (apt-get install qemu-system-x86 qemu-utils)"

if [ -s "$RUN/qemu.pid" ] && kill -0 "$(cat "$RUN/qemu.pid")" 2>/dev/null; then
    die "instance '$NAME' already running (pid $(cat "$RUN/qemu.pid")); stop-l1.sh first"
fi
if [ "${L1_REUSE_DISK:-0}" = 1 ] && [ -s "$RUN/overlay.qcow2" ]; then
    # The same disk booted again: a reboot or a power cut in the reliability tests. The old
    # serial log is kept aside (the stall watcher reads only this boot's).
    n=1; while [ -e "$RUN/serial.log.$n" ]; do n=$((n + 1)); done
    [ ! -e "$RUN/serial.log" ] || mv "$RUN/serial.log" "$RUN/serial.log.$n"
    rm -f "$RUN"/*.sock "$RUN/qemu.pid" "$RUN/boot_seconds"
    REUSE=1
else
    rm -rf "$RUN"
    mkdir -p "$RUN"
    REUSE=0
fi
# pid of the process that owns this instance (labvm.py stops instances whose owner died)
[ -z "${L1_OWNER:-}" ] || echo "$L1_OWNER" > "$RUN/owner"
# unix socket paths are limited to 107 bytes
[ ${#RUN} -lt 90 ] || die "run dir path too long for unix sockets: $RUN (use a shorter LAB_DIR)"

# fresh overlay on the read-only base every run (unless L1_REUSE_DISK=1); fresh NVMe backing files
if [ "$REUSE" = 0 ]; then
    qemu-img create -q -f qcow2 -F raw -b "$IMG/l1-base.raw" "$RUN/overlay.qcow2"
    truncate -s "$NVME_SIZE" "$RUN/nvme1.img" "$RUN/nvme2.img"
fi

APPEND="console=ttyS0 root=/dev/vda rw intel_iommu=on"
[ "${L1_IOMMU_PT:-1}" = 1 ] && APPEND="$APPEND iommu=pt"
APPEND="$APPEND ${L1_APPEND:-}"

# management NIC: user-mode, restrict=on (no outbound access), no port forwards,
# so parallel instances never clash on host ports
NETDEV="user,id=mgmt,restrict=on"
# the share is read-only unless L1_SHARE_RW=1 (guest root must not scribble on the checkout)
SHARE_RO=,readonly=on
[ "${L1_SHARE_RW:-0}" = 1 ] && SHARE_RO=

set -- \
  -name "lab-$NAME" \
  -machine q35 -accel "${L1_ACCEL:-tcg,thread=multi,tb-size=512}" -cpu max -m "$MEM" -smp "$SMP" \
  -display none -no-reboot -nodefaults \
  -device intel-iommu,intremap=on,caching-mode=on \
  -device pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1,addr=0x2 \
  -device e1000e,id=nic1,bus=rp1,mac=52:54:00:00:01:01,romfile= \
  -device pcie-root-port,id=rp2,bus=pcie.0,chassis=2,slot=2,addr=0x3 \
  -drive file="$RUN/nvme1.img",if=none,id=nvd1,format=raw \
  -device nvme,id=nvme1,serial=plain0001,drive=nvd1,bus=rp2 \
  -device pcie-root-port,id=rp3,bus=pcie.0,chassis=3,slot=3,addr=0x4 \
  -device nvme-subsys,id=nvsub0,nqn=lab-sriov-subsys \
  -device nvme,id=nvme2,serial=sriov0001,subsys=nvsub0,bus=rp3,sriov_max_vfs=16,sriov_vq_flexible=32,sriov_vi_flexible=16 \
  -drive file="$RUN/nvme2.img",if=none,id=nvd2,format=raw \
  -device nvme-ns,drive=nvd2,bus=nvme2,nsid=1 \
  -device pcie-root-port,id=rp4,bus=pcie.0,chassis=4,slot=4,addr=0x5 \
  -device e1000e,id=nic2a,bus=rp4,addr=0x0.0,multifunction=on,mac=52:54:00:00:04:00,romfile= \
  -device e1000e,id=nic2b,bus=rp4,addr=0x0.1,mac=52:54:00:00:04:01,romfile= \
  -device pcie-root-port,id=rp5,bus=pcie.0,chassis=5,slot=5,addr=0x6 \
  -device pcie-pci-bridge,id=pcibr1,bus=rp5 \
  -device e1000,id=nic3a,bus=pcibr1,addr=0x1,mac=52:54:00:00:05:01,romfile= \
  -device e1000,id=nic3b,bus=pcibr1,addr=0x2,mac=52:54:00:00:05:02,romfile= \
  -device pcie-root-port,id=rp6,bus=pcie.0,chassis=6,slot=6,addr=0x7 \
  -device x3130-upstream,id=sw1up,bus=rp6 \
  -device xio3130-downstream,id=sw1dn1,bus=sw1up,chassis=7,slot=0 \
  -device xio3130-downstream,id=sw1dn2,bus=sw1up,chassis=8,slot=0 \
  -device e1000e,id=nic4a,bus=sw1dn1,mac=52:54:00:00:06:01,romfile= \
  -device e1000e,id=nic4b,bus=sw1dn2,mac=52:54:00:00:06:02,romfile= \
  -drive file="$RUN/overlay.qcow2",if=none,id=root,format=qcow2,cache=unsafe,discard=unmap \
  -device virtio-blk-pci,drive=root,bus=pcie.0,addr=0x10 \
  -netdev "$NETDEV" \
  -device virtio-net-pci,netdev=mgmt,bus=pcie.0,addr=0x11,romfile= \
  -device virtio-serial-pci,id=vser0,bus=pcie.0,addr=0x12 \
  -chardev socket,id=qga0,path="$RUN/qga.sock",server=on,wait=off \
  -device virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0 \
  -fsdev local,id=fs0,path="$SHARE",security_model=none$SHARE_RO \
  -device virtio-9p-pci,fsdev=fs0,mount_tag=src,bus=pcie.0,addr=0x13 \
  -chardev socket,id=ser0,path="$RUN/serial.sock",server=on,wait=off,logfile="$RUN/serial.log" \
  -serial chardev:ser0 \
  -qmp unix:"$RUN/qmp.sock",server=on,wait=off \
  -kernel "$IMG/vmlinuz" -initrd "$IMG/initrd.img" -append "$APPEND" \
  -pidfile "$RUN/qemu.pid" -daemonize

printf '%q ' "$QEMU" "$@" > "$RUN/cmdline"; echo >> "$RUN/cmdline"
T0=$(date +%s.%N)
"$QEMU" "$@" 2> "$RUN/qemu.stderr" || { cat "$RUN/qemu.stderr" >&2; die "qemu failed to start"; }
PID=$(cat "$RUN/qemu.pid")
echo "$SHARE" > "$RUN/share"

# Watchdog: if the owner process dies without stopping L1 (SIGKILL, crash), force-stop
# L1 within ~2 s. It exits by itself once qemu is gone. Started right away, so it
# also covers an owner that dies while this script is still waiting for the boot.
if [ -n "${L1_OWNER:-}" ]; then
    setsid /bin/sh -c 'while kill -0 "$1" 2>/dev/null && kill -0 "$2" 2>/dev/null; do sleep 2; done
        if kill -0 "$2" 2>/dev/null; then
            L1_NAME=$3 HOSTDEVD_LAB_DIR=$4 exec "$5" --force
        fi' l1-watchdog "$L1_OWNER" "$PID" "$NAME" "$LAB_DIR" "$SCRIPT_DIR/stop-l1.sh" \
        </dev/null >>"$RUN/watchdog.log" 2>&1 &
fi

echo "[run-l1] qemu pid $PID started; waiting up to ${TIMEOUT}s for the guest agent" >&2
while :; do
    if ! kill -0 "$PID" 2>/dev/null; then
        tail -n 30 "$RUN/serial.log" >&2 2>/dev/null || true
        die "qemu exited during boot (see $RUN/serial.log, $RUN/qemu.stderr)"
    fi
    if python3 "$SCRIPT_DIR/qga.py" "$RUN/qga.sock" ping 2>/dev/null; then
        break
    fi
    NOW=$(date +%s.%N)
    if awk -v a="$T0" -v b="$NOW" -v t="$TIMEOUT" 'BEGIN{exit !(b-a>t)}'; then
        tail -n 30 "$RUN/serial.log" >&2 2>/dev/null || true
        die "guest agent did not answer within ${TIMEOUT}s (qemu pid $PID still running; stop-l1.sh)"
    fi
    sleep 2
done
BOOT_S=$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
echo "$BOOT_S" > "$RUN/boot_seconds"
echo "[run-l1] guest agent answered after ${BOOT_S}s" >&2
cat <<EOF
L1_RUN=$RUN
L1_PID=$PID
L1_QGA=$RUN/qga.sock
L1_QMP=$RUN/qmp.sock
L1_SERIAL=$RUN/serial.sock
L1_SERIAL_LOG=$RUN/serial.log
L1_BOOT_SECONDS=$BOOT_S
EOF
