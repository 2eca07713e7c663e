"""Where the doors plug the adapters into the core: one place builds the Engine of a real host.

The core has no default that imports an outside library: on a host under /sys the VF
network settings go through pyroute2 (:mod:`hostdevd.adapters.netlink`) and new VFs are
awaited through udev (:mod:`hostdevd.adapters.udev`); the simulated kernel and a moved
sysfs root get neither (sysfs polling, no netlink), as the core's defaults say.
"""
from __future__ import annotations

from collections.abc import Callable

from ..adapters.netlink import default_netlink
from ..adapters.udev import default_waiter
from ..core.config import Config
from ..core.engine import Engine
from ..core.executor import default_modprobe
from ..core.ledger_store import LedgerStore
from ..core.sysfs import RealHost, Sysfs
from ..core.vfnet import NetlinkBackend


def host_engine(config: Config, sysfs: Sysfs | None = None, store: LedgerStore | None = None, *,
                netlink: NetlinkBackend | None = None, modprobe: Callable[[str], None] | None = None) -> Engine:
    """The Engine the daemon and hostdevctl run: the same code whether or not the daemon is up."""
    sysfs = sysfs or Sysfs(RealHost(config.sysfs_root), config.write_timeout)
    return Engine(config, sysfs, store or LedgerStore(config.state_dir),
                  modprobe=modprobe if modprobe is not None else default_modprobe,
                  netlink=netlink if netlink is not None else default_netlink(sysfs),
                  vf_waiter=default_waiter(sysfs))
