"""What makes a device host-critical, parsed from /proc text: pure functions, no I/O.

:meth:`hostdevd.core.sysfs.Sysfs.host_critical` reads the files and follows sysfs; this
module turns their text into facts:

* ``/proc/self/mountinfo`` (proc(5)): device number, mount point, filesystem type, source
  and super options of every mount, with the kernel's octal escapes undone;
* the servers a network filesystem depends on (NFS, SMB, Ceph, GlusterFS, 9p over TCP),
  from the super options the kernel prints (``addr=``, ``mon_addr=``) or the source;
* the interface carrying the route to an address (longest prefix, then lowest metric) from
  ``/proc/net/route`` and ``/proc/net/ipv6_route``: the main table only, policy routing
  (``ip rule``) is not seen;
* the consoles ``console=`` names on the kernel command line.

Host names are never resolved (no DNS from the daemon): a server given only by name (a
GlusterFS or SMB source without ``addr=``) is not tied to a NIC.
"""
from __future__ import annotations

import ipaddress
import re
import sys
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_OCTAL = re.compile(r"\\([0-7]{3})")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.:+-]{1,64}$")
RTF_UP = 0x0001
RTF_REJECT = 0x0200

# fstype -> what its servers are called in a reason
NETWORK_FS = {
    "nfs": "NFS server", "nfs4": "NFS server",
    "cifs": "SMB server", "smb3": "SMB server",
    "ceph": "Ceph monitor",
    "glusterfs": "GlusterFS server", "fuse.glusterfs": "GlusterFS server",
}


def unescape(field: str) -> str:
    """mountinfo's escapes: the kernel writes space, tab, newline and backslash as \\ooo."""
    return _OCTAL.sub(lambda m: chr(int(m[1], 8)), field)


def shown(text: str, limit: int = 64) -> str:
    """A name from /proc or sysfs made safe to put in a reason (printable, bounded)."""
    out = "".join(c if c.isprintable() else "?" for c in text)
    return out if len(out) <= limit else out[:limit - 1] + "…"


@dataclass(frozen=True)
class Mount:
    dev: str            # MAJ:MIN (0:N for filesystems without a block device, and btrfs)
    mountpoint: str
    fstype: str
    source: str
    options: str        # the super options (the last field)

    def option(self, key: str) -> list[str]:
        """Values of ``key=`` in the super options (``addr=`` is not ``clientaddr=``)."""
        return [o.split("=", 1)[1] for o in self.options.split(",") if o.startswith(key + "=")]

    @property
    def anonymous(self) -> bool:
        return self.dev.startswith("0:")


def parse_mountinfo(text: str) -> list[Mount]:
    """``ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS``."""
    out = []
    for line in text.splitlines():
        parts = line.split(" ")
        try:
            sep = parts.index("-", 6)
        except ValueError:
            continue
        if len(parts) < sep + 3 or not re.fullmatch(r"\d+:\d+", parts[2]):
            continue
        out.append(Mount(dev=parts[2], mountpoint=unescape(parts[4]), fstype=parts[sep + 1],
                         source=unescape(parts[sep + 2]),
                         options=parts[sep + 3] if len(parts) > sep + 3 else ""))
    return out


def parse_address(text: str) -> tuple[IPAddress, str | None] | None:
    """An IP address with an optional port and scope: ``10.0.0.5``, ``10.0.0.5:6789``,
    ``[fd00::5]:6789``, ``fe80::1%eth1``. The scope is returned when it is an interface name."""
    t = text.strip()
    if t.startswith("["):
        end = t.find("]")
        if end < 0:
            return None
        host = t[1:end]
    elif t.count(":") == 1:
        host = t.split(":", 1)[0]          # IPv4 with a port
    else:
        host = t
    scope = None
    if "%" in host:
        host, scope = host.split("%", 1)
        if scope.isdigit() or not _IFNAME_RE.match(scope):
            scope = None
    try:
        return ipaddress.ip_address(host), scope
    except ValueError:
        return None


