"""Live migration (R9's migrate hook, ``hostdevctl check-migrate``): which assigned devices block it,
which can be hot-unplugged first, the unplug → migrate → replug steps; the hook's migrate phase
prints the XML unchanged, reports on stderr and never blocks or fails."""
from __future__ import annotations

import socket
import threading

import pytest

from hostdevd.core.address import PciAddress as A
from hostdevd.core.domxml import guest_placements
from hostdevd.core.errors import InvalidXML
from hostdevd.core.ledger import Owner
from hostdevd.core.migrate import assess
from hostdevd.core.sysfs import Sysfs
from hostdevd.doors.api import call
from hostdevd.doors.cli import main as cli_main

from .conftest import load_sim, make_engine
from .daemon_support import running_daemon, short_dir
from .test_hook import install_hook, run_hook
from .test_hotplug import UUID, FakeLibvirt

PAIR, PAIR_B = "0000:04:00.0", "0000:04:00.1"
NIC1 = "0000:01:00.0"


def hd(host: str, guest: str | None = None, *, multifunction: bool = False, alias: str | None = None,
       iface: bool = False) -> str:
    d, b, rest = host.split(":")
    s, f = rest.split(".")
    src = f"<address domain='0x{d}' bus='0x{b}' slot='0x{s}' function='0x{f}'/>"
    addr = ""
    if guest:
        gb, gs, gf = guest.split(":")[1], guest.split(":")[2].split(".")[0], guest.split(".")[1]
        addr = (f"<address type='pci' domain='0x0000' bus='0x{gb}' slot='0x{gs}' function='0x{gf}'"
                + (" multifunction='on'" if multifunction else "") + "/>")
    al = f"<alias name='{alias}'/>" if alias else ""
    if iface:
        return (f"<interface type='hostdev' managed='yes'><mac address='52:54:00:00:00:01'/><source>{src}"
                f"</source>{al}{addr}</interface>")
    return f"<hostdev mode='subsystem' type='pci' managed='yes'><source>{src}</source>{al}{addr}</hostdev>"


def dom(*devices: str, name: str = "vm1", machine: str = "pc-q35-7.2", extra: str = "") -> str:
    ctrls = ("<controller type='pci' index='0' model='pcie-root'/>"
             "<controller type='pci' index='1' model='pcie-root-port'/>"
             "<controller type='pci' index='2' model='pcie-root-port'/>"
             "<controller type='pci' index='3' model='pcie-root-port'><target hotplug='off'/></controller>"
             "<controller type='pci' index='4' model='pcie-expander-bus'/>")
    return (f"<domain type='kvm'><name>{name}</name><uuid>{UUID}</uuid><os><type machine='{machine}'>hvm</type>"
            f"</os><devices>{ctrls}{extra}{''.join(devices)}</devices></domain>")


# --------------------------------------------------------------------------- guest placement


def test_guest_placements_read_the_guest_side():
    p = guest_placements(dom(hd(PAIR, "0000:01:00.0", alias="hostdev0"), hd(NIC1, "0000:00:05.0"),
                             hd("0000:06:01.0", "0000:02:00.0", multifunction=True),
                             hd("0000:06:02.0", "0000:02:00.1")))
    assert p.machine == "pc-q35-7.2" and p.uuid == UUID
    a, b, c, d = p.devices
    assert (a.guest_bus, a.controller, a.alias, a.multifunction) == (1, "pcie-root-port", "hostdev0", False)
    assert (b.guest_bus, b.controller) == (0, "pcie-root")
    assert c.multifunction and d.multifunction, "function 1, and function 0 of a shared slot"
    assert a.xml.startswith("<hostdev") and "hostdev0" in a.xml and p.get(A.parse(NIC1)) is b


def test_guest_placement_refuses_ambiguous_numbers():
    with pytest.raises(InvalidXML, match="octal"):
        guest_placements(dom("<hostdev mode='subsystem' type='pci'><source><address domain='0' bus='4' "
                             "slot='0' function='0'/></source><address type='pci' bus='010' slot='0'/></hostdev>"))


