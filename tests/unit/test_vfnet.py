"""VF network settings through the PF (R4, R5, R6, R12) with the fake netlink peer: save before
bind, set after bind, restore on release while the VF is still on vfio-pci, retries while the
VF is in reset, the all-zero MAC a driver refuses, libvirt's managed='yes' recorded and verified
(never fought), rollback in reverse; plus the pyroute2 backend's messages and the hook's
``start begin`` for hostdev networks."""
from __future__ import annotations

import errno
import io
import shutil
import sys
import types

import pytest

from hostdevd.adapters.netlink import Pyroute2Backend
from hostdevd.core.address import PciAddress as A
from hostdevd.core.domxml import parse_domain
from hostdevd.core.errors import ExecutionFailed, HostdevError, NetlinkError, Refused
from hostdevd.core.ledger import Owner, VfNetConfig
from hostdevd.core.netreq import NetRequest, net_requests
from hostdevd.core.vfnet import ZERO_MAC, VfNetManager
from hostdevd.doors import hook, wire
from hostdevd.doors.service import Daemon
from hostdevd.sim.fakenetlink import FakeNetlink

from .conftest import load_sim, make_engine
from .daemon_support import short_dir

PF, PFNET = "0000:03:00.0", "enp3s0f0"
WEB1 = Owner(name="web1", uuid="00000000-0000-0000-0000-0000000000a1")
MAC = "52:54:00:6d:90:02"


def fast(nl, **kw) -> VfNetManager:
    kw.setdefault("sleep", lambda s: None)
    return VfNetManager(nl, **kw)


def setup(tmp_path, nvfs=4, autoprobe=False, nl=None):
    sim = load_sim("sriov_pf")
    nl = nl or FakeNetlink().add_pf(PFNET, 8)
    eng = make_engine(sim, tmp_path, netlink=nl)
    eng.executor.vf_net.manager.sleep = lambda s: None
    vfs = eng.set_vfs(PF, nvfs, autoprobe).vfs
    return sim, nl, eng, vfs


def iface(vf: str, mac=MAC, vlan=None, managed="no", trunk=False) -> str:
    dom, bus, rest = vf.split(":")
    slot, fn = rest.split(".")
    v = ""
    if vlan is not None:
        tags = vlan if isinstance(vlan, list) else [vlan]
        v = "<vlan{}>{}</vlan>".format(" trunk='yes'" if trunk else "", "".join(f"<tag id='{t}'/>" for t in tags))
    return (f"<interface type='hostdev' managed='{managed}'><mac address='{mac}'/><source>"
            f"<address type='pci' domain='0x{dom}' bus='0x{bus}' slot='0x{slot}' function='0x{fn}'/></source>"
            f"{v}</interface>")


def dom(name, *devs, uuid=WEB1.uuid) -> str:
    return (f"<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid><memory>1024</memory><os><type>hvm</type>"
            f"</os><devices>{''.join(devs)}</devices></domain>")


def prepare_xml(eng, xml, owner=WEB1, resolved_by_libvirt=False):
    parsed = parse_domain(xml)
    return eng.prepare(parsed.addresses(), owner, net_requests(parsed, resolved_by_libvirt))


# --------------------------------------------------------------------------- the manager's rules


def test_fake_peer_reports_fresh_vfs():
    nl = FakeNetlink().add_pf("p0", 2)
    assert nl.vf_table("p0")[1].to_json() == {"mac": ZERO_MAC, "vlan": 0, "qos": 0, "spoofchk": True,
                                              "trust": False}
    with pytest.raises(NetlinkError) as e:
        nl.vf_table("p9")
    assert e.value.errno == errno.ENODEV


@pytest.mark.parametrize("err", [errno.EAGAIN, errno.EBUSY])
def test_set_retries_while_the_vf_is_in_reset(err):
    nl = FakeNetlink().add_pf("p0", 2)
    nl.busy("p0", 1, 3, err)
    m = fast(nl)
    m.set("p0", 1, mac=MAC)
    assert m.retries == 3 and len(nl.calls) == 4 and nl.vf("p0", 1).mac == MAC


