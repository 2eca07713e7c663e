"""Hot-plug (R9): ``hostdevctl attach``/``detach`` through the daemon, and devices hot-added or removed
by other tools (``virsh attach-device``) adopted and released from libvirt's device events.

libvirt is faked by :class:`FakeLibvirt`: running domains whose live XML lists the hot-plugged
devices with a guest address on a pcie-root-port, and a guest that lets go of a device (after a
delay, then DEVICE_REMOVED), refuses (DEVICE_REMOVAL_FAILED) or stays silent — the three things a
real guest does. Events arrive on another thread, as from libvirt's event loop.
"""
from __future__ import annotations

import logging
import threading
import time

import pytest

from hostdevd.core.address import PciAddress as A
from hostdevd.core.domxml import parse_device
from hostdevd.core.errors import LibvirtFailure, LibvirtUnavailable
from hostdevd.core.logfields import MSG
from hostdevd.core.sysfs import Sysfs
from hostdevd.doors.api import call
from hostdevd.doors.cli import main as cli_main

from .daemon_support import hostdev, running_daemon, uuid_for, vfio_bind_by_hand

NIC1 = "0000:01:00.0"                           # lab group 12, alone
PAIR, PAIR_B = "0000:04:00.0", "0000:04:00.1"   # lab group 15, multifunction e1000e pair
BRIDGE = "0000:05:00.0"                         # lab: the pcie-to-pci bridge
UUID = uuid_for(1)


class FakeLibvirt:
    """libvirt as the daemon's adapter sees it, with a guest of a chosen temper."""

    uri = "fake:///hotplug"

    def __init__(self):
        self.connected = False
        self.sink = None
        self.running: dict[str, list[str]] = {}      # domain -> device elements in the live XML
        self.persistent: dict[str, list[str]] = {}
        self.calls: list[tuple] = []
        self.guest = "cooperates"                    # | "refuses" | "silent"
        self.unplug_delay = 0.05
        self.fail_attach: str | None = None
        self._next = 0

    # ---- lifecycle
    def start(self, sink):
        self.sink, self.connected = sink, True
        sink.on_libvirt_connected()

    def stop(self):
        self.connected = False

    def define(self, name: str, running: bool = True) -> None:
        self.persistent[name] = []
        if running:
            self.running[name] = []

    # ---- questions
    def _xml(self, name: str) -> str:
        ctrls = "".join(f"<controller type='pci' index='{i}' model='pcie-root-port'/>" for i in range(1, 9))
        return (f"<domain type='kvm'><name>{name}</name><uuid>{UUID}</uuid><os><type machine='pc-q35-7.2'>"
                f"hvm</type></os><devices><controller type='pci' index='0' model='pcie-root'/>{ctrls}"
                + "".join(self.running[name]) + "</devices></domain>")

    def running_domains(self):
        if not self.connected:
            raise LibvirtUnavailable("down")
        return [(n, UUID, self._xml(n)) for n in self.running]

    def lookup(self, name, uuid=None):
        self.calls.append(("lookup", name))
        if name not in self.persistent and name not in self.running:
            return None
        return name, UUID, name in self.running

    def is_active(self, name, uuid=None):
        return name in self.running

    def domain_xml(self, name, uuid=None):
        return self._xml(name) if name in self.running else None

    # ---- hot-plug
    def _with_guest_address(self, xml: str) -> tuple[str, str]:
        self._next += 1
        alias = f"hostdev{self._next}"
        el = xml.replace("</hostdev>", f"<alias name='{alias}'/><address type='pci' domain='0x0000' "
                                       f"bus='0x0{self._next}' slot='0x00' function='0x0'/></hostdev>")
        return el, alias

    def attach_device(self, name, uuid, xml, config=False, live=True):
        self.calls.append(("attach", name, live, config, xml))
        if self.fail_attach:
            raise LibvirtFailure(self.fail_attach)
        if config:
            self.persistent[name].append(xml)
        if live:
            el, alias = self._with_guest_address(xml)
            self.running[name].append(el)
            self._event(name, "added", alias)

    def hot_add_behind_our_back(self, name, xml):
        """`virsh attach-device --live` with managed='yes': libvirt binds the device to vfio-pci itself."""
        el, alias = self._with_guest_address(xml)
        self.running[name].append(el)
        self._event(name, "added", alias)

    def detach_device(self, name, uuid, xml, config=False, live=True):
        self.calls.append(("detach", name, live, config, xml))
        if config:
            want = parse_device(xml).addresses()
            self.persistent[name] = [x for x in self.persistent[name] if parse_device(x).addresses() != want]
        if not live:
            return
        want = parse_device(xml).addresses()
        el = next(x for x in self.running[name] if parse_device(x).addresses() == want)
        alias = parse_device(el).requests[0].alias
        if self.guest == "cooperates":
            def unplug():
                self.running[name].remove(el)
                self.sink.on_device_event(name, UUID, "removed", alias)
            threading.Timer(self.unplug_delay, unplug).start()
        elif self.guest == "refuses":
            self._event(name, "removal_failed", alias)

    def guest_lets_go_now(self, name, addr):
        el = next(x for x in self.running[name] if parse_device(x).addresses() == [A.parse(addr)])
        self.running[name].remove(el)
        self.sink.on_device_event(name, UUID, "removed", parse_device(el).requests[0].alias)

    def _event(self, name, kind, alias):
        threading.Timer(0.01, self.sink.on_device_event, args=(name, UUID, kind, alias)).start()


