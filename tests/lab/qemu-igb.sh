#!/bin/bash
# qemu-igb.sh - a QEMU >= 8 with the emulated SR-IOV NIC `igb` (82576) for the L1 variant that
# tests VF MAC/VLAN through netlink, WITHOUT touching the system QEMU (bookworm's 7.2 has no igb).
#
# It downloads qemu-system-x86 / -common / -data and seabios from bookworm-backports with a
# private apt state directory (the host's apt sources and dpkg database are not changed),
# unpacks them with `dpkg -x` under $LAB_DIR/qemu10, checks that the binary runs with the
# host's libraries and knows `-device igb`, and writes $LAB_DIR/qemu10/qemu-igb: a wrapper that
# run-l1.sh uses as $QEMU. It adds to the normal L1 command line a seventh root port (00:08.0,
# after every existing port, so no existing address changes; group numbers after it shift) with
# an igb PF on it. Idempotent: a second run only checks. Prints the wrapper's path.
set -eu
LAB_DIR=${HOSTDEVD_LAB_DIR:-/var/tmp/hostdevd-lab}
DEST=$LAB_DIR/qemu10
APT=$LAB_DIR/qemu-apt
SUITE=${QEMU_IGB_SUITE:-bookworm-backports}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WRAPPER=$DEST/qemu-igb
die() { printf '[qemu-igb] ERROR: %s\n' "$*" >&2; exit 1; }

exec 9>"$LAB_DIR/.qemu-igb.lock"
flock 9

check() {
    QEMU_MODULE_DIR=$DEST/usr/lib/x86_64-linux-gnu/qemu "$DEST/usr/bin/qemu-system-x86_64" -device igb,help \
        >/dev/null 2>&1
}

if [ ! -x "$WRAPPER" ] || ! check; then
    rm -rf "$DEST" "$APT"
    mkdir -p "$APT"/{lists/partial,cache/archives/partial,etc/sources.list.d,etc/preferences.d,etc/apt.conf.d,debs}
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $SUITE main" > "$APT/etc/sources.list"
    A=(-o "Dir::Etc=$APT/etc" -o "Dir::Etc::sourcelist=$APT/etc/sources.list"
       -o "Dir::Etc::sourceparts=$APT/etc/sources.list.d" -o "Dir::State::Lists=$APT/lists"
       -o "Dir::Cache=$APT/cache" -o "Dir::State::status=/var/lib/dpkg/status" -o Debug::NoLocking=1
       -o APT::Sandbox::User=root)
    apt-get "${A[@]}" -qq update || die "apt-get update of $SUITE failed"
    (cd "$APT/debs" && apt-get "${A[@]}" -qq download qemu-system-x86 qemu-system-common qemu-system-data seabios) \
        || die "apt-get download from $SUITE failed"
    mkdir -p "$DEST"
    for f in "$APT"/debs/*.deb; do dpkg -x "$f" "$DEST"; done
    missing=$(ldd "$DEST/usr/bin/qemu-system-x86_64" | grep 'not found' || true)
    [ -z "$missing" ] || die "the backported QEMU needs libraries this host lacks: $missing"
    check || die "$DEST/usr/bin/qemu-system-x86_64 has no igb device"
    cat > "$WRAPPER" <<EOF
#!/bin/sh
# written by tests/lab/qemu-igb.sh: QEMU from $SUITE (private copy) + an igb SR-IOV PF on rp7 (00:08.0)
export QEMU_MODULE_DIR=$DEST/usr/lib/x86_64-linux-gnu/qemu
exec $DEST/usr/bin/qemu-system-x86_64 -L $DEST/usr/share/qemu -L $DEST/usr/share/seabios "\$@" \\
  -device pcie-root-port,id=rp7,bus=pcie.0,chassis=9,slot=9,addr=0x8 \\
  -netdev user,id=igbnet,restrict=on \\
  -device igb,id=igb1,bus=rp7,netdev=igbnet,mac=52:54:00:00:08:00,romfile=
EOF
    chmod 755 "$WRAPPER"
fi
echo "[qemu-igb] $("$DEST/usr/bin/qemu-system-x86_64" --version | head -1) at $DEST" >&2
echo "$WRAPPER"