# --------------------------------------------------------------------------- verdicts


@pytest.mark.parametrize("guest, kw, unplug, why", [
    ("0000:01:00.0", {}, True, "hot-pluggable slot"),
    ("0000:00:05.0", {}, False, "root complex"),
    ("0000:03:00.0", {}, False, "hotplug='off'"),
    ("0000:04:00.0", {}, False, "pcie-expander-bus"),
    ("0000:02:00.0", {"multifunction": True}, False, "multifunction"),
    (None, {}, None, "has not given it a guest address"),
])
def test_unplug_verdicts(guest, kw, unplug, why):
    r = assess("vm1", guest_placements(dom(hd(PAIR, guest, **kw))), [])
    [v] = r.devices
    assert r.blocked and v.blocks and v.unplug is unplug and why in v.reason


def test_i440fx_root_bus_is_hot_pluggable():
    x = ("<domain type='kvm'><name>old</name><os><type machine='pc-i440fx-7.2'>hvm</type></os><devices>"
         "<controller type='pci' index='0' model='pci-root'/>" + hd(NIC1, "0000:00:07.0") + "</devices></domain>")
    r = assess("old", guest_placements(x), [])
    assert r.devices[0].unplug is True and r.unplug_first == [NIC1]


def test_report_with_companions_steps_and_notes(tmp_path):
    sim = load_sim("lab")
    eng = make_engine(sim, tmp_path / "s")
    owner = Owner(name="vm1", uuid=UUID)
    eng.prepare([A.parse(PAIR)], owner)
    r = assess("vm1", guest_placements(dom(hd(PAIR, "0000:01:00.0"), hd(NIC1, "0000:02:00.0", iface=True))),
               eng.ledger().claims_of(owner), eng.topology())
    assert [(v.address, v.role, v.blocks, v.group) for v in r.devices] == [
        (PAIR, "requested", True, 15), (NIC1, "requested", True, 12), (PAIR_B, "companion", False, 15)]
    assert r.unplug_first == [PAIR, NIC1] and r.cannot_unplug == []
    assert r.steps() == [f"hostdevctl detach vm1 --device {PAIR}", f"hostdevctl detach vm1 --device {NIC1}",
                         "virsh migrate --live vm1 qemu+ssh://DEST/system",
                         f"hostdevctl attach vm1 --device BDF   # on DEST: its device replacing {PAIR}",
                         f"hostdevctl attach vm1 --device BDF   # on DEST: its device replacing {NIC1}"]
    assert any("interface type='hostdev'" in n for n in r.devices[1].notes)
    assert r.summary() == ("vm1: live migration BLOCKED by 2 assigned PCI devices (2 can be hot-unplugged first)")
    j = r.to_json()
    assert j["blocked"] and j["devices"][2]["unplug"] is None and j["source"] == "live XML"


def test_report_when_something_cannot_be_unplugged():
    r = assess("vm1", guest_placements(dom(hd(PAIR, "0000:01:00.0"), hd(NIC1, "0000:00:05.0"))), [])
    assert r.cannot_unplug == [NIC1] and r.steps()[0].startswith("stop vm1 (or migrate it offline")
    assert "1 cannot be hot-unplugged" in r.summary()


def test_nothing_assigned_nothing_blocked():
    r = assess("vm1", guest_placements(dom()), [])
    assert not r.blocked and r.steps() == [] and "nothing in hostdevd's way" in r.summary()


def test_ledger_only_verdict(tmp_path):
    eng = make_engine(load_sim("lab"), tmp_path / "s")
    eng.prepare([A.parse(NIC1)], Owner(name="vm1"))
    r = assess("vm1", None, eng.ledger().claims_of(Owner(name="vm1")))
    assert r.source == "ledger" and r.blocked and r.devices[0].unplug is None
    assert r.steps()[0] == f"hostdevctl detach vm1 --device {NIC1}"


