"""The hot-plug door: libvirt's attach and detach around the engine's prepare and release.

``hostdevctl attach`` prepares the whole group (engine), then asks libvirt to attach; if
libvirt refuses, what this attach claimed is given back. ``hostdevctl detach`` asks libvirt
to detach, waits for the guest to let go (DEVICE_REMOVED, or the live XML without the device),
then the engine releases the group if nothing else of the domain uses it. Both hold the
domain's gate for the whole request. What to prepare, release or refuse is the engine's;
what is here is libvirt's part: virsh's --live/--config semantics, the calls and the wait.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ..core.address import PciAddress
from ..core.domxml import DomainRequest, guest_placements
from ..core.engine import Engine
from ..core.errors import LibvirtFailure, LibvirtUnavailable, NotFound, Reason, Refused
from ..core.ledger import Owner
from ..core.logfields import log_action
from ..core.netreq import net_requests
from .gate import DomainGate
from .ports import DeviceAdapter

log = logging.getLogger("hostdevd.service")


def hostdev_xml(addr: PciAddress) -> str:
    """A ``<hostdev>`` for an address hostdevd prepared (managed='no': libvirt must not rebind it)."""
    return ("<hostdev mode='subsystem' type='pci' managed='no'><source>"
            f"<address domain='0x{addr.domain:04x}' bus='0x{addr.bus:02x}' slot='0x{addr.slot:02x}' "
            f"function='0x{addr.function:x}'/></source></hostdev>")


def affect(live: bool, config: bool, active: bool | None, op: str, name: str) -> tuple[bool, bool]:
    """virsh's --live/--config/--current: neither flag means the domain's current state."""
    if not live and not config:
        live, config = bool(active), not active
    if live and not active:
        raise Refused(f"{name} is not running: nothing to {op} live",
                      f"leave out --live to change {name}'s persistent definition (--config), or start it",
                      reason=Reason.NOT_RUNNING)
    return live, config


class DeviceEvents:
    """libvirt's device events per domain, numbered, so a detach can wait for DEVICE_REMOVED."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._seq = 0
        self._events: dict[str, list[tuple[int, str, str | None]]] = {}

    def record(self, name: str, kind: str, alias: str | None) -> None:
        with self._cond:
            self._seq += 1
            seen = self._events.setdefault(name, [])
            seen.append((self._seq, kind, alias))
            del seen[:-100]
            self._cond.notify_all()

    def newest(self, name: str) -> int:
        """The newest device event number of ``name`` (0: none yet)."""
        with self._cond:
            events = self._events.get(name)
            return events[-1][0] if events else 0

    def since(self, name: str, seq: int) -> list[tuple[str, str | None]]:
        with self._cond:
            return [(k, a) for n, k, a in self._events.get(name, []) if n > seq]

    def wait_newer(self, name: str, seen: int, timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.newest_locked(name) > seen, timeout)

    def newest_locked(self, name: str) -> int:
        events = self._events.get(name)
        return events[-1][0] if events else 0


