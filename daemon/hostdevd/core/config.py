"""/etc/hostdevd/hostdevd.toml: tomllib + pydantic, one clear error line per mistake."""
from __future__ import annotations

import fnmatch
import json
import posixpath
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from .address import PciAddress
from .errors import ConfigError, InvalidAddress

DEFAULT_PATH = "/etc/hostdevd/hostdevd.toml"
_VD_RE = re.compile(r"^[0-9a-fA-F]{4}:(?:[0-9a-fA-F]{4}|\*)$")
_NETDEV_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")

ResetPreference = Literal["auto", "flr", "pm", "bus", "device_specific", "none"]


def _check_matcher(value: str) -> str:
    """A device matcher is a PCI address (DDDD:BB:SS.F or BB:SS.F) or vendor:device (device may be *)."""
    if _VD_RE.match(value):
        return value.lower()
    try:
        return str(PciAddress.parse(value))
    except InvalidAddress:
        raise ValueError(f"{value!r} is neither a PCI address (0000:01:00.0) nor vendor:device (10de:1b80)") from None


Matcher = Annotated[str, AfterValidator(_check_matcher)]


class DeviceMatcher:
    """Matches a device by address or vendor:device."""

    def __init__(self, patterns: list[str]):
        self.patterns = [_check_matcher(p) for p in patterns]

    def matches(self, address: PciAddress, vendor: str | None = None, device: str | None = None) -> bool:
        for p in self.patterns:
            if _VD_RE.match(p):
                if vendor and device and fnmatch.fnmatchcase(f"{vendor}:{device}", p):
                    return True
            elif p == str(address):
                return True
        return False

    def __bool__(self) -> bool:
        return bool(self.patterns)


def _check_critical(value: str) -> str:
    """policy.critical: a PCI address, net:IFNAME or mount:/absolute/path."""
    if value.startswith("net:"):
        name = value[4:]
        if _NETDEV_RE.match(name) and name not in (".", "..") and not name.startswith("-"):
            return value
        raise ValueError(f"{value!r}: net: needs a network interface name (net:eth2)")
    if value.startswith("mount:"):
        path = value[6:]
        if not path.startswith("/") or any(c in path for c in "\0\n") or len(path) > 4096:
            raise ValueError(f"{value!r}: mount: needs an absolute path (mount:/srv/data)")
        return "mount:" + ("/" + posixpath.normpath(path).lstrip("/"))
    try:
        return str(PciAddress.parse(value))
    except InvalidAddress:
        raise ValueError(f"{value!r} is neither a PCI address (0000:05:00.0), net:IFNAME nor mount:/path") from None


