"""The host-critical half of :mod:`.sysfs` (R3): which PCI functions the host needs, read
from /sys and /proc through the same backend, with the same rule that only validated names
become path components. :class:`~hostdevd.core.sysfs.Sysfs` inherits it; nothing else uses it.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .address import PciAddress
from .critical import (
    IPAddress,
    Mount,
    Route,
    console_names,
    network_servers,
    parse_address,
    parse_mountinfo,
    parse_routes,
    route_interface,
    shown,
)
from .errors import InvalidAddress

if TYPE_CHECKING:
    from .sysfs import HostBackend

log = logging.getLogger("hostdevd.core.sysfs")

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:+-]{1,64}$")
_VIRTIO_RE = re.compile(r"^virtio[0-9]{1,6}$")
_VPORT_RE = re.compile(r"^vport[0-9]{1,6}p[0-9]{1,6}$")
_ISCSI_CONN_RE = re.compile(r"^connection([0-9]{1,9}):[0-9]{1,9}$")
_SESSION_IN_PATH = re.compile(r"/session([0-9]{1,9})/")
_AGENT_PORT_PREFIX = "org.qemu.guest_agent."
_BDF_IN_PATH = re.compile(r"(?<![0-9a-fA-F])([0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7])(?![0-9a-fA-F])")


def _safe_name(name: str) -> bool:
    """A name read from /proc (or sysfs) that may become one path component."""
    return bool(_NAME_RE.match(name)) and name not in (".", "..")


class HostCriticalReads:
    backend: HostBackend

    if TYPE_CHECKING:   # provided by Sysfs
        @staticmethod
        def _dev(addr: PciAddress, attr: str = "") -> str: ...
        def _read(self, rel: str) -> str | None: ...
        def _link_name(self, rel: str) -> str | None: ...
        def device_addresses(self) -> list[PciAddress]: ...
        def exists(self, addr: PciAddress) -> bool: ...

    # ----- host-critical devices (R3) -------------------------------------
    def _pci_in_link(self, rel: str) -> list[PciAddress]:
        try:
            target = self.backend.readlink(rel)
        except OSError:
            return []
        return [PciAddress.parse(m) for m in _BDF_IN_PATH.findall(target)]

    def _peek(self, rel: str) -> str | None:
        """An attribute's text without whitespace or a trailing NUL; None when unreadable
        (one odd file never stops the host-critical scan)."""
        try:
            return self.backend.read(rel).strip().strip("\x00").strip()
        except OSError:
            return None

    def _entries(self, rel: str) -> list[str]:
        try:
            return sorted(self.backend.listdir(rel))
        except OSError:
            return []

    def _proc_text(self, rel: str) -> str:
        try:
            return self.backend.proc_read(rel)
        except OSError:
            return ""

    def _block_stack(self, name: str, seen: set[str]) -> list[tuple[str, str]]:
        """(name, class/block link target) of a block device and, recursively, its dm/md slaves."""
        if name in seen or not _safe_name(name):
            return []
        seen.add(name)
        try:
            target = self.backend.readlink(f"class/block/{name}")
        except OSError:
            target = ""
        out = [(name, target)]
        for s in self._entries(f"class/block/{name}/slaves"):
            out += self._block_stack(s, seen)
        return out

    def _block_holders(self, name: str, seen: set[str]) -> list[PciAddress]:
        """PCI controllers behind a block device, following dm/md slaves and partitions."""
        out: list[PciAddress] = []
        for _, target in self._block_stack(name, seen):
            out += [PciAddress.parse(m) for m in _BDF_IN_PATH.findall(target)][-1:]
        return out

    def _mount_block(self, m: Mount) -> str | None:
        """The block device under a mount: its MAJ:MIN (covers /dev/root and device-mapper), or,
        for filesystems that report an anonymous number (btrfs, bcachefs), the /dev node in the
        source: /dev/NAME or /dev/mapper/NAME."""
        if not m.anonymous:
            return self._link_name(f"dev/block/{m.dev}")
        if not m.source.startswith("/dev/"):
            return None
        rest = m.source[len("/dev/"):]
        if rest.startswith("mapper/"):
            for dm in self._entries("class/block"):
                if dm.startswith("dm-") and _safe_name(dm) and self._peek(f"class/block/{dm}/dm/name") == rest[7:]:
                    return dm
            return None
        return rest if _safe_name(rest) and self.backend.exists(f"class/block/{rest}") else None

    def _virtio_devices(self) -> list[str]:
        return [n for n in self._entries("bus/virtio/devices") if _VIRTIO_RE.match(n)]

    def _virtio_pci(self, name: str) -> PciAddress | None:
        """The PCI function a virtio device sits on (bus/virtio/devices/virtioN links under it);
        None for virtio-mmio and other transports."""
        chain = self._pci_in_link(f"bus/virtio/devices/{name}")
        return chain[-1] if chain else None

    def _shared_fs(self, m: Mount) -> list[tuple[PciAddress, str]]:
        """The virtio device behind a mounted 9p or virtiofs share: the source is the tag.

        9p (net/9p/trans_virtio.c) shows it as bus/virtio/devices/virtioN/mount_tag; virtiofs
        (fs/fuse/virtio_fs.c, Linux 6.9+) as /sys/fs/virtiofs/N/tag with a ``device`` link to
        virtioN. Older kernels do not export the virtiofs tag: then every virtio device bound to
        the virtiofs driver counts."""
        tag = m.source
        if m.fstype == "9p":
            if set(m.option("trans")) - {"virtio"}:
                return []                    # tcp/rdma are network mounts; fd, unix, xen: no PCI
            found = [self._virtio_pci(n) for n in self._virtio_devices()
                     if self._peek(f"bus/virtio/devices/{n}/mount_tag") == tag]
        elif m.fstype == "virtiofs":
            if self.backend.exists("fs/virtiofs"):
                found = [c[-1] for e in self._entries("fs/virtiofs")
                         if e.isdigit() and self._peek(f"fs/virtiofs/{e}/tag") == tag
                         and (c := self._pci_in_link(f"fs/virtiofs/{e}/device"))]
            else:
                found = [self._virtio_pci(n) for n in self._virtio_devices()
                         if self._link_name(f"bus/virtio/devices/{n}/driver") == "virtiofs"]
        else:
            return []
        reason = f"virtio device of the mounted {m.fstype} share '{shown(tag)}' ({shown(m.mountpoint)})"
        return [(a, reason) for a in found if a is not None]

    def _route_nics(self, kind: str, addrs: list[tuple[IPAddress, str | None]],
                    routes: list[Route]) -> list[tuple[PciAddress, str]]:
        """The NICs under the interface of the route to each address (a link-local address's
        scope names the interface itself)."""
        out = []
        for ip, scope in addrs:
            iface = scope or route_interface(routes, ip)
            if iface is None:
                continue
            out += [(a, f"NIC carrying the route to the {kind} {ip} ({iface})")
                    for a in self._net_devices(iface, set())]
        return out

    def _iscsi_targets(self, name: str, seen: set[str]) -> list[tuple[IPAddress, str | None]]:
        """The targets of the iSCSI sessions under a block device (software iSCSI puts its disks
        under /sys/devices/platform/hostH/sessionS/..., no PCI device on the way): the address and
        persistent_address of each /sys/class/iscsi_connection/connectionS:C.

        NBD is not covered: /sys/block/nbdN/pid and backend name the client process and its
        backend string, not the server; once the socket is handed to the kernel (NBD_SET_SOCK or
        netlink) nothing in sysfs or /proc ties it to the device."""
        sessions = {s for _, target in self._block_stack(name, seen) for s in _SESSION_IN_PATH.findall(target)}
        if not sessions:
            return []
        out: list[tuple[IPAddress, str | None]] = []
        for conn in self._entries("class/iscsi_connection"):
            c = _ISCSI_CONN_RE.match(conn)
            if not c or c[1] not in sessions:
                continue
            for attr in ("address", "persistent_address"):
                a = parse_address(self._peek(f"class/iscsi_connection/{conn}/{attr}") or "")
                if a is not None and a not in out:
                    out.append(a)
        return out

    def _network_mount(self, m: Mount, routes: list[Route], seen: set[str]) -> list[tuple[PciAddress, str]]:
        """NICs a network filesystem or an iSCSI-backed mount needs (a root on NFS included)."""
        out = []
        servers = network_servers(m)
        if servers is not None:
            out += self._route_nics(servers[0], servers[1], routes)
        name = self._mount_block(m)
        if name:
            out += self._route_nics("iSCSI target", self._iscsi_targets(name, seen), routes)
        return out

    def _mount_devices(self, m: Mount, routes: list[Route]) -> list[tuple[PciAddress, str]]:
        """Every device one mount needs, with the reason (policy.critical's ``mount:``)."""
        name = self._mount_block(m)
        out = [(a, f"controller of a mounted filesystem ({shown(m.mountpoint)})")
               for a in (self._block_holders(name, set()) if name else [])]
        return out + self._shared_fs(m) + self._network_mount(m, routes, set())

    def _consoles(self) -> list[tuple[PciAddress, str]]:
        """The devices of the consoles console= names on the kernel command line.

        ttyS*/ttyUSB*/...: class/tty/NAME links under the device (a PCI serial card, AMT SoL,
        the USB controller of a USB serial adapter; a legacy 8250 port sits under
        platform/serial8250 or pnp0, no PCI). hvc*: hvc devices are virtual (no parent in
        sysfs), and nothing in sysfs says which virtio-serial port is a console port, so every
        virtio device on the virtio_console driver counts."""
        out = []
        for name in console_names(self._proc_text("cmdline")):
            if not _safe_name(name):
                continue
            reason = f"console {name} (console= on the kernel command line)"
            if name.startswith("hvc"):
                out += [(a, f"virtio {reason}") for n in self._virtio_devices()
                        if self._link_name(f"bus/virtio/devices/{n}/driver") == "virtio_console"
                        and (a := self._virtio_pci(n)) is not None]
            else:
                out += [(a, f"serial {reason}") for a in self._pci_in_link(f"class/tty/{name}")[-1:]]
        return out

    def _agent_channels(self) -> list[tuple[PciAddress, str]]:
        """The virtio-serial device carrying the QEMU guest agent's port (the way the host's own
        hypervisor manages it), from /sys/class/virtio-ports/vportNpM/name. Whether the agent has
        the port open is not in sysfs (debugfs only), so a named port is enough."""
        out = []
        for v in self._entries("class/virtio-ports"):
            if not _VPORT_RE.match(v):
                continue
            name = self._peek(f"class/virtio-ports/{v}/name") or ""
            if name.startswith(_AGENT_PORT_PREFIX):
                out += [(a, f"virtio-serial channel {shown(name)} (host agent)")
                        for a in self._pci_in_link(f"class/virtio-ports/{v}")[-1:]]
        return out

    def _listed(self, listed: Iterable[str], mounts: list[Mount], routes: list[Route]) -> list[tuple[PciAddress, str]]:
        """policy.critical: a PCI address, ``net:IFNAME`` or ``mount:/path``."""
        out: list[tuple[PciAddress, str]] = []
        for entry in listed:
            reason = f"listed in policy.critical ({shown(entry, 200)})"
            if entry.startswith("net:"):
                devs = self._net_devices(entry[4:], set()) if _safe_name(entry[4:]) else []
            elif entry.startswith("mount:"):
                devs = [a for m in mounts if m.mountpoint == entry[6:] for a, _ in self._mount_devices(m, routes)]
            else:
                try:
                    addr = PciAddress.parse(entry)
                except InvalidAddress:
                    log.warning("ignoring policy.critical entry %r", entry)
                    continue
                devs = [addr] if self.exists(addr) else []
            out += [(a, reason) for a in devs]
        return out

    def critical_fingerprint(self) -> tuple[str, ...]:
        """The /proc facts host-critical devices are derived from (mounts, swaps, routes, the
        kernel command line): while they read the same, a cached answer holds (Engine.critical)."""
        return tuple(self._proc_text(rel) for rel in ("self/mountinfo", "swaps", "net/route", "net/ipv6_route",
                                                      "cmdline"))

    def host_critical(self, listed: Iterable[str] = ()) -> dict[PciAddress, str]:
        """Devices the host needs, each with the first reason found (R3):

        controllers of mounted filesystems and swap; the default-route NIC; the boot VGA; the
        virtio device of a mounted 9p/virtiofs share; the NIC carrying the route to the server
        of a network filesystem (NFS, SMB, Ceph, GlusterFS, 9p over TCP) or of an iSCSI disk in
        use; the device of a console= console; the virtio-serial device of the guest agent;
        and what ``listed`` (policy.critical) names."""
        critical: dict[PciAddress, str] = {}

        def add(found: Iterable[tuple[PciAddress, str]]) -> None:
            for a, reason in found:
                critical.setdefault(a, reason)

        mounts = parse_mountinfo(self._proc_text("self/mountinfo"))
        seen: set[str] = set()
        for m in mounts:
            name = self._mount_block(m)
            if name:
                add((a, f"controller of a mounted filesystem ({shown(m.mountpoint)})")
                    for a in self._block_holders(name, seen))
        swaps = []
        for line in self._proc_text("swaps").splitlines()[1:]:
            dev = line.split()[0] if line.split() else ""
            if dev.startswith("/dev/"):
                swaps.append(dev)
                add((a, f"controller of swap device {shown(dev)}")
                    for a in self._block_holders(os.path.basename(dev), seen))
        for iface in self.default_route_interfaces():
            for a in self._net_devices(iface, set()):
                critical.setdefault(a, f"NIC carrying the default route ({iface})")
        for addr in self.device_addresses():
            if self._read(self._dev(addr, "boot_vga")) == "1":
                critical.setdefault(addr, "boot VGA (the host console)")
        routes = parse_routes(self._proc_text("net/route"), self._proc_text("net/ipv6_route"))
        iscsi_seen: set[str] = set()
        for m in mounts:
            add(self._shared_fs(m))
            add(self._network_mount(m, routes, iscsi_seen))
        for dev in swaps:
            add(self._route_nics("iSCSI target", self._iscsi_targets(os.path.basename(dev), iscsi_seen), routes))
        add(self._consoles())
        add(self._agent_channels())
        add(self._listed(listed, mounts, routes))
        return critical

    def default_route_interfaces(self) -> list[str]:
        out = []
        try:
            for line in self.backend.proc_read("net/route").splitlines()[1:]:
                f = line.split()
                if len(f) > 2 and f[1] == "00000000" and f[7] == "00000000" and _NAME_RE.match(f[0]):
                    out.append(f[0])
        except (OSError, IndexError):
            pass
        try:
            for line in self.backend.proc_read("net/ipv6_route").splitlines():
                f = line.split()
                if len(f) == 10 and f[0] == "0" * 32 and f[1] == "00" and _NAME_RE.match(f[9]) and f[9] != "lo":
                    out.append(f[9])
        except OSError:
            pass
        return sorted(set(out))

    def _net_devices(self, iface: str, seen: set[str]) -> list[PciAddress]:
        """PCI functions under a netdev, through bonds, bridges and VLANs."""
        if iface in seen or not _safe_name(iface):
            return []
        seen.add(iface)
        # class/net/<if> links to the full devices/ path (.../0000:00:03.0/virtio2/net/eth0);
        # its device link may point at an intermediate bus device (virtio2).
        chain = self._pci_in_link(f"class/net/{iface}") or self._pci_in_link(f"class/net/{iface}/device")
        if chain:
            return chain[-1:]
        out: list[PciAddress] = []
        try:
            entries = self.backend.listdir(f"class/net/{iface}")
        except OSError:
            entries = []
        for e in entries:
            if e.startswith("lower_"):
                out += self._net_devices(e[6:], seen)
        try:
            for e in self.backend.listdir(f"class/net/{iface}/brif"):
                out += self._net_devices(e, seen)
        except OSError:
            pass
        return out