def test_retry_is_bounded():
    nl = FakeNetlink().add_pf("p0", 2)
    nl.busy("p0", 0, 10_000)
    m = VfNetManager(nl, retry_timeout=0.2, retry_interval=0.01)
    with pytest.raises(NetlinkError) as e:
        m.set("p0", 0, vlan=5)
    assert "still busy after" in e.value.message and e.value.errno == errno.EAGAIN
    assert 3 <= len(nl.calls) < 40


def test_other_errors_are_not_retried():
    nl = FakeNetlink().add_pf("p0", 1)
    m = fast(nl)
    with pytest.raises(NetlinkError):
        m.set("p0", 7, mac=MAC)
    assert len(nl.calls) == 1 and m.retries == 0


def test_zero_mac_refused_once_is_never_written_again():
    nl = FakeNetlink().add_pf("p0", 2)
    nl.reject_zero_mac.add("p0")
    m = fast(nl)
    m.set("p0", 0, mac=MAC)
    saved = VfNetConfig(pf_netdev="p0", vf_index=0, mac=ZERO_MAC, vlan=0, qos=0, spoofchk=True, trust=False)
    notes = m.restore("p0", 0, saved)
    assert "refused MAC 00:00:00:00:00:00 (EINVAL)" in notes[0] and nl.vf("p0", 0).mac == MAC
    assert "p0" in m.zero_mac_refused
    nl.calls.clear()
    m.set("p0", 1, mac=MAC)
    notes = m.restore("p0", 1, saved.model_copy(update={"vf_index": 1}))
    assert "not restored (this PF's driver refuses the all-zero MAC)" in notes[0]
    assert all(c[2].get("mac") != ZERO_MAC for c in nl.calls)      # never written to that driver again
    # a non-zero MAC refused with EINVAL is an error, not a note
    nl.reject_zero_mac.clear()
    with pytest.raises(NetlinkError):
        m.restore("p0", 5, saved.model_copy(update={"vf_index": 5, "mac": MAC}))


def test_restore_puts_every_saved_attribute_back():
    nl = FakeNetlink().add_pf("p0", 1)
    m = fast(nl)
    before = nl.vf("p0", 0)
    saved = VfNetConfig(pf_netdev="p0", vf_index=0, **before.to_json())
    m.set("p0", 0, mac=MAC, vlan=42, spoofchk=False, trust=True)
    assert m.verify("p0", 0, MAC, 42) == []
    assert m.verify("p0", 0, "52:54:00:00:00:01", 7) == ["MAC is 52:54:00:6d:90:02, expected 52:54:00:00:00:01",
                                                         "VLAN is 42, expected 7"]
    assert m.restore("p0", 0, saved) == []
    assert nl.vf("p0", 0) == before


# --------------------------------------------------------------------------- executor: R4 / R6 order