# --------------------------------------------------------------------------- daemon op


@pytest.fixture
def daemon():
    lv = FakeLibvirt()
    lv.define("vm1")
    with running_daemon("lab", adapter=lv) as (d, sim, path):
        assert d.wait_idle()
        yield d, sim, path, lv


def test_daemon_judges_the_live_xml_and_logs_it(daemon, caplog):
    import logging

    from hostdevd.core.logfields import MSG
    d, sim, path, lv = daemon
    assert call(path, {"op": "attach", "domain": {"name": "vm1"}, "addresses": [PAIR]})["ok"]
    caplog.set_level(logging.INFO, "hostdevd")
    m = call(path, {"op": "migrate_check", "domain": {"name": "vm1"}})["migration"]
    assert m["blocked"] and m["running"] is True and m["source"] == "live XML"
    assert [(x["address"], x["role"], x["unplug"]) for x in m["devices"]] == [
        (PAIR, "requested", True), (PAIR_B, "companion", None)]
    [rec] = [r for r in caplog.records if getattr(r, "journal", {}).get("MESSAGE_ID") == MSG["migrate"]]
    assert rec.journal["RESULT"] == "blocked" and rec.journal["DOMAIN_NAME"] == "vm1"
    assert "unplug 0000:04:00.0 first" in rec.getMessage()


def test_daemon_check_of_a_stopped_or_unknown_domain(daemon):
    d, sim, path, lv = daemon
    lv.define("off", running=False)
    m = call(path, {"op": "migrate_check", "domain": {"name": "off"}})["migration"]
    assert not m["blocked"] and m["running"] is False and any("not running" in n for n in m["notes"])
    r = call(path, {"op": "migrate_check", "domain": {"name": "nope"}})
    assert r["error"]["code"] == "LIBVIRT"


def test_hook_origin_never_asks_libvirt(daemon):
    d, sim, path, lv = daemon
    lv.calls.clear()
    r = call(path, {"op": "migrate_check", "origin": "hook", "domain": {"name": "vm1"},
                    "xml": dom(hd(NIC1, "0000:01:00.0"))})
    assert r["ok"] and r["migration"]["source"] == "hook XML" and lv.calls == []


# --------------------------------------------------------------------------- the hook's migrate phase


def test_hook_migrate_prints_the_xml_unchanged_and_reports_on_stderr(daemon):
    d, sim, path, lv = daemon
    hook = install_hook(path)
    xml = dom(hd(PAIR, "0000:01:00.0"), hd(NIC1, "0000:00:05.0")) + "\n<!-- é -->\n"
    rc, out, err, took = run_hook(hook, "vm1", "migrate", "begin", "-", xml=xml)
    assert rc == 0 and out == xml
    assert "hostdevd: vm1: live migration BLOCKED by 2 assigned PCI devices" in err
    assert f"hostdevd:   {PAIR}: can be hot-unplugged" in err
    assert f"hostdevd:   {NIC1}: cannot be hot-unplugged (guest 0000:00:05.0 on a pcie-root" in err


def test_hook_migrate_without_hostdev_does_not_call_the_daemon(daemon):
    d, sim, path, lv = daemon
    hook = install_hook(path)
    served = d.server.served
    rc, out, err, _ = run_hook(hook, "vm1", "migrate", "begin", "-", xml=dom())
    assert (rc, out, err) == (0, dom(), "") and d.server.served == served