@pytest.fixture
def hot():
    lv = FakeLibvirt()
    lv.define("vm1")
    with running_daemon("lab", adapter=lv) as (d, sim, path):
        assert d.wait_idle()
        yield d, sim, path, lv


def attach(path, *addrs, **kw):
    return call(path, {"op": "attach", "domain": {"name": kw.pop("name", "vm1")}, "addresses": list(addrs), **kw})


def detach(path, *addrs, **kw):
    return call(path, {"op": "detach", "domain": {"name": kw.pop("name", "vm1")}, "addresses": list(addrs), **kw})


def hotplug_logs(caplog):
    return [r for r in caplog.records if getattr(r, "journal", {}).get("MESSAGE_ID") == MSG["hotplug"]]


# --------------------------------------------------------------------------- attach


def test_attach_prepares_the_whole_group_then_plugs_it_in(hot, caplog):
    d, sim, path, lv = hot
    caplog.set_level(logging.INFO, "hostdevd")
    r = attach(path, PAIR)
    assert r["ok"] and r["libvirt_attached"] and (r["live"], r["config"]) == (True, False)
    assert sim.driver(PAIR) == sim.driver(PAIR_B) == "vfio-pci", "the companion too"
    (_, name, live, config, xml), = [c for c in lv.calls if c[0] == "attach"]
    assert (name, live, config) == ("vm1", True, False)
    assert "managed='no'" in xml and parse_device(xml).addresses() == [A.parse(PAIR)]
    claim = d.engine.ledger().claim_for_group(15)
    assert claim.owner.uuid == UUID and claim.requested == [PAIR] and claim.device(PAIR_B).role == "companion"
    [rec] = hotplug_logs(caplog)
    assert rec.journal["ACTION"] == "attach" and rec.journal["RESULT"] == "ok" and rec.journal["DOMAIN_NAME"] == "vm1"
    assert d.wait_idle() and d.engine.ledger().claim_for_group(15).requested == [PAIR], "DEVICE_ADDED changes nothing"


def test_attach_with_config_also_changes_the_definition(hot):
    d, sim, path, lv = hot
    r = attach(path, NIC1, live=True, config=True)
    assert r["ok"] and (r["live"], r["config"]) == (True, True) and len(lv.persistent["vm1"]) == 1


def test_attach_failure_rolls_the_group_back(hot, caplog):
    d, sim, path, lv = hot
    lv.fail_attach = "internal error: unable to execute QEMU command 'device_add'"
    caplog.set_level(logging.INFO, "hostdevd")
    r = attach(path, PAIR)
    assert r["error"]["code"] == "LIBVIRT" and "device_add" in r["error"]["message"]
    assert sim.driver(PAIR) == sim.driver(PAIR_B) == "e1000e" and d.engine.ledger().claims == {}
    assert [x.journal["RESULT"] for x in hotplug_logs(caplog)] == ["failed"]