def test_interface_hostdev_saves_sets_and_restores_in_rule_order(tmp_path):
    sim, nl, eng, vfs = setup(tmp_path)
    vf = vfs[2]
    events: list[str] = []
    eng.executor.on_step = events.append
    real_set = nl.set_vf

    def logged_set(pf, n, **kw):
        events.append(f"netlink:{n}:{sorted(k for k, v in kw.items() if v is not None)}")
        return real_set(pf, n, **kw)
    nl.set_vf = logged_set
    before = sim.state()
    plan, _ = prepare_xml(eng, dom("web1", iface(vf, vlan=42)))
    assert [s.action for s in plan.steps] == ["claim", "save_net", "bind", "set_net", "activate"]
    assert events.index(f"save_net:{vf}") < events.index(f"bind:{vf}") < events.index(f"set_net:{vf}")
    assert nl.vf(PFNET, 2).mac == MAC and nl.vf(PFNET, 2).vlan == 42 and sim.driver(vf) == "vfio-pci"
    cfg = eng.ledger().claim_for_device(vf).device(vf).vf_netconfig
    assert (cfg.state, cfg.pf_netdev, cfg.vf_index, cfg.mac, cfg.vlan, cfg.requested_mac, cfg.requested_vlan) == (
        "set", PFNET, 2, ZERO_MAC, 0, MAC, 42)
    events.clear()
    rplan, result = eng.release(WEB1)
    assert [s.action for s in rplan.steps] == ["restore_net", "restore", "drop"]
    restored = [i for i, e in enumerate(events) if e.startswith("netlink:2")]
    assert restored and max(restored) < events.index(f"restore:{vf}")     # while still on vfio-pci
    assert nl.vf(PFNET, 2).to_json() == {"mac": ZERO_MAC, "vlan": 0, "qos": 0, "spoofchk": True, "trust": False}
    assert sim.state() == before and eng.ledger().claims == {}


def test_plain_hostdev_vf_is_saved_but_never_written(tmp_path):
    sim, nl, eng, vfs = setup(tmp_path)
    from .daemon_support import domain_xml
    prepare_xml(eng, domain_xml("web1", WEB1.uuid, vfs[0]))
    assert eng.ledger().claim_for_device(vfs[0]).device(vfs[0]).vf_netconfig.state == "saved"
    nl.pfs[PFNET][0].mac = "02:11:22:33:44:55"      # the guest's VF driver, for instance
    eng.release(WEB1)
    assert nl.calls == [] and nl.vf(PFNET, 0).mac == "02:11:22:33:44:55"


def test_managed_yes_is_recorded_and_verified_not_fought(tmp_path):
    sim, nl, eng, vfs = setup(tmp_path)
    vf = vfs[1]
    plan, _ = prepare_xml(eng, dom("web1", iface(vf, vlan=7, managed="yes")))
    assert "libvirt sets them" in [s for s in plan.steps if s.action == "set_net"][0].detail
    assert nl.calls == []
    cfg = eng.ledger().claim_for_device(vf).device(vf).vf_netconfig
    assert (cfg.state, cfg.requested_mac, cfg.requested_vlan) == ("libvirt", MAC, 7)
    assert eng.verify_vf_net(WEB1) == [f"{vf} (VF 1 of {PFNET}): MAC is {ZERO_MAC}, expected {MAC}",
                                       f"{vf} (VF 1 of {PFNET}): VLAN is 0, expected 7"]
    nl.set_vf(PFNET, 1, mac=MAC, vlan=7)             # libvirt's own "Loop 4" after the prepare hook
    assert eng.verify_vf_net(WEB1) == []
    nl.calls.clear()
    _, result = eng.release(WEB1)                    # libvirt did not restore it: recorded, left alone
    assert nl.calls == [] and nl.vf(PFNET, 1).mac == MAC
    assert any("libvirt left VF 1 of enp3s0f0 changed" in n and "does not fight" in n for n in result.notes)


def test_managed_yes_restored_by_libvirt_leaves_no_note(tmp_path):
    sim, nl, eng, vfs = setup(tmp_path)
    prepare_xml(eng, dom("web1", iface(vfs[1], managed="yes")))
    _, result = eng.release(WEB1)
    assert result.notes == [] and nl.calls == []