class Hotplug:
    def __init__(self, engine: Engine, gate: DomainGate, adapter: DeviceAdapter, detach_timeout: float):
        self.engine = engine
        self.gate = gate
        self.adapter = adapter
        self.detach_timeout = detach_timeout
        self.events = DeviceEvents()

    def attach(self, owner: Owner, active: bool | None, parsed: DomainRequest | None, addrs: list[PciAddress],
               xml: str | None, live: bool, config: bool) -> dict[str, Any]:
        live, config = affect(live, config, active, "attach", owner.name)
        xmls = [xml] if xml is not None else [hostdev_xml(a) for a in addrs]
        t0 = time.monotonic()
        with self.gate.request(owner.name):
            reply: dict[str, Any] = {"owner": owner.model_dump(), "live": live, "config": config,
                                     "libvirt_attached": False}
            if not live:
                # Persistent definition only: nothing is bound now, the hook prepares the group at start.
                plan = self.engine.check_attachable(owner, addrs, parsed.driver_models() if parsed else None)
                for x in xmls:
                    self.adapter.attach_device(owner.name, owner.uuid, x, config=True, live=False)
                reply.update(libvirt_attached=True, plan=plan.to_json(), groups=[],
                             note=f"added to {owner.name}'s persistent definition; hostdevd prepares the group "
                                  "when the domain starts")
                return reply
            # An <interface type='hostdev'> carries the VF's MAC/VLAN: recorded (and set) as at start.
            with self.gate.lock(owner.name):
                attached = self.engine.attach_prepare(owner, addrs, net_requests(parsed),
                                                      parsed.driver_models() if parsed else None)
            reply.update(groups=attached.result.groups, plan=attached.plan.to_json(),
                         result=attached.result.to_json())
            done: list[str] = []
            try:
                for x in xmls:
                    self.adapter.attach_device(owner.name, owner.uuid, x, config=config, live=True)
                    done.append(x)
            except LibvirtFailure as e:
                problems = []
                for x in reversed(done):
                    try:
                        self.adapter.detach_device(owner.name, owner.uuid, x, config=config, live=True)
                    except LibvirtFailure as e2:
                        problems.append(f"detach back failed: {e2.message}")
                if not problems:
                    with self.gate.lock(owner.name):
                        problems += self.engine.attach_rollback(attached)
                if problems:
                    e.message += "; rollback incomplete: " + "; ".join(problems)
                log_action(log, logging.ERROR, "hotplug", "attach of %s to %s failed, %s: %s",
                           ", ".join(map(str, addrs)), owner.label(),
                           "rollback incomplete" if problems else "rolled back", e.message, owner=owner,
                           action="attach", result="failed")
                raise
            reply["libvirt_attached"] = True
            reply["seconds"] = round(time.monotonic() - t0, 3)
            log_action(log, logging.INFO, "hotplug", "attached %s to %s in %.0f ms (groups %s prepared)",
                       ", ".join(map(str, addrs)), owner.label(), reply["seconds"] * 1000,
                       ", ".join(map(str, attached.result.groups)), owner=owner, action="attach", result="ok")
            return reply

    def detach(self, owner: Owner, active: bool | None, addrs: list[PciAddress], xml: str | None,
               live: bool, config: bool, timeout: float | None) -> dict[str, Any]:
        live, config = affect(live, config, active, "detach", owner.name)
        timeout = timeout if timeout is not None else self.detach_timeout
        t0 = time.monotonic()
        reply: dict[str, Any] = {"owner": owner.model_dump(), "live": live, "config": config,
                                 "libvirt_detached": False, "removed": [], "pending": [], "removal_failed": [],
                                 "groups": [], "warnings": []}
        with self.gate.request(owner.name):
            claimed = {a for c in self.engine.ledger().claims_of(owner) for a in c.requested}
            present: list[PciAddress] = []
            still: list[PciAddress] = []
            if live:
                xml_now = self.adapter.domain_xml(owner.name, owner.uuid)
                placement = guest_placements(xml_now) if xml_now is not None else None
                placed = {a: p for a in addrs if placement is not None and (p := placement.get(a)) is not None}
                present = list(placed)
                missing = [str(a) for a in addrs if a not in placed and str(a) not in claimed]
                if missing and not config:
                    raise NotFound(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not attached to "
                                   f"{owner.name}", f"`virsh dumpxml {owner.name}` shows its devices")
                seq = self.events.newest(owner.name)
                aliases = {p.alias: a for a, p in placed.items() if p.alias}
                for p in placed.values():
                    # The live element itself: libvirt matches it whether it is a <hostdev> or an
                    # <interface type='hostdev'>, managed or not.
                    self.adapter.detach_device(owner.name, owner.uuid, p.xml, config=False, live=True)
                reply["libvirt_detached"] = bool(present)
                still, failed = self._wait_removed(owner, present, aliases, seq, timeout)
                reply["removal_failed"] = [str(a) for a in failed]
            if config:
                for x in ([xml] if xml is not None else [hostdev_xml(a) for a in addrs]):
                    try:
                        self.adapter.detach_device(owner.name, owner.uuid, x, config=True, live=False)
                    except LibvirtFailure as e:
                        reply["warnings"].append(f"persistent definition unchanged: {e.message}")
            with self.gate.lock(owner.name):
                released, release = self.engine.detach_release(owner, addrs, guest_had=present, still_attached=still,
                                                               guest_changed=live or not active)
            if release is not None:
                reply["groups"], reply["warnings"] = release.groups, reply["warnings"] + release.extras["warnings"]
            reply["removed"] = [str(a) for a in present if a not in still]
            reply["pending"] = [str(a) for a in still]
        reply["seconds"] = round(time.monotonic() - t0, 3)
        if still:
            why = ("the guest refused to release" if reply["removal_failed"] else
                   f"the guest has not released within {timeout:g} s")
            reply["note"] = (f"{why} {', '.join(reply['pending'])}; the device stays attached and its group "
                             "claimed; hostdevd releases it when libvirt reports the device removed")
            log_action(log, logging.WARNING, "hotplug", "detach from %s: %s %s; group kept claimed",
                       owner.label(), why, ", ".join(reply["pending"]), owner=owner, action="detach",
                       result="removal-failed" if reply["removal_failed"] else "pending")
        elif released:
            log_action(log, logging.INFO, "hotplug", "detached %s from %s in %.0f ms; released groups %s",
                       ", ".join(map(str, released)), owner.label(), reply["seconds"] * 1000,
                       ", ".join(map(str, reply["groups"])) or "-", owner=owner, action="detach", result="ok")
        return reply

    def _wait_removed(self, owner: Owner, present: list[PciAddress], aliases: dict[str, PciAddress], seq: int,
                      timeout: float) -> tuple[list[PciAddress], list[PciAddress]]:
        """Wait for the guest to let go (DEVICE_REMOVED, or the live XML without the device).

        Returns (still attached, refused by the guest). Looks at the live XML after
        every device event of the domain and at least once a second.
        """
        if not present:
            return [], []
        deadline = time.monotonic() + timeout
        still = list(present)
        while True:
            try:
                xml_now = self.adapter.domain_xml(owner.name, owner.uuid)
            except LibvirtUnavailable:
                xml_now = ""             # unknown: keep waiting, keep the claim
            if xml_now is None:
                return [], []            # the domain stopped: nothing is attached any more
            if xml_now:
                placement = guest_placements(xml_now)
                still = [a for a in present if placement.get(a) is not None]
                if not still:
                    return [], []
            seen = self.events.newest(owner.name)
            failed = [aliases[al] for k, al in self.events.since(owner.name, seq)
                      if k == "removal_failed" and al in aliases]
            if failed:
                return still, [a for a in failed if a in still]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return still, []
            self.events.wait_newer(owner.name, seen, min(1.0, remaining))