def test_attach_refused_by_the_planner_never_calls_libvirt(hot):
    d, sim, path, lv = hot
    assert call(path, {"op": "prepare", "domain": {"name": "vm2"}, "addresses": [PAIR_B]})["ok"]
    r = attach(path, PAIR)
    assert r["error"]["code"] == "REFUSED" and "vm2" in r["error"]["message"]
    assert r["error"].get("holders") == [{"group": 15, "owner": {"name": "vm2", "uuid": None, "kind": "domain"}}]
    r = attach(path, BRIDGE)
    assert r["error"]["code"] == "REFUSED" and "bridge" in r["error"]["message"]
    assert not [c for c in lv.calls if c[0] == "attach"]


def test_attach_to_a_stopped_domain_changes_its_definition_only(hot):
    d, sim, path, lv = hot
    lv.define("vm3", running=False)
    r = attach(path, PAIR, name="vm3")
    assert r["ok"] and (r["live"], r["config"]) == (False, True) and "when the domain starts" in r["note"]
    assert sim.driver(PAIR) == "e1000e" and d.engine.ledger().claims == {}
    assert len(lv.persistent["vm3"]) == 1
    r = attach(path, BRIDGE, name="vm3")                           # refused now, not at the next start
    assert r["error"]["code"] == "REFUSED"
    r = attach(path, PAIR, name="vm3", live=True)
    assert r["error"]["code"] == "REFUSED" and "not running" in r["error"]["message"]
    assert [x["code"] for x in r["error"]["refusals"]] == ["NOT_RUNNING"]     # every refusal has its code


def test_attach_to_an_unknown_domain(hot):
    d, sim, path, lv = hot
    r = attach(path, PAIR, name="nope")
    assert r["error"]["code"] == "LIBVIRT" and "no domain" in r["error"]["message"]
    assert sim.driver(PAIR) == "e1000e"


def test_attach_of_a_device_xml_keeps_the_callers_xml(hot):
    d, sim, path, lv = hot
    xml = hostdev(NIC1, managed="yes")
    r = call(path, {"op": "attach", "domain": {"name": "vm1"}, "xml": xml})
    assert r["ok"] and [c[4] for c in lv.calls if c[0] == "attach"] == [xml]


# --------------------------------------------------------------------------- detach


def test_detach_waits_for_the_guest_then_releases_the_group(hot, caplog):
    d, sim, path, lv = hot
    assert attach(path, PAIR)["ok"] and d.wait_idle()
    lv.unplug_delay = 0.4                                          # the guest takes its time
    caplog.set_level(logging.INFO, "hostdevd")
    t0 = time.monotonic()
    r = detach(path, PAIR)
    assert r["ok"] and r["removed"] == [PAIR] and r["pending"] == [] and r["groups"] == [15]
    assert 0.4 <= time.monotonic() - t0 < 5 and r["seconds"] >= 0.4
    assert sim.driver(PAIR) == sim.driver(PAIR_B) == "e1000e" and d.engine.ledger().claims == {}
    (_, _, live, config, xml), = [c for c in lv.calls if c[0] == "detach"]
    assert "alias" in xml, "libvirt gets the live element"
    assert [(x.journal["ACTION"], x.journal["RESULT"]) for x in hotplug_logs(caplog)] == [("detach", "ok")]
    assert d.wait_idle() and d.engine.ledger().claims == {}, "the DEVICE_REMOVED handler finds nothing left"