def test_hostdev_network_vf_is_libvirts(tmp_path):
    """A VF libvirt picked from a hostdev network (<actual>, or first seen at 'start begin'):
    libvirt set its MAC before hostdevd saw it, so hostdevd never writes it."""
    sim, nl, eng, vfs = setup(tmp_path)
    xml = dom("web1", iface(vfs[3], vlan=3, managed="no"))
    nl.pfs[PFNET][3].mac, nl.pfs[PFNET][3].vlan = MAC, 3          # libvirt's "Loop 4", before 'start begin'
    prepare_xml(eng, xml, resolved_by_libvirt=True)
    cfg = eng.ledger().claim_for_device(vfs[3]).device(vfs[3]).vf_netconfig
    assert nl.calls == [] and cfg.state == "libvirt"
    assert cfg.mac is None and cfg.vlan is None and "libvirt's to restore" in cfg.notes[0]   # not originals
    nl.pfs[PFNET][3].mac, nl.pfs[PFNET][3].vlan = ZERO_MAC, 0      # libvirt restores before 'release end'
    _, result = eng.release(WEB1)
    assert nl.calls == [] and result.notes == []
    parsed = parse_domain("<domain><name>n</name><devices><interface type='network'><mac address='52:54:00:00:00:09'/>"
                          "<source network='pool'/><actual type='hostdev' managed='no'><source><address "
                          "type='pci' domain='0' bus='3' slot='0x10' function='6'/></source></actual></interface>"
                          "</devices></domain>")
    assert net_requests(parsed)[A.parse("0000:03:10.6")].managed is True


def test_zero_mac_refused_at_release_is_recorded_and_the_vf_still_goes_back(tmp_path):
    sim, nl, eng, vfs = setup(tmp_path)
    nl.reject_zero_mac.add(PFNET)
    before = sim.state()
    prepare_xml(eng, dom("web1", iface(vfs[0])))
    _, result = eng.release(WEB1)
    assert any("refused MAC 00:00:00:00:00:00" in n for n in result.notes)
    assert nl.vf(PFNET, 0).mac == MAC and sim.state() == before and eng.ledger().claims == {}


def test_vf_still_in_reset_at_restore_is_retried(tmp_path):
    sim, nl, eng, vfs = setup(tmp_path)
    prepare_xml(eng, dom("web1", iface(vfs[0], vlan=10)))
    nl.busy(PFNET, 0, 4)                              # FLR on close: the PF says EAGAIN for a while
    eng.release(WEB1)
    assert nl.vf(PFNET, 0).vlan == 0 and nl.vf(PFNET, 0).mac == ZERO_MAC
    assert eng.executor.vf_net.manager.retries >= 4


def test_restore_failure_keeps_a_failed_claim(tmp_path):
    sim, nl, eng, vfs = setup(tmp_path)
    prepare_xml(eng, dom("web1", iface(vfs[0])))
    nl.busy(PFNET, 0, 10_000, errno.EIO)
    with pytest.raises(ExecutionFailed) as e:
        eng.release(WEB1)
    assert "MAC/VLAN" in str(e.value)
    claim = eng.ledger().claim_for_device(vfs[0])
    assert claim.state == "failed" and "release incomplete" in claim.notes[-1]
    assert sim.driver(vfs[0]) is None                 # the driver part still went back


@pytest.mark.parametrize("boundary", ["set_net", "activate"])
def test_failure_after_set_rolls_back_in_reverse(tmp_path, boundary):
    sim, nl, eng, vfs = setup(tmp_path)
    vf = vfs[2]
    before, fresh = sim.state(), nl.vf(PFNET, 2)
    if boundary == "set_net":
        nl.busy(PFNET, 2, 1, errno.EIO)               # the set itself fails
    else:
        def crash(step):
            if step.startswith("activate:"):
                raise RuntimeError("injected at activate")
        eng.executor.on_step = crash
    with pytest.raises(HostdevError):
        prepare_xml(eng, dom("web1", iface(vf, vlan=42)))
    assert nl.vf(PFNET, 2) == fresh and sim.state() == before and eng.ledger().claims == {}