CriticalRef = Annotated[str, AfterValidator(_check_critical)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PolicyConfig(_Strict):
    allow: list[Matcher] = Field(default_factory=list, description=(
        "When non-empty, only these devices (address or vendor:device) may be bound to vfio-pci."))
    deny: list[Matcher] = Field(default_factory=list, description="Devices that are never bound.")
    allow_host_critical: list[Matcher] = Field(default_factory=list, description=(
        "Explicit override: host-critical devices (root disk controller, default-route NIC, boot VGA) "
        "that may still be passed through."))
    critical: list[CriticalRef] = Field(default_factory=list, description=(
        "More host-critical devices, refused like the ones hostdevd finds itself (unless "
        "allow_host_critical names them): a PCI address (0000:05:00.0), net:IFNAME (the NIC(s) under that "
        "interface, through bridges, bonds and VLANs) or mount:/path (the device(s) behind that mount point)."))


class ResetConfig(_Strict):
    default: ResetPreference = "auto"
    devices: dict[Matcher, ResetPreference] = Field(default_factory=dict, description=(
        "Per-device reset preference, keyed by address or vendor:device."))


_UNIT_RE = re.compile(r"^[A-Za-z0-9:_.@\\-]{1,250}$")
_MODULE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Stopping these from inside hostdevd would deadlock the request that asked for it.
_FORBIDDEN_UNITS = ("hostdevd", "libvirtd", "virtqemud", "systemd-udevd", "dbus", "systemd-journald")


def _check_unit(value: str) -> str:
    if not _UNIT_RE.match(value) or value.startswith("-"):
        raise ValueError(f"{value!r} is not a systemd unit name (e.g. display-manager.service)")
    if "." not in value:
        value += ".service"
    if value.rsplit(".", 1)[0] in _FORBIDDEN_UNITS:
        raise ValueError(f"{value!r} cannot be stopped by hostdevd (hostdevd and libvirt need it)")
    return value


def _check_module(value: str) -> str:
    if not _MODULE_RE.match(value) or value.startswith("-"):
        raise ValueError(f"{value!r} is not a kernel module name (e.g. nvidia_drm)")
    if value.replace("-", "_") in ("vfio", "vfio_pci", "vfio_iommu_type1", "vfio_pci_core"):
        raise ValueError(f"{value!r} is what passthrough needs; hostdevd never unloads it")
    return value


def _check_vfio_driver(value: str) -> str:
    # Syntax only here: whether it is a vfio driver the running kernel has is the planner's to
    # refuse (core/variants.py), with the device it would have been bound to.
    if not _MODULE_RE.match(value) or value.startswith("-"):
        raise ValueError(f"{value!r} is not a driver name (e.g. mlx5_vfio_pci or vfio-pci)")
    return value


UnitName = Annotated[str, AfterValidator(_check_unit)]
ModuleName = Annotated[str, AfterValidator(_check_module)]
VfioDriverName = Annotated[str, AfterValidator(_check_vfio_driver)]


class HostActionConfig(_Strict):
    """What the host does to let go of a device before it is bound (and to take it back after)."""
    match: Annotated[list[Matcher], BeforeValidator(lambda v: [v] if isinstance(v, str) else v)] = Field(
        min_length=1, description=(
        "The device(s) these actions belong to: address or vendor:device (device may be *), or a list. "
        "They run when a group containing a matching device is bound to vfio-pci."))
    stop_units: list[UnitName] = Field(default_factory=list, description=(
        "systemd units stopped before binding (only those that were active) and started again after "
        "release, in reverse order (a display manager on a single-GPU host)."))
    unload_modules: list[ModuleName] = Field(default_factory=list, description=(
        "Kernel modules unloaded (modprobe -r) before binding, in this order, and loaded again "
        "(modprobe) before the devices go back to their drivers, in reverse order."))
    timeout: float = Field(default=30.0, gt=0, le=600, description="Seconds per systemctl/modprobe call.")

    @property
    def patterns(self) -> list[str]:
        return self.match


def _check_pf(value: str) -> str:
    """An SR-IOV PF: a PCI address, or the name of the PF's network interface."""
    try:
        return str(PciAddress.parse(value))
    except InvalidAddress:
        pass
    if _NETDEV_RE.match(value) and value not in (".", "..") and not value.startswith("-"):
        return value
    raise ValueError(f"{value!r} is neither a PCI address (0000:03:00.0) nor a network interface name (enp3s0f0)")


PfRef = Annotated[str, AfterValidator(_check_pf)]


def _unique_pfs(entries: list) -> list:
    seen = set()
    for e in entries:
        if e.pf in seen:
            raise ValueError(f"PF {e.pf} is configured twice")
        seen.add(e.pf)
    return entries


class SriovConfig(_Strict):
    """One SR-IOV PF whose VFs hostdevd creates at daemon start (and on `hostdevctl vfs set`)."""
    pf: PfRef = Field(description="The PF: PCI address (0000:03:00.0) or its netdev name (enp3s0f0).")
    numvfs: int = Field(ge=0, le=65535, description=(
        "How many VFs to create (written to sriov_numvfs through 0; at most sriov_totalvfs)."))
    autoprobe: bool = Field(default=False, description=(
        "sriov_drivers_autoprobe: whether new VFs are probed by host drivers (iavf, igbvf, mlx5_core). "
        "false keeps them driverless until a domain gets one."))
    wait_timeout: float = Field(default=60.0, gt=0, le=600, description=(
        "Seconds to wait for the VFs to appear (udev). Real NICs take tens of seconds for many VFs."))


def _check_listen(value: str) -> str:
    """Empty (off), or HOST:PORT: an IPv4 address, [IPv6] or a host name, and a port 1-65535 (127.0.0.1:9477)."""
    if value == "":
        return value
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        ok_host = ":" in host and all(c in "0123456789abcdefABCDEF:." for c in host[1:-1])
    else:
        ok_host = bool(_HOST_RE.match(host))
    if not sep or not ok_host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (127.0.0.1:9477, [::1]:9477), or \"\" for off")
    return value


_HOST_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})$")