def test_hook_migrate_never_blocks_on_a_hung_daemon():
    path = str(short_dir() / "hung.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    conns = []
    threading.Thread(target=lambda: conns.append(srv.accept()), daemon=True).start()   # accepts, never answers
    try:
        xml = dom(hd(PAIR, "0000:01:00.0"))
        rc, out, err, took = run_hook(install_hook(path), "vm1", "migrate", "begin", "-", xml=xml)
        assert rc == 0 and out == xml and "migrate check of vm1 skipped" in err and took < 6
    finally:
        srv.close()


def test_hook_migrate_with_bad_xml_still_echoes_it(daemon):
    d, sim, path, lv = daemon
    xml = "<domain><name>vm1</name><devices><hostdev mode='subsystem' type='pci'><source/></hostdev></devices></domain>"
    rc, out, err, _ = run_hook(install_hook(path), "vm1", "migrate", "begin", "-", xml=xml)
    assert rc == 0 and out == xml and "could not check the migration of vm1" in err


# --------------------------------------------------------------------------- hostdevctl check-migrate


def test_hostdevctl_check_migrate_through_the_daemon(daemon, tmp_path):
    d, sim, path, lv = daemon
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_dir = "{d.engine.config.state_dir}"\nruntime_dir = "{d.engine.config.runtime_dir}"\n')
    lines: list[str] = []
    rc = cli_main(["--config", str(cfg), "check-migrate", "vm1"], sysfs=Sysfs(sim, 2.0), out=lines.append)
    assert rc == 0 and lines == ["vm1: no assigned PCI device; nothing in hostdevd's way of a live migration"]
    assert call(path, {"op": "attach", "domain": {"name": "vm1"}, "addresses": [PAIR]})["ok"]
    lines.clear()
    rc = cli_main(["--config", str(cfg), "check-migrate", "vm1"], sysfs=Sysfs(sim, 2.0), out=lines.append)
    text = "\n".join(lines)
    assert rc == 1 and lines[0].startswith("vm1: live migration BLOCKED by 1 assigned PCI device")
    table = text.splitlines()
    assert table[1].split() == ["ADDRESS", "ROLE", "GROUP", "GUEST", "GUEST", "BUS", "UNPLUG", "WHY"]
    assert table[2].split()[:6] == [PAIR, "requested", "15", "0000:01:00.0", "pcie-root-port", "yes"]
    assert f"hostdevctl detach vm1 --device {PAIR}" in text and "virsh migrate --live vm1" in text


def test_hostdevctl_check_migrate_without_the_daemon(tmp_path):
    sim = load_sim("lab")
    eng = make_engine(sim, tmp_path / "state")
    eng.prepare([A.parse(NIC1)], Owner(name="vm1"))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path / "run"}"\n')
    lines: list[str] = []
    rc = cli_main(["--config", str(cfg), "check-migrate", "vm1"], sysfs=Sysfs(sim, 2.0), out=lines.append)
    assert rc == 1 and "[from the ledger]" in lines[0] and "daemon is not running" in "\n".join(lines)
    xml = tmp_path / "vm1.xml"
    xml.write_text(dom(hd(NIC1, "0000:00:05.0")))
    lines.clear()
    rc = cli_main(["--config", str(cfg), "check-migrate", "vm1", "--xml", str(xml), "--json"],
                  sysfs=Sysfs(sim, 2.0), out=lines.append)
    import json
    m = json.loads("\n".join(lines))
    assert rc == 1 and m["cannot_unplug"] == [NIC1] and m["source"] == "given XML"


def test_variant_driver_note_only_for_real_variant_drivers(tmp_path):
    eng = make_engine(load_sim("lab"), tmp_path / "s")
    owner = Owner(name="vm1", uuid=UUID)
    eng.prepare([A.parse(NIC1)], owner)
    topo = eng.topology()
    assert topo.get(A.parse(NIC1)).has_vfio_dev, "vfio-dev/ exists for plain vfio-pci too (6.1+)"
    placement = guest_placements(dom(hd(NIC1, "0000:01:00.0")))
    r = assess("vm1", placement, eng.ledger().claims_of(owner), topo)
    assert r.devices[0].notes == []
    topo.get(A.parse(NIC1)).driver = "mlx5_vfio_pci"
    r = assess("vm1", placement, eng.ledger().claims_of(owner), topo)
    assert "VFIO variant driver mlx5_vfio_pci" in r.devices[0].notes[0] and r.blocked