def test_vf_net_unreadable_blocks_only_a_mac_request(tmp_path):
    nl = FakeNetlink()                                # the PF netdev is unknown to netlink
    sim, nl, eng, vfs = setup(tmp_path, nl=nl)
    from .daemon_support import domain_xml
    prepare_xml(eng, domain_xml("web1", WEB1.uuid, vfs[0]))
    cfg = eng.ledger().claim_for_device(vfs[0]).device(vfs[0]).vf_netconfig
    assert cfg.notes and "not saved" in cfg.notes[0]
    eng.release(WEB1)
    before = sim.state()
    with pytest.raises(ExecutionFailed) as e:
        prepare_xml(eng, dom("web1", iface(vfs[1])))
    assert "cannot set MAC/VLAN" in str(e.value) and sim.state() == before and eng.ledger().claims == {}


def test_mac_on_a_non_vf_and_vlan_trunks_are_refused(tmp_path):
    sim, nl, eng, vfs = setup(tmp_path)
    plan = eng.plan_prepare([A.parse("0000:00:1f.6")], WEB1)
    from hostdevd.core.planner import plan_prepare
    plan = plan_prepare(eng.topology(), [A.parse("0000:00:1f.6")], WEB1, eng.ledger(), eng.policy,
                        net_requests={A.parse("0000:00:1f.6"): NetRequest(mac=MAC)})
    assert any("is not an SR-IOV VF" in r.reason for r in plan.refusals)
    with pytest.raises(Refused) as e:
        net_requests(parse_domain(dom("web1", iface(vfs[0], vlan=[10, 20]))))
    assert "VLAN trunk [10, 20]" in str(e.value)


def test_vf_of_a_pf_without_netdev_refuses_mac_but_not_hostdev(tmp_path):
    sim = load_sim("lab")                             # the NVMe PF: SR-IOV, no network interface
    eng = make_engine(sim, tmp_path, netlink=FakeNetlink())
    vfs = eng.set_vfs("0000:03:00.0", 2, False).vfs
    from hostdevd.core.planner import plan_prepare
    plan = plan_prepare(eng.topology(), [A.parse(vfs[0])], WEB1, eng.ledger(), eng.policy,
                        net_requests={A.parse(vfs[0]): NetRequest(mac=MAC)})
    assert any("has no network interface" in r.reason for r in plan.refusals)
    plan = eng.plan_prepare([A.parse(vfs[0])], WEB1)
    assert plan.ok and "save_net" not in [s.action for s in plan.steps]


def test_reserved_vf_gets_its_settings_back_when_the_domain_returns_it(tmp_path):
    sim, nl, eng, vfs = setup(tmp_path)
    from hostdevd.core.reservations import apply_reservations
    apply_reservations(eng, [vfs[1]])
    prepare_xml(eng, dom("web1", iface(vfs[1], vlan=9)))
    assert nl.vf(PFNET, 1).vlan == 9
    eng.release(WEB1)
    assert nl.vf(PFNET, 1).vlan == 0 and nl.vf(PFNET, 1).mac == ZERO_MAC
    assert sim.driver(vfs[1]) == "vfio-pci"           # still reserved


# --------------------------------------------------------------------------- the daemon and the hook


