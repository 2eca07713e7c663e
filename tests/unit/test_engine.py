"""The Engine's use-cases, each through its Engine method, on the simulated kernel: typed request in,
typed result out, and the state checked twice (the ledger, ``eng.ledger()``, and the simulated sysfs).

prepare_domain (whole groups, companions, hostdev-network pools through the ``networks`` lookup, the
planner's holders on refusal), release_domain (exactly the planner's release steps), plan_for,
check_attachable, the hot-plug halves (attach_prepare / attach_rollback / detach_release), vfs_set,
apply_sriov_config, apply_reservations (reserved in the claim's own transaction), reconcile,
adopt_domain, release_missing, release_owner, forget_vanished, migration_report, verify_vf_net and
the lower-level prepare / release / plan_prepare / plan_release.
"""
from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta

import pytest

from hostdevd.core.address import PciAddress as A
from hostdevd.core.domxml import parse_domain
from hostdevd.core.engine import Attached, DomainPrepare, Engine, Prepared
from hostdevd.core.errors import Refused
from hostdevd.core.ledger import Owner
from hostdevd.core.ledger_store import LedgerStore
from hostdevd.core.reconcile import RunningDomain
from hostdevd.sim.fakenetlink import FakeNetlink

from .conftest import load_sim, make_engine
from .daemon_support import domain_xml, vfio_bind_by_hand
from .test_hostactions import DM, FakeHost
from .test_hostactions import engine as host_action_engine

VM1 = Owner(name="vm1", uuid="00000000-0000-0000-0000-000000000001")
VM2 = Owner(name="vm2", uuid="00000000-0000-0000-0000-000000000002")
NIC1 = "0000:01:00.0"                               # lab group 12, alone
PAIR, PAIR_B = "0000:04:00.0", "0000:04:00.1"       # lab group 15, multifunction e1000e pair
BRIDGE = "0000:05:00.0"                             # lab: the pcie-to-pci bridge (group 16)
ROOT_DISK = "0000:00:10.0"                          # lab: virtio-blk carrying /
MGMT_NIC = "0000:00:11.0"                           # lab: virtio-net carrying the default route
PF, PFNET = "0000:03:00.0", "enp3s0f0"              # sriov_pf: I350 PF
GPU, AUDIO = "0000:01:00.0", "0000:01:00.1"         # desktop_gpu: group 1 (nouveau + snd_hda_intel)

POOL_NO = ("<network><name>pool</name><forward mode='hostdev' managed='no'><pf dev='enp3s0f0'/></forward>"
           "</network>")
NAT = "<network><name>nat</name><forward mode='nat'/></network>"


class Crash(BaseException):
    """The daemon died here (the executor's rollback catches Exception only)."""


@pytest.fixture
def sim():
    return load_sim("lab")


@pytest.fixture
def eng(sim, tmp_path) -> Engine:
    return make_engine(sim, tmp_path / "state")


def addrs(*a: str) -> list[A]:
    return [A.parse(x) for x in a]


def domain_request(owner: Owner, *devices: str, **kw) -> DomainPrepare:
    """What the hook / hostdevctl hand prepare_domain for a domain XML with these hostdevs."""
    parsed = parse_domain(domain_xml(owner.name, owner.uuid, *devices))
    return DomainPrepare(owner, parsed.addresses(), parsed, **kw)


def running(owner: Owner, *a: str) -> RunningDomain:
    return RunningDomain(owner.name, owner.uuid, addrs(*a))


def sriov_engine(tmp_path, nvfs: int = 2, config_text: str = ""):
    sim = load_sim("sriov_pf")
    nl = FakeNetlink().add_pf(PFNET, 8)
    eng = make_engine(sim, tmp_path / "state", config_text, netlink=nl)
    eng.executor.vf_net.manager.sleep = lambda s: None
    vfs = eng.set_vfs(PF, nvfs, autoprobe=False).vfs if nvfs else []
    return sim, nl, eng, vfs


def network_domain(owner: Owner, *networks: str, mac: str = "52:54:00:00:00:01"):
    ifaces = "".join(f"<interface type='network'><mac address='{mac}'/><source network='{n}'/></interface>"
                     for n in networks)
    return parse_domain(f"<domain><name>{owner.name}</name><devices>{ifaces}</devices></domain>")


