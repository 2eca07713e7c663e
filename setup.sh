#!/bin/bash
# setup.sh - install hostdevd and everything it needs on Debian bookworm (as root),
# then show this host's IOMMU groups. Idempotent.
#
#   sudo ./setup.sh            system packages + .venv with hostdevd, then `hostdevctl groups`
#   SETUP_LAB=0 ./setup.sh     skip the lab's packages (QEMU, mmdebstrap)
set -euo pipefail
cd "$(dirname "$0")"

APT_PKGS=(python3 python3-venv python3-dev gcc pkg-config libvirt-dev libsystemd-dev)
# The lab (tests/lab): QEMU under TCG and the tools that build its Debian guest image.
LAB_PKGS=(qemu-system-x86 qemu-utils mmdebstrap e2fsprogs uidmap arch-test busybox-static cpio zstd kmod)
[ "${SETUP_LAB:-1}" = 1 ] && APT_PKGS+=("${LAB_PKGS[@]}")

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    for p in "${APT_PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "[setup] apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
else
    echo "[setup] not root or no apt-get: assuming ${APT_PKGS[*]} are installed" >&2
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    "$PY" -m venv .venv
fi
# libvirt-python must match the system libvirt it is compiled against.
LIBVIRT_VERSION=$(pkg-config --modversion libvirt)
echo "[setup] pip install hostdevd (libvirt-python==$LIBVIRT_VERSION)"
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q "libvirt-python==$LIBVIRT_VERSION" -e ".[daemon,test]"

echo "[setup] done. hostdevctl is .venv/bin/hostdevctl; this host's IOMMU groups:"
echo
set +e
.venv/bin/hostdevctl groups
rc=$?
set -e
echo
if [ $rc -ne 0 ]; then
    echo "[setup] hostdevctl groups exited $rc (above: why). Host checks:"
    .venv/bin/hostdevctl check || true
fi
exit 0