def test_daemon_prepare_and_start_phase(tmp_path):
    sim = load_sim("sriov_pf")
    nl = FakeNetlink().add_pf(PFNET, 8)
    base = short_dir()
    try:
        eng = make_engine(sim, base / "state", '[[sriov]]\npf = "enp3s0f0"\nnumvfs = 4\n', netlink=nl)
        eng.config.runtime_dir = str(base / "run")
        d = Daemon(eng.config, eng, None, sock_path=str(base / "run" / "s.sock"), read_timeout=5)
        d.start()
        try:
            vfs = sim.vfs(PF)
            xml = dom("web1", iface(vfs[0], vlan=5))
            r = wire.call(d.server.path, {"op": "prepare", "origin": "hook", "domain": {"name": "web1"}, "xml": xml})
            assert r["ok"] and nl.vf(PFNET, 0).vlan == 5
            # 'start begin' with the same XML plus a VF libvirt took from a hostdev network
            xml2 = dom("web1", iface(vfs[0], vlan=5), iface(vfs[3], mac="52:54:00:00:00:33"))
            calls = len(nl.calls)
            r = wire.call(d.server.path, {"op": "prepare", "origin": "hook", "phase": "start",
                                          "domain": {"name": "web1"}, "xml": xml2})
            assert r["ok"] and sim.driver(vfs[3]) == "vfio-pci" and len(nl.calls) == calls   # libvirt's to set
            claim = d.engine.ledger().claim_for_device(vfs[3])
            assert claim.device(vfs[3]).vf_netconfig.state == "libvirt"
            r = wire.call(d.server.path, {"op": "release", "origin": "hook", "domain": {"name": "web1"}, "xml": xml2})
            assert r["ok"] and nl.vf(PFNET, 0).vlan == 0 and d.engine.ledger().claims == {}
            r = wire.call(d.server.path, {"op": "prepare", "origin": "hook", "domain": {"name": "web1"},
                                          "xml": dom("web1", iface(vfs[0], vlan=[1, 2]))})
            assert not r["ok"] and "VLAN trunk" in r["error"]["message"]
        finally:
            d.stop(drain_timeout=2)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_hook_forwards_start_begin_only_for_vf_interfaces(monkeypatch):
    sent = []
    monkeypatch.setattr(hook, "call", lambda sock, req, timeout: sent.append(req) or {"ok": True})
    plain = "<domain><name>a</name><devices><hostdev mode='subsystem' type='pci'/></devices></domain>"
    vf = "<domain><name>a</name><devices><interface type='hostdev'/></devices></domain>"
    for xml in (plain, vf):
        rc = hook.main(["a", "start", "begin", "-"], socket_path="/x", stdin=io.StringIO(xml),
                       stdout=io.StringIO(), stderr=io.StringIO())
        assert rc == 0
    assert len(sent) == 1 and sent[0]["phase"] == "start" and sent[0]["xml"] == vf
    monkeypatch.setattr(hook, "call", lambda sock, req, timeout: {"ok": False, "error": {"message": "held"}})
    err = io.StringIO()
    assert hook.main(["a", "start", "begin", "-"], socket_path="/x", stdin=io.StringIO(vf), stdout=io.StringIO(),
                     stderr=err) == 1
    assert "held" in err.getvalue()


# --------------------------------------------------------------------------- the pyroute2 backend


class _Attr(dict):
    pass


class _Nla:
    def __init__(self, attrs):
        self.attrs = attrs

    def get_attr(self, name):
        vals = [v for k, v in self.attrs if k == name]
        return vals[0] if vals else None

    def get_attrs(self, name):
        return [v for k, v in self.attrs if k == name]


def _vfinfo(n, mac, vlan, spoof, trust):
    return _Nla([("IFLA_VF_MAC", {"vf": n, "mac": mac}), ("IFLA_VF_VLAN", {"vf": n, "vlan": vlan, "qos": 0}),
                 ("IFLA_VF_SPOOFCHK", {"vf": n, "spoofchk": spoof}), ("IFLA_VF_TRUST", {"vf": n, "trust": trust})])


def fake_pyroute2(monkeypatch, links_calls, set_calls, fail=None):
    class FakeErr(Exception):
        def __init__(self, code, msg=""):
            super().__init__(msg)
            self.code = code

    class IPRoute:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def link_lookup(self, ifname):
            return [9] if ifname == "enp11s0" else []

        def get_links(self, index, ext_mask=0):
            links_calls.append((index, ext_mask))
            vfl = _Nla([("IFLA_VF_INFO", _vfinfo(0, "52:54:00:AA:BB:01", 42, 1, 0)),
                        ("IFLA_VF_INFO", _vfinfo(1, ZERO_MAC, 0, 0, 0xFFFFFFFF))])
            return [_Nla([("IFLA_IFNAME", "enp11s0"), ("IFLA_VFINFO_LIST", vfl)])]

        def link(self, cmd, index, vf):
            set_calls.append((cmd, index, dict(vf)))
            if fail:
                raise FakeErr(fail, "Resource temporarily unavailable")

    root = types.ModuleType("pyroute2")
    root.IPRoute = IPRoute
    nl = types.ModuleType("pyroute2.netlink")
    exc = types.ModuleType("pyroute2.netlink.exceptions")
    exc.NetlinkError = FakeErr
    for name, mod in (("pyroute2", root), ("pyroute2.netlink", nl), ("pyroute2.netlink.exceptions", exc)):
        monkeypatch.setitem(sys.modules, name, mod)