class Lookup:
    """libvirt's network driver: network XML by name, and who was asked."""

    def __init__(self, **networks: str):
        self.networks, self.asked = networks, list[str]()

    def __call__(self, name: str) -> str | None:
        self.asked.append(name)
        return self.networks.get(name)


# --------------------------------------------------------------------------- prepare_domain


def test_prepare_domain_binds_the_whole_group_and_records_the_companion(eng, sim):
    done = eng.prepare_domain(domain_request(VM1, PAIR_B))
    assert isinstance(done, Prepared) and done.groups == [15]
    assert sim.driver(PAIR) == sim.driver(PAIR_B) == "vfio-pci"
    claim = eng.ledger().claim_for_group(15)
    assert claim.owner.same(VM1) and claim.state == "active"
    assert claim.requested == [PAIR_B]
    assert (claim.device(PAIR).role, claim.device(PAIR_B).role) == ("companion", "requested")
    assert claim.device(PAIR).original_driver == claim.device(PAIR_B).original_driver == "e1000e"
    out = done.to_json()
    assert out["owner"] == VM1.model_dump() and out["groups"] == [15]
    assert out["plan"]["action"] == "prepare" and out["plan"]["ok"]
    gp = out["plan"]["groups"][0]
    assert (gp["group"], gp["requested"], gp["companions"], sorted(gp["bind"])) == (15, [PAIR_B], [PAIR],
                                                                                    [PAIR, PAIR_B])
    assert out["result"] == {"ok": True, "groups": [15], "errors": [], "notes": []}
    assert "note" not in out


def test_prepare_domain_without_pci_devices_returns_the_note_and_no_plan(eng, sim):
    saves, writes = eng.store.saves, len(sim.write_log)
    done = eng.prepare_domain(domain_request(VM1))
    assert done.plan is None and done.result is None and done.groups == []
    out = done.to_json()
    assert out["note"] == "no PCI host device to prepare" and "plan" not in out and "result" not in out
    assert out["groups"] == [] and out["owner"]["name"] == "vm1"
    assert eng.store.saves == saves and len(sim.write_log) == writes and eng.ledger().claims == {}


def test_prepare_domain_of_a_second_owner_is_refused_naming_the_holder(eng, sim):
    eng.prepare_domain(domain_request(VM1, PAIR_B))
    writes = len(sim.write_log)
    with pytest.raises(Refused) as e:
        eng.prepare_domain(domain_request(VM2, PAIR))
    assert e.value.holders == [{"group": 15, "owner": VM1.model_dump()}]
    assert e.value.refusals[0]["device"] == PAIR and "held by domain vm1" in e.value.refusals[0]["reason"]
    assert len(sim.write_log) == writes, "a refusal writes nothing"
    assert eng.ledger().claim_for_group(15).owner.same(VM1) and sim.driver(PAIR) == "vfio-pci"


def test_prepare_domain_holds_serialize_around_the_prepare_only(eng, sim):
    events: list[str] = []

    @contextlib.contextmanager
    def gate():
        events.append("enter")
        yield None
        events.append("exit")

    eng.executor.on_step = lambda name: events.append(name)
    eng.prepare_domain(domain_request(VM1, NIC1, serialize=gate))
    assert events == ["enter", "claim:12", f"bind:{NIC1}", "activate:12", "exit"]


def test_prepare_domain_picks_a_vf_of_a_managed_no_hostdev_network(tmp_path):
    sim, nl, eng, vfs = sriov_engine(tmp_path)
    web1, app2 = Owner(name="web1"), Owner(name="app2")
    lookup = Lookup(pool=POOL_NO, nat=NAT)
    parsed = network_domain(web1, "pool", "nat")
    done = eng.prepare_domain(DomainPrepare(web1, parsed.addresses(), parsed, networks=lookup))
    assert lookup.asked == ["pool", "nat"]
    nets = done.to_json()["networks"]
    assert nets[0]["hostdev_pool"] == vfs and nets[0]["assignable"] == vfs and nets[0]["prepared"] == vfs[0]
    assert "hostdev_pool" not in nets[1]
    assert sim.driver(vfs[0]) == "vfio-pci" and sim.driver(vfs[1]) is None
    claim = eng.ledger().claim_for_device(vfs[0])
    assert claim.owner.same(web1) and claim.requested == [vfs[0]] and done.groups == [claim.group]
    cfg = claim.device(vfs[0]).vf_netconfig
    assert (cfg.state, cfg.requested_mac) == ("libvirt", "52:54:00:00:00:01") and nl.calls == []
    # the next domain gets the next free VF
    parsed = network_domain(app2, "pool")
    done = eng.prepare_domain(DomainPrepare(app2, parsed.addresses(), parsed, networks=lookup))
    assert done.to_json()["networks"][0]["prepared"] == vfs[1] and sim.driver(vfs[1]) == "vfio-pci"