class MetricsConfig(_Strict):
    """Prometheus metrics (README "Metrics"). Off unless asked: they show the host's devices and which
    domain holds which IOMMU group."""
    listen: Annotated[str, AfterValidator(_check_listen)] = Field(default="", description=(
        "Where the daemon serves /metrics over HTTP: HOST:PORT (e.g. 127.0.0.1:9477; [::1]:9477 for IPv6), "
        "or empty for off. Any address is allowed: the endpoint has no authentication, so listen on "
        "loopback unless a firewall guards it. The packaged unit allows only AF_UNIX and AF_NETLINK "
        "sockets: serving HTTP needs a drop-in adding AF_INET (AF_INET6). `hostdevctl metrics` and its "
        "--textfile work whether it is set or not."))


class Config(_Strict):
    libvirt_uri: str = "qemu:///system"
    state_dir: str = "/var/lib/hostdevd"
    runtime_dir: str = "/run/hostdevd"
    sysfs_root: str = "/sys"
    write_timeout: float = Field(default=10.0, gt=0, le=600)
    bind_verify_timeout: float = Field(default=5.0, gt=0, le=600)
    release_wait_timeout: float = Field(default=10.0, ge=0, le=600, description=(
        "How long release waits for QEMU to close /dev/vfio/N and the members' /dev/vfio/devices/vfioN "
        "(iommufd) before giving up on a group."))
    reserve: list[Matcher] = Field(default_factory=list, description=(
        "Devices (address or vendor:device) bound to vfio-pci when the daemon starts, before libvirt, "
        "and never handed back to a host driver: domains borrow them and return them to the reservation "
        "(the driverctl use case: GPUs that do not survive rebinding, NICs dedicated to guests)."))
    detach_timeout: float = Field(default=30.0, gt=0, le=600, description=(
        "How long `hostdevctl detach` waits for the guest to let go of a device (libvirt's "
        "DEVICE_REMOVED event) before it reports the device as still attached."))
    sriov: Annotated[list[SriovConfig], AfterValidator(_unique_pfs)] = Field(default_factory=list, description=(
        "SR-IOV PFs whose VFs the daemon creates at start, before reservations (each `[[sriov]]` entry)."))
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    reset: ResetConfig = Field(default_factory=ResetConfig)
    vfio_drivers: dict[Matcher, VfioDriverName] = Field(default_factory=dict, description=(
        "The vfio driver a device is bound to instead of the one modules.alias picks (vfio-pci or a "
        "variant such as mlx5_vfio_pci), keyed by address or vendor:device (an address wins). A "
        "domain's <driver model='...'/> wins over it; a name that is not a vfio driver is refused."))
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    host_actions: list[HostActionConfig] = Field(default_factory=list, description=(
        "Per-device host actions around binding: units to stop and modules to unload before a matching "
        "device's group goes to vfio-pci, undone after release and on rollback."))

    def reset_preference(self, address: PciAddress, vendor: str, device: str) -> str:
        for key, pref in self.reset.devices.items():
            if DeviceMatcher([key]).matches(address, vendor, device):
                return pref
        return self.reset.default

    def vfio_driver_for(self, address: PciAddress, vendor: str, device: str) -> str | None:
        """[vfio_drivers]: the device's address first, then the first vendor:device that matches."""
        if (name := self.vfio_drivers.get(str(address))) is not None:
            return name
        return next((n for k, n in self.vfio_drivers.items() if DeviceMatcher([k]).matches(address, vendor, device)),
                    None)

    def host_actions_for(self, address: PciAddress, vendor: str, device: str) -> list[HostActionConfig]:
        return [a for a in self.host_actions if DeviceMatcher(a.patterns).matches(address, vendor, device)]


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_config(text: str, source: str = DEFAULT_PATH) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}", "fix the syntax, then restart hostdevd") from e
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = _loc(err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        raise ConfigError(f"{source}: {key}: {msg}", "see README.md, section Configuration") from e


def load_config(path: str | None = None) -> Config:
    """Load the config; a missing file at the default path means defaults."""
    p = Path(path or DEFAULT_PATH)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        if path is None:
            return Config()
        raise ConfigError(f"{p}: no such config file", "create it or leave out --config") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read: {e}") from e
    return parse_config(text, str(p))


def config_json_schema() -> str:
    return json.dumps(Config.model_json_schema(), indent=2, sort_keys=True) + "\n"