def test_pyroute2_backend_reads_the_vf_table_with_ext_mask(monkeypatch):
    links, sets = [], []
    fake_pyroute2(monkeypatch, links, sets)
    table = Pyroute2Backend().vf_table("enp11s0")
    assert links == [(9, 1)]
    assert table[0].to_json() == {"mac": "52:54:00:aa:bb:01", "vlan": 42, "qos": 0, "spoofchk": True, "trust": False}
    assert table[1].trust is None                     # 0xffffffff: the driver does not report it
    with pytest.raises(NetlinkError) as e:
        Pyroute2Backend().vf_table("eth9")
    assert e.value.errno == errno.ENODEV


def test_pyroute2_backend_sets_vf_attributes(monkeypatch):
    links, sets = [], []
    fake_pyroute2(monkeypatch, links, sets)
    Pyroute2Backend().set_vf("enp11s0", 3, mac=MAC, vlan=42, spoofchk=False, trust=True)
    assert sets == [("set", 9, {"vf": 3, "mac": MAC, "vlan": {"vlan": 42, "qos": 0}, "spoofchk": 0, "trust": 1})]


def test_pyroute2_errors_carry_the_errno(monkeypatch):
    links, sets = [], []
    fake_pyroute2(monkeypatch, links, sets, fail=errno.EAGAIN)
    m = VfNetManager(Pyroute2Backend(), retry_timeout=0.05, retry_interval=0.01)
    with pytest.raises(NetlinkError) as e:
        m.set("enp11s0", 0, mac=MAC)
    assert e.value.errno == errno.EAGAIN and len(sets) >= 2 and "EAGAIN" in e.value.message


def test_hostdevctl_plan_and_prepare_carry_the_interface_mac(tmp_path, monkeypatch):
    from hostdevd.core.sysfs import Sysfs
    from hostdevd.doors import cli
    sim, nl, eng, vfs = setup(tmp_path)
    xml = dom("web1", iface(vfs[1], vlan=12))
    monkeypatch.setattr("sys.stdin", io.StringIO(xml))
    out: list[str] = []
    rc = cli.main(["--state-dir", str(tmp_path), "--no-daemon", "plan", "-"], sysfs=Sysfs(sim, 2.0),
                  out=out.append, netlink=nl)
    text = "\n".join(out)
    assert (rc == 0 and f"save_net {vfs[1]}  VF 1 of enp3s0f0" in text
            and f"set_net  {vfs[1]}  mac {MAC}, vlan 12" in text)
    monkeypatch.setattr("sys.stdin", io.StringIO(xml))
    out.clear()
    rc = cli.main(["--state-dir", str(tmp_path), "--no-daemon", "prepare", "-"], sysfs=Sysfs(sim, 2.0),
                  out=out.append, netlink=nl)
    assert rc == 0 and nl.vf(PFNET, 1).mac == MAC and nl.vf(PFNET, 1).vlan == 12
    out.clear()
    rc = cli.main(["--state-dir", str(tmp_path), "--no-daemon", "release", "--owner", "web1"],
                  sysfs=Sysfs(sim, 2.0), out=out.append, netlink=nl)
    assert rc == 0 and "restore_net" in "\n".join(out) and nl.vf(PFNET, 1).mac == ZERO_MAC