def test_prepare_domain_with_every_vf_of_the_pool_taken_is_refused(tmp_path):
    sim, nl, eng, vfs = sriov_engine(tmp_path)
    eng.prepare(addrs(*vfs), VM1)
    before, saves = sim.state(), eng.store.saves
    web1 = Owner(name="web1")
    parsed = network_domain(web1, "pool")
    with pytest.raises(Refused) as e:
        eng.prepare_domain(DomainPrepare(web1, parsed.addresses(), parsed, networks=Lookup(pool=POOL_NO)))
    assert "hostdev network 'pool' has no VF web1 could get" in e.value.message and "vm1" in e.value.message
    # The pool's own refusal first (NO_FREE_VF), then the planner's: one per VF, and vm1 named as the
    # holder of their groups.
    assert [(r["device"], r["code"]) for r in e.value.refusals] == \
        [("-", "NO_FREE_VF")] + [(str(v), "GROUP_HELD") for v in vfs]
    assert {h["owner"]["name"] for h in e.value.holders} == {"vm1"} and len(e.value.holders) == len(vfs)
    assert sim.state() == before and eng.store.saves == saves
    assert {c.owner.name for c in eng.ledger().claims.values()} == {"vm1"}


def test_prepare_domain_without_a_lookup_checks_no_pool(tmp_path):
    """hostdevctl's local path (networks=None): the network is only reported, nothing is picked."""
    sim, nl, eng, vfs = sriov_engine(tmp_path)
    eng.prepare(addrs(*vfs), VM1)              # the pool is exhausted: with a lookup this is refused
    web1 = Owner(name="web1")
    parsed = network_domain(web1, "pool")
    done = eng.prepare_domain(DomainPrepare(web1, parsed.addresses(), parsed, networks=None))
    out = done.to_json()
    assert out["note"] == "no PCI host device to prepare" and "plan" not in out
    assert out["networks"] == [{"network": "pool", "portgroup": None, "mac": "52:54:00:00:00:01"}]
    assert "'start begin' hook" in out["warnings"][0]
    assert eng.ledger().claims_of(web1) == []


def test_prepare_domain_at_start_records_libvirts_vf_settings_without_writing(tmp_path):
    sim, nl, eng, vfs = sriov_engine(tmp_path)
    d, b, rest = vfs[1].split(":")
    s, f = rest.split(".")
    xml = (f"<domain><name>web1</name><devices><interface type='hostdev' managed='no'>"
           f"<mac address='52:54:00:00:00:07'/><source><address type='pci' domain='0x{d}' bus='0x{b}' "
           f"slot='0x{s}' function='0x{f}'/></source></interface></devices></domain>")
    parsed = parse_domain(xml)
    web1 = Owner(name="web1")
    eng.prepare_domain(DomainPrepare(web1, parsed.addresses(), parsed, phase="start", origin="hook"))
    cfg = eng.ledger().claim_for_device(vfs[1]).device(vfs[1]).vf_netconfig
    assert cfg.state == "libvirt" and cfg.requested_mac == "52:54:00:00:00:07" and nl.calls == []
    # verify_vf_net: libvirt has not set it yet, then has
    assert any("expected 52:54:00:00:00:07" in n for n in eng.verify_vf_net(web1))
    nl.set_vf(PFNET, 1, mac="52:54:00:00:00:07")
    assert eng.verify_vf_net(web1) == []


# --------------------------------------------------------------------------- release_domain


def test_release_domain_restores_the_original_drivers_and_drops_the_claim(eng, sim):
    before = sim.state()
    eng.prepare_domain(domain_request(VM1, PAIR_B, NIC1))
    done = eng.release_domain(VM1)
    assert sorted(done.groups) == [12, 15] and done.result.ok
    assert done.to_json()["plan"]["action"] == "release" and done.to_json()["warnings"] == []
    assert sim.driver(PAIR) == sim.driver(PAIR_B) == sim.driver(NIC1) == "e1000e"
    assert sim.state() == before and eng.ledger().claims == {}