def test_detach_of_a_silent_guest_times_out_and_keeps_the_claim(hot, caplog):
    d, sim, path, lv = hot
    assert attach(path, PAIR)["ok"]
    lv.guest = "silent"                                            # a paused or busy guest
    caplog.set_level(logging.INFO, "hostdevd")
    r = detach(path, PAIR, timeout=0.3)
    assert r["ok"] and r["pending"] == [PAIR] and r["removed"] == [] and r["groups"] == []
    assert "has not released within 0.3 s" in r["note"]
    assert sim.driver(PAIR) == "vfio-pci" and d.engine.ledger().claim_for_group(15).state == "active"
    assert hotplug_logs(caplog)[-1].journal["RESULT"] == "pending"
    lv.guest_lets_go_now("vm1", PAIR)                              # later: DEVICE_REMOVED
    assert d.wait_idle()
    assert d.engine.ledger().claims == {} and sim.driver(PAIR) == sim.driver(PAIR_B) == "e1000e"


def test_detach_refused_by_the_guest_keeps_the_claim_and_says_so(hot, caplog):
    d, sim, path, lv = hot
    assert attach(path, NIC1)["ok"]
    lv.guest = "refuses"
    caplog.set_level(logging.INFO, "hostdevd")
    t0 = time.monotonic()
    r = detach(path, NIC1, timeout=20)
    assert time.monotonic() - t0 < 5, "DEVICE_REMOVAL_FAILED ends the wait"
    assert r["ok"] and r["pending"] == [NIC1] and r["removal_failed"] == [NIC1] and "refused" in r["note"]
    assert sim.driver(NIC1) == "vfio-pci" and d.engine.ledger().claim_for_group(12) is not None
    results = {x.journal["RESULT"] for x in hotplug_logs(caplog)}
    assert "removal-failed" in results


def test_detach_keeps_a_group_another_device_of_the_domain_uses(hot):
    d, sim, path, lv = hot
    assert attach(path, PAIR)["ok"] and attach(path, PAIR_B)["ok"]
    r = detach(path, PAIR)
    assert r["ok"] and r["removed"] == [PAIR] and r["groups"] == []
    assert sim.driver(PAIR) == sim.driver(PAIR_B) == "vfio-pci"
    assert d.engine.ledger().claim_for_group(15).requested == [PAIR_B]
    assert detach(path, PAIR_B)["groups"] == [15] and sim.driver(PAIR) == "e1000e"


def test_detach_config_only_leaves_the_running_guest_and_its_claims_alone(hot):
    d, sim, path, lv = hot
    assert attach(path, NIC1, live=True, config=True)["ok"]
    r = detach(path, NIC1, config=True)
    assert r["ok"] and (r["live"], r["config"]) == (False, True) and r["groups"] == []
    assert lv.persistent["vm1"] == [] and len(lv.running["vm1"]) == 1
    assert sim.driver(NIC1) == "vfio-pci" and d.engine.ledger().claim_for_group(12) is not None


def test_detach_of_something_not_attached(hot):
    d, sim, path, lv = hot
    r = detach(path, NIC1)
    assert r["error"]["code"] == "NOT_FOUND" and "not attached to vm1" in r["error"]["message"]


def test_detach_releases_a_claim_the_guest_no_longer_has(hot):
    d, sim, path, lv = hot
    assert call(path, {"op": "prepare", "domain": {"name": "vm1", "uuid": UUID}, "addresses": [NIC1]})["ok"]
    r = detach(path, NIC1)                                         # claimed, but not in the live XML
    assert r["ok"] and r["groups"] == [12] and r["libvirt_detached"] is False
    assert not [c for c in lv.calls if c[0] == "detach"] and sim.driver(NIC1) == "e1000e"


def test_detach_when_the_domain_stops_meanwhile(hot):
    d, sim, path, lv = hot
    assert attach(path, NIC1)["ok"]
    lv.guest = "silent"
    threading.Timer(0.2, lambda: lv.running.pop("vm1")).start()   # destroyed while we wait
    r = detach(path, NIC1, timeout=10)
    assert r["ok"] and r["pending"] == [] and r["groups"] == [12] and sim.driver(NIC1) == "e1000e"


