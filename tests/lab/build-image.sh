#!/bin/bash
# build-image.sh - build the L1 guest image (Debian bookworm + libvirt + vfio)
# and the tiny L2 busybox initramfs.
#
# Output (all under LAB_DIR = $HOSTDEVD_LAB_DIR, default /var/tmp/hostdevd-lab;
# kept outside the repository and short because unix socket paths are limited):
#   img/l1-base.raw     ext4 root filesystem image (read-only base, 4G sparse)
#   img/vmlinuz         L1 kernel (also used for L2)
#   img/initrd.img      L1 initramfs
#   img/l2-initrd.img   L2 busybox initramfs (also copied into the image)
# The guest is controlled only through the QEMU guest agent (qga.py); there is no ssh.
#
# Idempotent: if the image already exists with the same IMAGE_REV, nothing is
# rebuilt (FORCE=1 rebuilds).
# Needs root and: mmdebstrap e2fsprogs busybox-static cpio (see README.md).
set -eu

SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
LAB_DIR=${HOSTDEVD_LAB_DIR:-/var/tmp/hostdevd-lab}
SUITE=${SUITE:-bookworm}
# Bump when the image contents change: an image with another revision is rebuilt.
IMAGE_REV=hostdevd-lab-1
[ "$SUITE" = bookworm ] || IMAGE_REV=$IMAGE_REV-$SUITE-1
# a change to the extra packages is a new image
[ -z "${EXTRA_PKGS:-}" ] || IMAGE_REV=$IMAGE_REV-$(printf %s "$EXTRA_PKGS" | md5sum | cut -c1-8)
# Debian packages added to the image (comma-separated): the trixie lab adds hostdevd's
# dependencies, since it installs hostdevd as an operator would, with apt and no network.
EXTRA_PKGS=${EXTRA_PKGS:-}
# Mirrors default to the ones this host's apt already uses (deb822 .sources or sources.list).
host_uri() {  # $1 = suite to look for; prints the first URI serving it
    { for f in /etc/apt/sources.list.d/*.sources; do [ -f "$f" ] && awk -v s="$1" '
        /^URIs:/ {u=$2} /^Suites:/ {for(i=2;i<=NF;i++) if($i==s) print u} /^$/ {u=""}' "$f"; done
      cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        awk -v s="$1" '$1=="deb" {o=2; if ($2 ~ /^\[/) o=3; if ($(o+1)==s) print $o}'; } | head -n1
}
# a suite this host does not use (trixie on a bookworm host) comes from the same archive
MIRROR=${DEBIAN_MIRROR:-$(host_uri "$SUITE")}
[ -n "$MIRROR" ] || MIRROR=$(host_uri bookworm)
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-$(host_uri "$SUITE-security")}
[ -n "$SECURITY_MIRROR" ] || SECURITY_MIRROR=$(host_uri bookworm-security)
[ -n "$MIRROR" ] || { echo "[build-image] ERROR: no apt source for $SUITE on this host; set DEBIAN_MIRROR" >&2; exit 1; }
[ -n "$SECURITY_MIRROR" ] || SECURITY_MIRROR=$MIRROR
IMG_SIZE=${IMG_SIZE:-4G}
FORCE=${FORCE:-0}

IMG=$LAB_DIR/img
BUILD=$LAB_DIR/build
ROOTFS=$BUILD/rootfs

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }
log() { printf '[build-image] %s\n' "$*"; }
die() { printf '[build-image] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap --mode=root, mke2fs -d)"
mkdir -p "$LAB_DIR"
LAB_DIR=$(cd "$LAB_DIR" && pwd)
IMG=$LAB_DIR/img
BUILD=$LAB_DIR/build
ROOTFS=$BUILD/rootfs

# one build at a time per LAB_DIR (parallel pytest sessions, CI jobs)
if [ -z "${_LAB_BUILD_LOCKED:-}" ] && command -v flock >/dev/null 2>&1; then
    export _LAB_BUILD_LOCKED=1
    exec flock "$LAB_DIR/.build.lock" "$0" "$@"
fi

if [ "$FORCE" != 1 ] && [ -s "$IMG/l1-base.raw" ] && [ -s "$IMG/vmlinuz" ] \
   && [ -s "$IMG/initrd.img" ] && [ -s "$IMG/l2-initrd.img" ] && [ -s "$IMG/.complete" ] \
   && grep -qx "rev=$IMAGE_REV" "$IMG/.complete"; then
    log "image already present in $IMG (FORCE=1 to rebuild); nothing to do"
    cat "$IMG/.complete"
    exit 0
fi

for t in mmdebstrap mke2fs cpio gzip; do
    command -v "$t" >/dev/null 2>&1 || die "missing tool: $t"
done
BUSYBOX=${BUSYBOX:-}
if [ -z "$BUSYBOX" ]; then
    for b in /bin/busybox /usr/bin/busybox; do
        [ -x "$b" ] && { BUSYBOX=$b; break; }
    done
fi
[ -n "$BUSYBOX" ] || die "busybox (static) not found; apt-get install busybox-static"
if command -v ldd >/dev/null 2>&1 && ldd "$BUSYBOX" 2>&1 | grep -q '=>'; then
    die "$BUSYBOX is dynamically linked; install busybox-static (or set BUSYBOX=)"
fi

T_TOTAL=$(now)
mkdir -p "$IMG" "$BUILD"
rm -f "$IMG/.complete"

# ---------------------------------------------------------------- L2 initramfs
T=$(now)
L2=$BUILD/l2root
rm -rf "$L2"
mkdir -p "$L2/bin" "$L2/proc" "$L2/sys" "$L2/dev" "$L2/tmp" "$L2/etc"
cp "$BUSYBOX" "$L2/bin/busybox"
# NB: 'busybox --list' contains "busybox" itself - never symlink it onto itself.
for a in $("$L2/bin/busybox" --list); do
    [ "$a" = busybox ] && continue
    ln -sf busybox "$L2/bin/$a"
done
cat > "$L2/init" <<'EOF'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
echo "L2-BOOTED kernel=$(uname -r)"
for d in /sys/bus/pci/devices/*; do
    echo "L2-PCI $(basename "$d") $(cat "$d/vendor"):$(cat "$d/device") class=$(cat "$d/class")"
done
echo "L2-READY"
while true; do sleep 3600; done
EOF
chmod 755 "$L2/init"
(cd "$L2" && find . | cpio -o -H newc --quiet | gzip -9) > "$IMG/l2-initrd.img"
log "L2 initramfs: $(du -h "$IMG/l2-initrd.img" | cut -f1) in $(elapsed "$T") s"

# ---------------------------------------------------------------- customize hook
cat > "$BUILD/customize.sh" <<'EOF'
#!/bin/sh
# mmdebstrap customize hook: $1 = root directory, $2 = LAB_DIR
set -eu
R=$1; LABD=$2
echo l1 > "$R/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 l1\n' > "$R/etc/hosts"
cat > "$R/etc/fstab" <<'FSTAB'
/dev/vda  /         ext4  defaults,errors=remount-ro  0 1
src       /mnt/src  9p    trans=virtio,version=9p2000.L,msize=262144,nofail  0 0
FSTAB
mkdir -p "$R/mnt/src"
# root autologin on the serial console
mkdir -p "$R/etc/systemd/system/serial-getty@ttyS0.service.d"
cat > "$R/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<'UNIT'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 %I $TERM
UNIT
chroot "$R" passwd -d root >/dev/null
# networking: DHCP only on the virtio NIC (management/user-net); leave PCI NICs alone
mkdir -p "$R/etc/systemd/network"
cat > "$R/etc/systemd/network/10-mgmt.network" <<'NET'
[Match]
Driver=virtio_net
[Network]
DHCP=ipv4
NET
chroot "$R" systemctl enable systemd-networkd >/dev/null 2>&1
chroot "$R" systemctl mask systemd-networkd-wait-online.service apt-daily.timer \
    apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer >/dev/null 2>&1 || true
# vfio modules at boot
printf 'vfio\nvfio-pci\nvfio_iommu_type1\n' > "$R/etc/modules-load.d/vfio.conf"
# no libvirt default NAT network
rm -f "$R/etc/libvirt/qemu/networks/autostart/default.xml"
mkdir -p "$R/etc/libvirt/hooks/qemu.d"
# L2 guest payload: same kernel + busybox initramfs
mkdir -p "$R/var/lib/libvirt/images"
cp "$(ls "$R"/boot/vmlinuz-* | sort -V | tail -n1)" "$R/var/lib/libvirt/images/l2-vmlinuz"
cp "$LABD/img/l2-initrd.img" "$R/var/lib/libvirt/images/l2-initrd.img"
# keep the image small
rm -rf "$R/var/cache/apt/archives/"*.deb "$R/var/lib/apt/lists/"* 2>/dev/null || true
EOF
chmod 755 "$BUILD/customize.sh"

# ---------------------------------------------------------------- rootfs
PKGS=systemd,systemd-sysv,udev,dbus,kmod,procps,iproute2,pciutils
PKGS=$PKGS,libvirt-daemon-system,libvirt-daemon-driver-qemu,qemu-system-x86,libvirt-clients
PKGS=$PKGS,python3,python3-libvirt,python3-lxml,python3-systemd,python3-pip,python3-venv
PKGS=$PKGS,linux-image-amd64,qemu-guest-agent,nvme-cli
[ -z "$EXTRA_PKGS" ] || PKGS=$PKGS,$EXTRA_PKGS

T=$(now)
rm -rf "$ROOTFS"
log "mmdebstrap $SUITE (+updates, +security) -> $ROOTFS"
mmdebstrap --mode=root --variant=minbase --components=main \
    --include="$PKGS" \
    --customize-hook="sh '$BUILD/customize.sh' \"\$1\" '$LAB_DIR'" \
    "$SUITE" "$ROOTFS" \
    "deb $MIRROR $SUITE main" \
    "deb $MIRROR $SUITE-updates main" \
    "deb $SECURITY_MIRROR $SUITE-security main"
T_DEBOOTSTRAP=$(elapsed "$T")
ROOTFS_MB=$(du -sm "$ROOTFS" | cut -f1)
log "mmdebstrap done in $T_DEBOOTSTRAP s, rootfs ${ROOTFS_MB} MB"

KVER=$(ls "$ROOTFS"/boot/vmlinuz-* | sort -V | tail -n1 | sed 's|.*/vmlinuz-||')
[ -n "$KVER" ] || die "no kernel in rootfs"
cp "$ROOTFS/boot/vmlinuz-$KVER" "$IMG/vmlinuz"
cp "$ROOTFS/boot/initrd.img-$KVER" "$IMG/initrd.img"

# ---------------------------------------------------------------- ext4 image
T=$(now)
rm -f "$IMG/l1-base.raw"
mke2fs -q -t ext4 -L l1root -d "$ROOTFS" "$IMG/l1-base.raw" "$IMG_SIZE"
T_MKE2FS=$(elapsed "$T")
log "mke2fs -d done in $T_MKE2FS s"

[ "${KEEP_ROOTFS:-0}" = 1 ] || rm -rf "$ROOTFS"

{
    echo "rev=$IMAGE_REV"
    echo "suite=$SUITE"
    echo "kernel=$KVER"
    echo "mmdebstrap_s=$T_DEBOOTSTRAP"
    echo "rootfs_mb=$ROOTFS_MB"
    echo "mke2fs_s=$T_MKE2FS"
    echo "total_s=$(elapsed "$T_TOTAL")"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} > "$IMG/.complete"
log "done:"
cat "$IMG/.complete"
log "LAB_DIR usage: $(du -sh "$LAB_DIR" | cut -f1) (apparent sizes larger: images are sparse)"