def test_release_domain_of_some_addresses_is_refcounted(eng, sim):
    eng.prepare_domain(domain_request(VM1, PAIR, PAIR_B))
    done = eng.release_domain(VM1, addrs(PAIR_B))
    assert done.groups == [] and "group 15 stays held for " + PAIR in done.result.notes
    claim = eng.ledger().claim_for_group(15)
    assert claim.requested == [PAIR] and claim.device(PAIR_B).role == "companion"
    assert sim.driver(PAIR_B) == "vfio-pci"
    # an address the owner does not hold: a warning in the reply, nothing released
    done = eng.release_domain(VM1, addrs(NIC1))
    assert done.to_json()["warnings"] == [f"{NIC1} is not held by {VM1.label()}"] and done.groups == []


def test_release_domain_of_a_vanished_device_runs_the_planners_steps(eng, sim):
    eng.prepare_domain(domain_request(VM1, PAIR))
    sim.hot_unplug(PAIR_B)                    # the companion left the host
    plan = eng.plan_for("release", VM1, [], everything=True)
    assert [(s.action, s.address) for s in plan.steps] == [("drop", A.parse(PAIR_B)), ("restore", A.parse(PAIR)),
                                                          ("drop", None)]
    seen: list[str] = []
    eng.executor.on_step = seen.append
    mark = len(sim.write_log)
    done = eng.release_domain(VM1)
    assert done.groups == [15] and eng.ledger().claims == {}
    assert seen == ["release:15", f"restore:{PAIR_B}", f"restore:{PAIR}", "drop:15"]
    assert sim.driver(PAIR) == "e1000e"
    assert all(PAIR_B not in path for path, _ in sim.write_log[mark:]), "nothing written for a gone device"


def test_release_domain_loads_modules_before_restoring_devices(tmp_path):
    sim = load_sim("desktop_gpu")
    host = FakeHost(sim)
    eng = host_action_engine(sim, tmp_path / "state", host)      # GPU_ACTIONS, the fake systemctl/modprobe
    before = sim.state()
    eng.prepare_domain(domain_request(VM1, GPU))
    assert sim.driver(GPU) == sim.driver(AUDIO) == "vfio-pci" and host.units[DM] is False
    plan = eng.plan_for("release", VM1, [], everything=True)
    expected = [f"{s.action}:{s.address or s.name}" for s in plan.steps if s.address or s.name]
    assert expected == ["load_module:nouveau", f"restore:{AUDIO}", f"restore:{GPU}", f"start_unit:{DM}"]
    seen: list[str] = []
    eng.executor.on_step = seen.append
    host.calls.clear()
    eng.release_domain(VM1)
    assert seen == ["release:1", *expected, "drop:1"], "exactly the planner's steps, in its order"
    assert host.actions == ["modprobe nouveau", f"systemctl start {DM}"]
    assert sim.state() == before and host.units[DM] is True and eng.ledger().claims == {}


# --------------------------------------------------------------------------- plans (dry runs)


def test_plan_for_and_the_plans_write_nothing(eng, sim):
    saves, writes = eng.store.saves, len(sim.write_log)
    plan = eng.plan_for("prepare", VM1, addrs(PAIR_B), everything=False)
    assert plan.ok and plan.action == "prepare" and plan.group(15).companions == addrs(PAIR)
    assert eng.plan_prepare(addrs(PAIR_B), VM1).to_json() == plan.to_json()
    assert eng.store.saves == saves and len(sim.write_log) == writes and eng.ledger().claims == {}
    eng.prepare(addrs(PAIR, NIC1), VM1)
    everything = eng.plan_for("release", VM1, addrs(NIC1), everything=True)
    assert sorted(g.group for g in everything.groups) == [12, 15]
    only = eng.plan_for("release", VM1, addrs(NIC1), everything=False)
    assert [g.group for g in only.groups] == [12]
    assert eng.plan_release(VM1, addrs(NIC1)).to_json() == only.to_json()


def test_prepare_and_release_are_all_or_nothing_and_return_plan_and_result(eng, sim):
    before = sim.state()
    with pytest.raises(Refused):
        eng.prepare(addrs(NIC1, BRIDGE), VM1)   # one refused device: nothing of the other is bound
    assert sim.state() == before and eng.ledger().claims == {}
    plan, result = eng.prepare(addrs(NIC1), VM1)
    assert plan.ok and result.groups == [12] and sim.driver(NIC1) == "vfio-pci"
    plan, result = eng.release(VM1)
    assert plan.action == "release" and result.groups == [12] and sim.state() == before