def _host_of(source: str) -> str:
    """``server:/export`` -> ``server``; ``[fd00::5]:/export`` -> ``[fd00::5]``."""
    if source.startswith("["):
        return source[:source.find("]") + 1]
    return source.split(":", 1)[0]


def network_servers(m: Mount) -> tuple[str, list[tuple[IPAddress, str | None]]] | None:
    """(what the servers are, their addresses) for a network filesystem; None for any other.

    NFS and SMB print the server's numeric address as ``addr=``; Ceph its monitors in the
    source (``10.0.0.1:6789,10.0.0.2:6789:/``) or, with the new device syntax
    (``user@fsid.fs=/``), as ``mon_addr=a/b``; GlusterFS (FUSE) and 9p over TCP only have the
    source, which may be a host name (not resolved)."""
    fs = m.fstype
    if fs == "9p":
        if not set(m.option("trans")) & {"tcp", "rdma"}:
            return None                     # virtio (the default), xen, fd: no network server
        kind, texts = "9p server", [m.source]
    elif fs not in NETWORK_FS:
        return None
    else:
        kind = NETWORK_FS[fs]
        if fs in ("nfs", "nfs4", "cifs", "smb3"):
            texts = m.option("addr")
            if not texts:
                host = m.source[2:].split("/", 1)[0] if m.source.startswith("//") else _host_of(m.source)
                texts = [host]
        elif fs == "ceph":
            texts = [a for v in m.option("mon_addr") for a in v.split("/")]
            if not texts and "=" not in m.source:
                texts = m.source.rsplit(":/", 1)[0].split(",")
        else:
            texts = [_host_of(m.source)]
    addrs = []
    for t in texts:
        a = parse_address(t)
        if a is not None and a not in addrs:
            addrs.append(a)
    return kind, addrs


@dataclass(frozen=True)
class Route:
    iface: str
    net: ipaddress.IPv4Network | ipaddress.IPv6Network
    metric: int


def _native_ipv4(hex8: str) -> ipaddress.IPv4Address:
    """/proc/net/route prints each __be32 as a number in host byte order."""
    return ipaddress.IPv4Address(int(hex8, 16).to_bytes(4, sys.byteorder))


def parse_routes(route: str, ipv6_route: str) -> list[Route]:
    """Usable routes from /proc/net/route and /proc/net/ipv6_route (up, not reject, not lo)."""
    out: list[Route] = []
    for line in route.splitlines()[1:]:
        f = line.split()
        try:
            if len(f) < 8 or not int(f[3], 16) & RTF_UP or int(f[3], 16) & RTF_REJECT:
                continue
            net = ipaddress.IPv4Network(f"{_native_ipv4(f[1])}/{_native_ipv4(f[7])}", strict=False)
            out.append(Route(f[0], net, int(f[6])))
        except ValueError:
            continue
    for line in ipv6_route.splitlines():
        f = line.split()
        try:
            if len(f) != 10 or not int(f[8], 16) & RTF_UP or int(f[8], 16) & RTF_REJECT:
                continue
            net6 = ipaddress.IPv6Network((int(f[0], 16), int(f[1], 16)), strict=False)
            out.append(Route(f[9], net6, int(f[5], 16)))
        except ValueError:
            continue
    return [r for r in out if r.iface != "lo" and _IFNAME_RE.match(r.iface)]


def route_interface(routes: list[Route], addr: IPAddress) -> str | None:
    """The interface of the most specific route to ``addr`` (ties: the lowest metric)."""
    best: Route | None = None
    for r in routes:
        if r.net.version != addr.version or addr not in r.net:
            continue
        if best is None or (r.net.prefixlen, -r.metric) > (best.net.prefixlen, -best.metric):
            best = r
    return best.iface if best else None


def console_names(cmdline: str) -> list[str]:
    """The devices ``console=`` names (``console=ttyS0,115200n8`` -> ``ttyS0``), in order."""
    out = []
    for tok in cmdline.split():
        if tok.startswith("console="):
            name = tok[len("console="):].strip('"').split(",", 1)[0]
            if name and name not in out:
                out.append(name)
    return out