def test_detach_and_attach_need_libvirt(hot):
    d, sim, path, lv = hot
    assert attach(path, NIC1)["ok"]
    with d._lv_lock:
        d._lv_connected = False
    assert detach(path, NIC1)["error"]["code"] == "LIBVIRT_UNAVAILABLE"
    assert attach(path, PAIR)["error"]["code"] == "LIBVIRT_UNAVAILABLE"
    assert sim.driver(NIC1) == "vfio-pci" and sim.driver(PAIR) == "e1000e"


# --------------------------------------------------------------------------- behind hostdevd's back


def test_device_hot_added_by_another_tool_is_adopted_and_released_when_removed(hot):
    d, sim, path, lv = hot
    vfio_bind_by_hand(d.engine, NIC1)              # libvirt's managed detach (no hook for hotplug)
    lv.hot_add_behind_our_back("vm1", hostdev(NIC1, managed="yes"))
    deadline = time.monotonic() + 5
    while d.engine.ledger().claim_for_group(12) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    claim = d.engine.ledger().claim_for_group(12)
    assert claim is not None and claim.owner.name == "vm1" and claim.owner.uuid == UUID
    assert claim.requested == [NIC1] and any("adopted" in n for n in claim.notes)
    lv.guest_lets_go_now("vm1", NIC1)              # virsh detach-device; libvirt rebinds a managed device
    assert d.wait_idle() and d.engine.ledger().claims == {}
    assert sim.driver(NIC1) == "vfio-pci", "original driver unknown to hostdevd: left where libvirt put it"


def test_hot_add_of_a_device_in_a_held_group_is_a_conflict_not_an_adoption(hot, caplog):
    d, sim, path, lv = hot
    assert call(path, {"op": "prepare", "domain": {"name": "vm2"}, "addresses": [PAIR_B]})["ok"]
    caplog.set_level(logging.WARNING, "hostdevd")
    lv.hot_add_behind_our_back("vm1", hostdev(PAIR, managed="yes"))
    time.sleep(0.1)
    assert d.wait_idle()
    assert d.engine.ledger().claim_for_group(15).owner.name == "vm2"
    assert any("vm2" in r.getMessage() and "vm1" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- hostdevctl


def test_hostdevctl_attach_and_detach(hot, tmp_path):
    d, sim, path, lv = hot
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_dir = "{d.engine.config.state_dir}"\nruntime_dir = "{d.engine.config.runtime_dir}"\n')
    lines: list[str] = []
    rc = cli_main(["--config", str(cfg), "attach", "vm1", "--device", PAIR], sysfs=Sysfs(sim, 2.0),
                  out=lines.append)
    assert rc == 0 and lines[0].startswith(f"attached {PAIR} to vm1 (live): OK in ")
    assert f"group 15: bound {PAIR}, {PAIR_B}; companions {PAIR_B}" in lines[1]
    lines.clear()
    rc = cli_main(["--config", str(cfg), "detach", "vm1", "--device", PAIR], sysfs=Sysfs(sim, 2.0),
                  out=lines.append)
    assert rc == 0 and lines[0].startswith(f"detach {PAIR} from vm1 (live): OK in ")
    assert "released group 15" in "\n".join(lines)
    assert attach(path, NIC1)["ok"]
    lv.guest = "silent"
    lines.clear()
    rc = cli_main(["--config", str(cfg), "detach", "vm1", "--device", NIC1, "--timeout", "0.2"],
                  sysfs=Sysfs(sim, 2.0), out=lines.append)
    assert rc == 1 and "PENDING" in lines[0] and "stays attached" in "\n".join(lines)
    lines.clear()
    rc = cli_main(["--config", str(cfg), "attach", "vm1", "--device", BRIDGE], sysfs=Sysfs(sim, 2.0),
                  out=lines.append)
    assert rc == 1 and "FAILED" in lines[0] and "bridge" in "\n".join(lines)


def test_hostdevctl_attach_usage(hot, tmp_path, capsys):
    d, sim, path, lv = hot
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'runtime_dir = "{d.engine.config.runtime_dir}"\n')
    rc = cli_main(["--config", str(cfg), "attach", "vm1"], out=lambda s: None)
    assert rc == 2 and "give a device XML file or --device" in capsys.readouterr().err