# --------------------------------------------------------------------------- check_attachable


@pytest.mark.parametrize("device, why", [
    (BRIDGE, "is a PCI bridge"),
    (ROOT_DISK, "host-critical"),
    (MGMT_NIC, "host-critical"),
])
def test_check_attachable_refuses_what_the_start_would_refuse(eng, sim, device, why):
    assert eng.ledger().claims == {}
    with pytest.raises(Refused) as e:
        eng.check_attachable(VM1, addrs(device))
    assert why in e.value.message and e.value.refusals[0]["device"] == device
    assert eng.ledger().claims == {}


def test_check_attachable_binds_nothing_and_does_not_judge_ownership(eng, sim):
    eng.prepare(addrs(PAIR), VM1)
    saves, writes = eng.store.saves, len(sim.write_log)
    plan = eng.check_attachable(VM2, addrs(PAIR_B))       # vm1 holds group 15: the start decides that
    assert plan.ok and plan.owner.same(VM2) and plan.group(15).requested == addrs(PAIR_B)
    assert eng.store.saves == saves and len(sim.write_log) == writes
    assert eng.ledger().claim_for_group(15).owner.same(VM1)
    # and the planner proper does judge it
    assert not eng.plan_prepare(addrs(PAIR_B), VM2).ok


# --------------------------------------------------------------------------- hot-plug halves


def test_attach_prepare_new_is_only_what_this_attach_claimed_and_rollback_gives_it_back(eng, sim):
    eng.prepare(addrs(NIC1), VM1)
    attached = eng.attach_prepare(VM1, addrs(NIC1, PAIR), {})
    assert isinstance(attached, Attached) and attached.new == addrs(PAIR)
    assert sorted(attached.result.groups) == [12, 15] and sim.driver(PAIR) == sim.driver(PAIR_B) == "vfio-pci"
    assert sorted(eng.ledger().claims) == ["12", "15"]
    assert eng.attach_rollback(attached) == []
    assert sim.driver(PAIR) == sim.driver(PAIR_B) == "e1000e"
    assert sim.driver(NIC1) == "vfio-pci", "held before the attach: kept"
    assert list(eng.ledger().claims) == ["12"] and eng.ledger().claim_for_group(12).owner.same(VM1)


def test_attach_of_a_held_companion_rolls_back_to_a_companion(eng, sim):
    eng.prepare(addrs(PAIR), VM1)
    attached = eng.attach_prepare(VM1, addrs(PAIR_B), {})
    assert attached.new == addrs(PAIR_B)
    assert eng.ledger().claim_for_group(15).device(PAIR_B).role == "requested"
    assert eng.attach_rollback(attached) == []
    claim = eng.ledger().claim_for_group(15)
    assert claim.requested == [PAIR] and claim.device(PAIR_B).role == "companion"
    assert sim.driver(PAIR) == sim.driver(PAIR_B) == "vfio-pci"


def test_attach_rollback_with_nothing_new_touches_nothing(eng, sim):
    eng.prepare(addrs(NIC1), VM1)
    attached = eng.attach_prepare(VM1, addrs(NIC1), {})
    assert attached.new == []
    saves = eng.store.saves
    assert eng.attach_rollback(attached) == [] and eng.store.saves == saves
    assert sim.driver(NIC1) == "vfio-pci"


def test_attach_prepare_refused_claims_nothing(eng, sim):
    eng.prepare(addrs(PAIR), VM1)
    before = sim.state()
    with pytest.raises(Refused) as e:
        eng.attach_prepare(VM2, addrs(NIC1, PAIR_B), {})
    assert e.value.holders == [{"group": 15, "owner": VM1.model_dump()}]
    assert sim.state() == before and list(eng.ledger().claims) == ["15"]


def test_detach_release_when_the_guest_did_not_change_releases_nothing(eng, sim):
    eng.prepare(addrs(NIC1), VM1)
    saves = eng.store.saves
    assert eng.detach_release(VM1, addrs(NIC1), guest_had=addrs(NIC1), still_attached=[],
                              guest_changed=False) == ([], None)
    assert eng.store.saves == saves and sim.driver(NIC1) == "vfio-pci"


