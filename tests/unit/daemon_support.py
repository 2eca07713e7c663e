"""Helpers for the daemon-layer tests: a Daemon on a simulated kernel, short socket paths, XML."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from hostdevd.doors.service import Daemon
from hostdevd.sim.simkernel import SimKernel

from .conftest import load_sim, make_engine


def short_dir() -> Path:
    """AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer."""
    return Path(tempfile.mkdtemp(prefix="hd", dir="/tmp"))


@contextlib.contextmanager
def running_daemon(sim: SimKernel | str = "lab", adapter=None, read_timeout: float = 5.0,
                   state_dir: Path | None = None, start: bool = True, config_text: str = "", netlink=None):
    """A started Daemon on ``sim``; yields (daemon, sim, socket path)."""
    if isinstance(sim, str):
        sim = load_sim(sim)
    base = short_dir()
    try:
        engine = make_engine(sim, state_dir or base / "state", config_text, netlink=netlink)
        engine.config.runtime_dir = str(base / "run")
        daemon = Daemon(engine.config, engine, adapter, sock_path=str(base / "run" / "hostdevd.sock"),
                        read_timeout=read_timeout)
        if start:
            daemon.start()
        try:
            yield daemon, sim, daemon.server.path
        finally:
            if start:
                daemon.stop(drain_timeout=2)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def hostdev(addr: str, managed: str = "yes") -> str:
    dom, rest = addr.split(":", 1)
    bus, rest = rest.split(":")
    slot, fn = rest.split(".")
    return (f"<hostdev mode='subsystem' type='pci' managed='{managed}'><source>"
            f"<address domain='0x{dom}' bus='0x{bus}' slot='0x{slot}' function='0x{fn}'/></source></hostdev>")


def domain_xml(name: str, uuid: str | None, *addresses: str, extra: str = "", dtype: str = "kvm") -> str:
    devs = "".join(hostdev(a) for a in addresses)
    uuid_el = f"<uuid>{uuid}</uuid>" if uuid else ""
    return (f"<domain type='{dtype}'><name>{name}</name>{uuid_el}<memory>1024</memory>"
            f"<os><type>hvm</type></os><devices>{devs}{extra}</devices></domain>")


def uuid_for(i: int) -> str:
    return f"00000000-0000-0000-0000-{i:012x}"


def singleton_groups_spec(n: int = 16) -> dict:
    """``n`` e1000e NICs on bus 0, each alone in its own IOMMU group."""
    return {
        "iommu": True,
        "drivers": {"e1000e": {"ids": ["8086:10d3"]}},
        "devices": [{"address": f"0000:00:{i + 1:02x}.0", "vendor": "8086", "device": "10d3",
                     "class": "020000", "group": 100 + i, "driver": "e1000e"} for i in range(n)],
    }


def vfio_bind_by_hand(eng, addr: str) -> None:
    """What libvirt's managed detach (or driverctl) does, behind hostdevd's back."""
    from hostdevd.core.address import PciAddress

    a = PciAddress.parse(addr)
    if not eng.sysfs.driver_loaded("vfio-pci"):
        eng.executor.modprobe("vfio-pci")
    eng.sysfs.set_driver_override(a, "vfio-pci")
    eng.sysfs.unbind(a)
    eng.sysfs.drivers_probe(a)
    assert eng.sysfs.driver(a) == "vfio-pci"