def test_detach_release_keeps_what_is_still_attached(eng, sim):
    eng.prepare(addrs(NIC1, PAIR), VM1)
    released, done = eng.detach_release(VM1, addrs(NIC1, PAIR), guest_had=addrs(NIC1, PAIR),
                                        still_attached=addrs(PAIR), guest_changed=True)
    assert released == addrs(NIC1) and done is not None and done.groups == [12]
    assert sim.driver(NIC1) == "e1000e" and sim.driver(PAIR) == "vfio-pci"
    assert list(eng.ledger().claims) == ["15"]
    # everything still attached: nothing to release
    assert eng.detach_release(VM1, addrs(PAIR), guest_had=addrs(PAIR), still_attached=addrs(PAIR),
                              guest_changed=True) == ([], None)
    assert sim.driver(PAIR) == "vfio-pci"


def test_detach_release_of_a_claim_the_guest_no_longer_had(eng, sim):
    eng.prepare(addrs(NIC1), VM1)
    # not in the guest any more, but hostdevd holds it: released
    released, done = eng.detach_release(VM1, addrs(NIC1), guest_had=[], still_attached=[], guest_changed=True)
    assert released == addrs(NIC1) and sim.driver(NIC1) == "e1000e" and eng.ledger().claims == {}
    # neither in the guest nor claimed: nothing
    assert eng.detach_release(VM1, addrs(PAIR), guest_had=[], still_attached=[], guest_changed=True) == ([], None)


# --------------------------------------------------------------------------- SR-IOV


def test_vfs_set_is_refused_while_a_vf_is_assigned(tmp_path):
    sim, nl, eng, vfs = sriov_engine(tmp_path, nvfs=3)
    eng.prepare(addrs(vfs[1]), VM1)
    writes = list(sim.writes_to("sriov_numvfs"))
    with pytest.raises(Refused) as e:
        eng.vfs_set(PF, 1)
    assert "vm1" in e.value.message and vfs[1] in e.value.message
    assert list(sim.writes_to("sriov_numvfs")) == writes and sim.vfs(PF) == vfs
    assert eng.ledger().sriov[PF].numvfs == 3 and sim.driver(vfs[1]) == "vfio-pci"
    eng.release(VM1)
    res = eng.vfs_set(PF, 1)
    assert res.changed and res.vfs == sim.vfs(PF) == vfs[:1] and eng.ledger().sriov[PF].vfs == vfs[:1]


def test_vfs_set_takes_unset_options_from_the_config_entry(tmp_path):
    sim, nl, eng, _ = sriov_engine(tmp_path, nvfs=0, config_text='[[sriov]]\npf = "enp3s0f0"\nnumvfs = 4\n'
                                                                 'autoprobe = true\n')
    res = eng.vfs_set(PFNET, 2)
    assert [sim.driver(v) for v in res.vfs] == ["igbvf", "igbvf"]          # autoprobe from the entry
    assert eng.ledger().sriov[PF].autoprobe is True
    assert "the next daemon start sets that again" in res.notes[0]


def test_apply_sriov_config_gives_each_configured_pf_its_vfs(tmp_path):
    sim, nl, eng, _ = sriov_engine(tmp_path, nvfs=0, config_text='[[sriov]]\npf = "eth9"\nnumvfs = 1\n'
                                                                 '[[sriov]]\npf = "enp3s0f0"\nnumvfs = 3\n'
                                                                 'autoprobe = false\n')
    report = eng.apply_sriov_config()
    assert len(report.errors) == 1 and report.errors[0].startswith("eth9:")
    assert [r.pf for r in report.results] == [PF] and report.results[0].vfs == sim.vfs(PF)
    assert len(sim.vfs(PF)) == 3 and all(sim.driver(v) is None for v in sim.vfs(PF))
    rec = eng.ledger().sriov[PF]
    assert (rec.state, rec.numvfs, rec.vfs) == ("ready", 3, sim.vfs(PF))
    writes = list(sim.writes_to("sriov_numvfs"))
    assert not eng.apply_sriov_config().results[0].changed and list(sim.writes_to("sriov_numvfs")) == writes


# --------------------------------------------------------------------------- reservations


def test_apply_reservations_binds_and_gives_back(sim, tmp_path):
    initial = sim.state()
    eng = make_engine(sim, tmp_path / "state", f'reserve = ["{PAIR}"]\n')
    report = eng.apply_reservations()
    assert report.reserved == [15] and report.errors == [] and report.released == []
    claim = eng.ledger().claim_for_group(15)
    assert claim.owner.kind == "reservation" and claim.reserved and claim.state == "active"
    assert eng.ledger().reservations == [PAIR]
    assert sim.driver(PAIR) == sim.driver(PAIR_B) == "vfio-pci"
    assert eng.apply_reservations().reserved == []           # idempotent
    # no longer configured: back to the host
    eng = make_engine(sim, tmp_path / "state")
    report = eng.apply_reservations()
    assert report.released == [15] and sim.state() == initial and eng.ledger().claims == {}


def test_reservation_claim_is_reserved_in_every_save(sim, tmp_path):
    """``reserved=True`` is written in the claim's own transaction: no save ever shows the claim
    without it (a crash between two writes would leave an ordinary claim)."""
    eng = make_engine(sim, tmp_path / "state", f'reserve = ["{PAIR}"]\n')
    real_save, seen = eng.store.save, []

    def save(ledger):
        claim = ledger.claim_for_group(15)
        if claim is not None:
            seen.append((claim.state, claim.reserved))
        real_save(ledger)

    eng.store.save = save
    eng.apply_reservations()
    assert seen and seen[0] == ("claimed", True)
    assert all(reserved for _, reserved in seen) and seen[-1] == ("active", True)


def test_crash_before_activating_a_reservation_leaves_a_reserved_claim_on_disk(sim, tmp_path):
    eng = make_engine(sim, tmp_path / "state", f'reserve = ["{PAIR}"]\n')

    def on_step(name):
        if name == "activate:15":
            raise Crash(name)

    eng.executor.on_step = on_step
    with pytest.raises(Crash):
        eng.apply_reservations()
    on_disk = LedgerStore(tmp_path / "state").read().claim_for_group(15)
    assert on_disk is not None and on_disk.state == "claimed" and on_disk.reserved
    assert on_disk.owner.kind == "reservation"
    assert sim.driver(PAIR) == sim.driver(PAIR_B) == "vfio-pci"


def test_a_domain_borrows_a_reserved_group_through_prepare_domain(sim, tmp_path):
    eng = make_engine(sim, tmp_path / "state", f'reserve = ["{PAIR}"]\n')
    eng.apply_reservations()
    writes = len(sim.write_log)
    done = eng.prepare_domain(domain_request(VM1, PAIR_B))
    assert done.plan.group(15).takeover and eng.ledger().claim_for_group(15).owner.same(VM1)
    eng.release_domain(VM1)
    claim = eng.ledger().claim_for_group(15)
    assert claim.owner.kind == "reservation" and claim.state == "active" and claim.reserved
    assert len(sim.write_log) == writes and sim.driver(PAIR_B) == "vfio-pci"


# --------------------------------------------------------------------------- reconcile, adopt, release


def test_reconcile_releases_gone_domains_and_keeps_running_ones(eng, sim):
    eng.prepare(addrs(PAIR), VM1)
    eng.prepare(addrs(NIC1), VM2)
    report = eng.reconcile(None)                 # libvirt unreachable: nothing released
    assert report.released == [] and not report.libvirt and sim.driver(PAIR) == "vfio-pci"
    report = eng.reconcile([running(VM2, NIC1)])
    assert [(r["group"], r["owner"]) for r in report.released] == [(15, "vm1")]
    assert sim.driver(PAIR) == sim.driver(PAIR_B) == "e1000e" and sim.driver(NIC1) == "vfio-pci"
    assert list(eng.ledger().claims) == ["12"]


def test_reconcile_guard_and_listed_at_are_passed_on(eng, sim):
    eng.prepare(addrs(PAIR), VM1)

    @contextlib.contextmanager
    def busy(name):
        yield name != "vm1"

    assert eng.reconcile([], guard=busy).released == []
    assert eng.reconcile([], listed_at=datetime.now(UTC) - timedelta(seconds=5)).released == []
    assert sim.driver(PAIR) == "vfio-pci" and eng.ledger().claim_for_group(15).state == "active"


def test_adopt_domain_records_what_a_running_domain_uses(eng, sim):
    vfio_bind_by_hand(eng, PAIR)
    assert eng.adopt_domain(running(VM1, PAIR)) == [15]
    claim = eng.ledger().claim_for_group(15)
    assert claim.owner.same(VM1) and claim.state == "active"
    assert (claim.device(PAIR).role, claim.device(PAIR).original_driver) == ("requested", None)
    assert (claim.device(PAIR_B).role, claim.device(PAIR_B).original_driver) == ("companion", "e1000e")
    assert sim.driver(PAIR) == "vfio-pci" and sim.driver(PAIR_B) == "e1000e", "adoption writes nothing"
    assert eng.adopt_domain(running(VM1, PAIR)) == []         # idempotent
    assert eng.adopt_domain(running(VM1, NIC1)) == []         # not on vfio-pci: not adopted


def test_release_missing_lets_go_of_what_the_live_xml_no_longer_has(eng, sim):
    eng.prepare(addrs(PAIR, PAIR_B, NIC1), VM1)
    assert eng.release_missing(running(VM1, PAIR, NIC1)) == [PAIR_B]
    assert sim.driver(PAIR_B) == "vfio-pci" and eng.ledger().claim_for_group(15).device(PAIR_B).role == "companion"
    assert eng.release_missing(running(VM1, PAIR, NIC1), before=datetime.now(UTC) - timedelta(seconds=5)) == []
    assert eng.release_missing(running(VM1, NIC1)) == [PAIR]
    assert sim.driver(PAIR) == sim.driver(PAIR_B) == "e1000e" and list(eng.ledger().claims) == ["12"]


def test_release_owner_releases_claims_older_than_the_event(eng, sim):
    eng.prepare(addrs(PAIR, NIC1), VM1)
    eng.prepare(addrs("0000:02:00.0"), VM2)
    assert eng.release_owner(VM1, before=datetime.now(UTC) - timedelta(seconds=5)) == []
    assert sim.driver(PAIR) == "vfio-pci"
    assert sorted(eng.release_owner(VM1, before=datetime.now(UTC) + timedelta(seconds=1))) == [12, 15]
    assert sim.driver(PAIR) == sim.driver(NIC1) == "e1000e"
    assert list(eng.ledger().claims) == ["13"], "another owner's claim stays"
    assert eng.release_owner(VM1) == []


def test_forget_vanished_releases_a_group_left_with_companions_only(eng, sim):
    eng.prepare(addrs(PAIR_B), VM1)
    assert eng.forget_vanished(A.parse(PAIR_B)) == "", "still present: nothing to forget"
    sim.hot_unplug(PAIR_B)
    assert eng.forget_vanished(A.parse(PAIR_B)) == "released"
    assert eng.ledger().claims == {} and sim.driver(PAIR) == "e1000e"
    assert eng.forget_vanished(A.parse(NIC1)) == "", "no claim covers it"


def test_forget_vanished_keeps_a_group_still_in_use(eng, sim):
    eng.prepare(addrs(PAIR, PAIR_B), VM1)
    sim.hot_unplug(PAIR_B)
    assert eng.forget_vanished(A.parse(PAIR_B)) == "device"
    claim = eng.ledger().claim_for_group(15)
    assert claim.requested == [PAIR] and claim.device(PAIR_B) is None and sim.driver(PAIR) == "vfio-pci"


def test_forget_vanished_of_the_last_device_drops_the_claim(eng, sim):
    eng.prepare(addrs(NIC1), VM1)
    sim.hot_unplug(NIC1)
    assert eng.forget_vanished(A.parse(NIC1)) == "claim"
    assert eng.ledger().claims == {}


# --------------------------------------------------------------------------- migration


def test_migration_report_notes_for_a_stopped_domain_and_the_ledger_only(eng, sim):
    eng.prepare(addrs(NIC1), VM1)
    report = eng.migration_report(VM1, None, "ledger", running=False, ledger_only=True)
    assert report.running is False and report.source == "ledger" and report.blocked
    assert [d.address for d in report.devices] == [NIC1] and report.devices[0].unplug is None
    assert "vm1 is not running: there is nothing to migrate live" in report.notes
    assert "libvirt is not connected: the verdict comes from the ledger alone" in report.notes
    quiet = eng.migration_report(VM1, None, "ledger", running=True)
    assert not any("not running" in n or "not connected" in n for n in quiet.notes) and quiet.running is True


def test_migration_report_counts_only_domain_claims(eng, sim):
    bench = Owner(name="vm1", kind="manual")
    eng.prepare(addrs(NIC1), bench)
    report = eng.migration_report(bench, None, "ledger")
    assert not report.blocked and report.devices == []
