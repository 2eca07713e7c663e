"""SR-IOV provisioning (R11) on the simulated kernel: config, the pure plan and its refusals,
writes through 0, waiting (sysfs polling and a fake udev monitor), the ledger record, the
daemon applying [[sriov]] before reservations, `hostdevctl vfs` / `vfs set` (locally and
through the daemon), VF assignment (own group, or refused without ACS) and release back to
the VF's previous state (R6)."""
from __future__ import annotations

import errno
import json

import pytest

from hostdevd.adapters.udev import UdevWaiter, _UdevWatch, default_waiter
from hostdevd.core.address import PciAddress as A
from hostdevd.core.config import parse_config
from hostdevd.core.errors import ConfigError, Refused, SriovTimeout, SysfsTimeout
from hostdevd.core.ledger import Owner
from hostdevd.core.ledger_store import LedgerStore
from hostdevd.core.sriov import apply_config, set_vfs_by_hand
from hostdevd.core.vf_wait import SysfsPollWaiter
from hostdevd.doors import cli, wire
from hostdevd.sim.fakenetlink import FakeNetlink
from hostdevd.sim.simkernel import SimKernel

from .conftest import TOPOLOGIES, load_sim, make_engine
from .daemon_support import domain_xml, running_daemon, vfio_bind_by_hand

PF = "0000:03:00.0"
WEB1 = Owner(name="web1", uuid="00000000-0000-0000-0000-0000000000a1")
DB1 = Owner(name="db1", uuid="00000000-0000-0000-0000-0000000000d1")


def sriov_spec(**sriov_changes) -> dict:
    spec = json.loads((TOPOLOGIES / "sriov_pf.json").read_text())
    spec["devices"][-1]["sriov"].update(sriov_changes)
    return spec


def numvfs_writes(sim: SimKernel) -> list[str]:
    return [v for _, v in sim.writes_to("sriov_numvfs")]


# --------------------------------------------------------------------------- config


def test_config_sriov_entries():
    cfg = parse_config('[[sriov]]\npf = "enp3s0f0"\nnumvfs = 4\n\n'
                       '[[sriov]]\npf = "03:00.1"\nnumvfs = 0\nautoprobe = true\nwait_timeout = 90\n')
    assert [(e.pf, e.numvfs, e.autoprobe, e.wait_timeout) for e in cfg.sriov] == [
        ("enp3s0f0", 4, False, 60.0), ("0000:03:00.1", 0, True, 90.0)]


@pytest.mark.parametrize("text, where", [
    ('[[sriov]]\npf = "not an if"\nnumvfs = 1', "sriov[0].pf"),
    ('[[sriov]]\npf = "03:00.0"\nnumvfs = -1', "sriov[0].numvfs"),
    ('[[sriov]]\npf = "03:00.0"\nnumvfs = 1\nwait_timeout = 0', "sriov[0].wait_timeout"),
    ('[[sriov]]\npf = "03:00.0"\nnumvfs = 1\nvfs = 3', "sriov[0].vfs"),
    ('[[sriov]]\npf = "03:00.0"\nnumvfs = 1\n[[sriov]]\npf = "0000:03:00.0"\nnumvfs = 2', "twice"),
])
def test_config_sriov_mistakes_name_the_key(text, where):
    with pytest.raises(ConfigError) as e:
        parse_config(text)
    assert where in str(e.value)


# --------------------------------------------------------------------------- the plan (pure)


def test_plan_resolves_netdev_and_goes_through_zero(tmp_path):
    sim = load_sim("sriov_pf")
    eng = make_engine(sim, tmp_path)
    plan = eng.plan_vfs("enp3s0f0", 4, autoprobe=False)
    assert plan.ok and plan.pf == PF and plan.steps == [("autoprobe", False), ("numvfs", 4), ("wait", 4)]
    eng.set_vfs(PF, 4, False)
    plan = eng.plan_vfs(PF, 2, autoprobe=False)
    assert plan.steps == [("numvfs", 0), ("numvfs", 2), ("wait", 2)]
    assert eng.plan_vfs(PF, 4, autoprobe=False).noop
    # same count, other autoprobe: the VFs are made again so the setting applies to them
    assert eng.plan_vfs(PF, 4, autoprobe=True).steps == [("autoprobe", True), ("numvfs", 0), ("numvfs", 4),
                                                         ("wait", 4)]
    # autoprobe None keeps the PF's setting
    assert eng.plan_vfs(PF, 4, autoprobe=None).noop


@pytest.mark.parametrize("pf, n, why", [
    ("0000:09:00.0", 2, "no PCI device or network interface"),
    ("eth9", 2, "no PCI device or network interface"),
    ("0000:00:1f.6", 2, "no SR-IOV capability"),
    (PF, 9, "at most 8 VFs"),
])
def test_plan_refusals(tmp_path, pf, n, why):
    eng = make_engine(load_sim("sriov_pf"), tmp_path)
    plan = eng.plan_vfs(pf, n)
    assert not plan.ok and why in plan.refusals[0] and plan.hint


def test_plan_refuses_a_vf_as_pf_and_a_driverless_pf(tmp_path):
    sim = load_sim("sriov_pf")
    eng = make_engine(sim, tmp_path)
    eng.set_vfs(PF, 2, True)
    vf = sim.vfs(PF)[0]
    plan = eng.plan_vfs(vf, 1)
    assert not plan.ok and "is itself a VF" in plan.refusals[0]
    eng.set_vfs(PF, 0)
    eng.sysfs.unbind(A.parse(PF))
    plan = eng.plan_vfs(PF, 2)
    assert not plan.ok and "has no driver" in plan.refusals[0] and "ENOENT" in plan.refusals[0]


# --------------------------------------------------------------------------- applying


def test_set_vfs_writes_through_zero_and_records(tmp_path):
    sim = load_sim("sriov_pf")
    eng = make_engine(sim, tmp_path)
    res = eng.set_vfs("enp3s0f0", 4, autoprobe=False, timeout=5)
    assert res.changed and len(res.vfs) == 4 and res.vfs == sim.vfs(PF) and res.seconds is not None
    assert all(sim.driver(v) is None for v in res.vfs)                 # autoprobe off: driverless
    assert len({sim.group_of(v) for v in res.vfs}) == 4                # a group each (ACS)
    rec = eng.ledger().sriov[PF]
    assert (rec.state, rec.numvfs, rec.autoprobe, rec.vfs, rec.previous_numvfs) == ("ready", 4, False, res.vfs, 0)
    eng.set_vfs(PF, 2, autoprobe=False)
    assert numvfs_writes(sim) == ["4", "0", "2"]                       # never 4 -> 2 directly
    assert eng.ledger().sriov[PF].previous_numvfs == 4 and len(sim.vfs(PF)) == 2
    again = eng.set_vfs(PF, 2, autoprobe=False)
    assert not again.changed and numvfs_writes(sim) == ["4", "0", "2"]
    eng.set_vfs(PF, 0)
    assert sim.vfs(PF) == [] and eng.ledger().sriov[PF].vfs == []


def test_autoprobe_on_gives_vfs_their_driver(tmp_path):
    sim = load_sim("sriov_pf")
    eng = make_engine(sim, tmp_path)
    res = eng.set_vfs(PF, 3, autoprobe=True)
    assert [sim.driver(v) for v in res.vfs] == ["igbvf"] * 3


def test_refused_while_a_vf_is_assigned_naming_the_domains(tmp_path):
    sim = load_sim("sriov_pf")
    eng = make_engine(sim, tmp_path)
    vfs = eng.set_vfs(PF, 4, autoprobe=False).vfs
    eng.prepare([A.parse(vfs[1])], WEB1)
    eng.prepare([A.parse(vfs[3])], DB1)
    writes = numvfs_writes(sim)
    with pytest.raises(Refused) as e:
        eng.set_vfs(PF, 2)
    msg = str(e.value)
    assert "while VFs are assigned" in msg and "web1" in msg and "db1" in msg and vfs[1] in msg
    assert "stop or release db1, web1" in msg
    assert numvfs_writes(sim) == writes and sim.vfs(PF) == vfs        # nothing written
    plan = eng.plan_vfs(PF, 0)
    assert {h["owner"] for h in plan.holders} == {"web1", "db1"}
    assert eng.plan_vfs(PF, 4, autoprobe=False).noop                  # the same count is fine
    eng.release(WEB1)
    eng.release(DB1)
    assert eng.set_vfs(PF, 2).vfs == sim.vfs(PF)


def test_refused_while_a_reserved_vf_or_an_unknown_qemu_holds_one(tmp_path):
    sim = load_sim("sriov_pf")
    eng = make_engine(sim, tmp_path)
    vfs = eng.set_vfs(PF, 2, autoprobe=True).vfs
    from hostdevd.core.reservations import apply_reservations
    apply_reservations(eng, [vfs[0]])
    with pytest.raises(Refused) as e:
        eng.set_vfs(PF, 0)
    assert "to the reservation" in str(e.value)
    apply_reservations(eng, [])
    vfio_bind_by_hand(eng, vfs[1])              # libvirt or a script, behind hostdevd's back
    sim.open_group(sim.group_of(vfs[1]))        # ... and a QEMU uses it
    with pytest.raises(Refused) as e:
        eng.set_vfs(PF, 0)
    assert "QEMU hostdevd does not know about" in str(e.value)
    sim.close_group(sim.group_of(vfs[1]))
    eng.set_vfs(PF, 0)
    assert sim.vfs(PF) == []


def test_pf_itself_assigned_is_refused(tmp_path):
    sim = load_sim("sriov_pf")
    eng = make_engine(sim, tmp_path)
    eng.prepare([A.parse(PF)], WEB1)
    plan = eng.plan_vfs(PF, 2)
    assert not plan.ok and "web1" in plan.refusals[0]


def test_hung_numvfs_write_times_out_and_is_recorded_failed(tmp_path):
    sim = load_sim("sriov_pf")
    eng = make_engine(sim, tmp_path)
    sim.hang_writes("sriov_numvfs")
    try:
        with pytest.raises(SysfsTimeout) as e:
            eng.set_vfs(PF, 4, timeout=0.3)
        assert "0.3s" in str(e.value) and PF in str(e.value)
    finally:
        sim.release_hangs()
    rec = eng.ledger().sriov[PF]
    assert rec.state == "failed" and "did not return" in rec.note


def test_vfs_that_never_appear_time_out(tmp_path):
    sim = load_sim("sriov_pf")
    eng = make_engine(sim, tmp_path)

    class NeverWaiter(SysfsPollWaiter):
        def wait(self, pf, count, timeout):
            return super().wait(pf, count + 1, timeout)

    eng.vf_waiter = NeverWaiter(eng.sysfs, interval=0.01)
    with pytest.raises(SriovTimeout) as e:
        eng.set_vfs(PF, 2, timeout=0.2)
    assert "2 of 3 VFs appeared within" in str(e.value)
    assert eng.ledger().sriov[PF].state == "failed"


def test_default_waiter_is_sysfs_polling_on_the_simulated_kernel(tmp_path):
    eng = make_engine(load_sim("sriov_pf"), tmp_path)
    assert isinstance(default_waiter(eng.sysfs), SysfsPollWaiter) and eng.vf_waiter.name == "sysfs"


# --------------------------------------------------------------------------- the udev waiter


class FakeUdevDevice:
    def __init__(self, name, action="add"):
        self.sys_name, self.action = name, action


class FakeMonitor:
    """pyudev.Monitor's poll(): events queued by the test; None after the timeout."""

    def __init__(self, sim, events):
        self.sim, self.events, self.polls = sim, list(events), 0

    def poll(self, timeout=None):
        self.polls += 1
        return self.events.pop(0) if self.events else None


def test_udev_watch_waits_for_add_events_of_the_new_vfs(tmp_path):
    sim = load_sim("sriov_pf")
    eng = make_engine(sim, tmp_path)
    eng.sysfs.set_sriov_drivers_autoprobe(A.parse(PF), False)
    eng.sysfs.set_sriov_numvfs(A.parse(PF), 2)
    vfs = sim.vfs(PF)
    mon = FakeMonitor(sim, [FakeUdevDevice("0000:00:1f.6", "bind"), FakeUdevDevice(vfs[0]),
                            FakeUdevDevice("0000:02:00.0"), FakeUdevDevice(vfs[1])])
    assert _UdevWatch(eng.sysfs, mon).wait(A.parse(PF), 2, 5.0) == []
    assert mon.polls == 4 and mon.events == []


def test_udev_watch_without_udev_events_trusts_sysfs_with_a_note(tmp_path):
    sim = load_sim("sriov_pf")
    eng = make_engine(sim, tmp_path)
    eng.sysfs.set_sriov_numvfs(A.parse(PF), 2)
    notes = _UdevWatch(eng.sysfs, FakeMonitor(sim, [FakeUdevDevice(sim.vfs(PF)[0])])).wait(A.parse(PF), 2, 0.05)
    assert notes and "udev announced 1 of 2 VFs" in notes[0] and "systemd-udevd" in notes[0]
    with pytest.raises(SriovTimeout):
        _UdevWatch(eng.sysfs, FakeMonitor(sim, [])).wait(A.parse(PF), 3, 0.05)


def test_udev_waiter_uses_a_pci_add_monitor(monkeypatch, tmp_path):
    import types

    made = {}

    class Mon:
        @classmethod
        def from_netlink(cls, ctx):
            made["mon"] = m = cls()
            m.filters, m.started = [], False
            return m

        def filter_by(self, subsystem=None, device_type=None):
            self.filters.append(subsystem)

        def start(self):
            self.started = True

        def poll(self, timeout=None):
            return None

    fake = types.SimpleNamespace(Context=lambda: object(), Monitor=Mon)
    monkeypatch.setitem(__import__("sys").modules, "pyudev", fake)
    sim = load_sim("sriov_pf")
    eng = make_engine(sim, tmp_path)
    waiter = UdevWaiter(eng.sysfs)
    with waiter.watch(A.parse(PF)) as w:
        assert made["mon"].filters == ["pci"] and made["mon"].started   # listening before the write
        assert isinstance(w, _UdevWatch)


# --------------------------------------------------------------------------- daemon and CLI


def test_daemon_start_creates_configured_vfs_before_reservations(tmp_path):
    sim = load_sim("sriov_pf")
    state = tmp_path / "state"               # kept across the three daemon starts
    # the reserved device is the second VF: it only exists once the PF has VFs
    with running_daemon(sim, state_dir=state, config_text='reserve = ["0000:03:10.4"]\n\n[[sriov]]\n'
                        'pf = "enp3s0f0"\nnumvfs = 3\nautoprobe = false\n') as (d, _, _):
        assert sim.vfs(PF) == ["0000:03:10.0", "0000:03:10.4", "0000:03:11.0"]
        assert d.sriov.errors == [] and d.sriov.results[0].changed
        assert sim.driver("0000:03:10.4") == "vfio-pci" and d.reservations.reserved
        assert sim.driver("0000:03:10.0") is None
        assert d.engine.ledger().sriov[PF].state == "ready"
    # a restart with the same config changes nothing (the reserved VF would refuse it anyway)
    writes = numvfs_writes(sim)
    with running_daemon(sim, state_dir=state, config_text='reserve = ["0000:03:10.4"]\n\n[[sriov]]\n'
                        'pf = "enp3s0f0"\nnumvfs = 3\n') as (d, _, _):
        assert numvfs_writes(sim) == writes and d.sriov.errors == []
    # asking for another count while the VF is reserved: refused, logged, the daemon still starts
    with running_daemon(sim, state_dir=state, config_text='reserve = ["0000:03:10.4"]\n\n[[sriov]]\n'
                        'pf = "enp3s0f0"\nnumvfs = 5\n') as (d, _, _):
        assert numvfs_writes(sim) == writes and "to the reservation" in d.sriov.errors[0]
        assert d.server.alive


def test_apply_config_reports_each_pf(tmp_path):
    sim = load_sim("sriov_pf")
    eng = make_engine(sim, tmp_path, '[[sriov]]\npf = "eth9"\nnumvfs = 1\n[[sriov]]\npf = "enp3s0f0"\nnumvfs = 2\n')
    report = apply_config(eng, eng.config.sriov)
    assert "eth9" in report.errors[0] and [r.numvfs for r in report.results] == [2]


def test_vfs_set_op_through_the_socket():
    sim = load_sim("sriov_pf")
    with running_daemon(sim) as (d, _, _):
        r = wire.call(d.server.path, {"op": "vfs_set", "pf": "enp3s0f0", "numvfs": 2, "autoprobe": False})
        assert r["ok"] and r["vfs"]["vfs"] == sim.vfs(PF) and r["vfs"]["changed"]
        d.engine.prepare([A.parse(sim.vfs(PF)[0])], WEB1)
        r = wire.call(d.server.path, {"op": "vfs_set", "pf": PF, "numvfs": 4})
        assert not r["ok"] and r["error"]["code"] == "REFUSED" and "web1" in r["error"]["message"]
        r = wire.call(d.server.path, {"op": "vfs_set", "pf": PF, "numvfs": -1})
        assert not r["ok"] and r["error"]["code"] == "BAD_REQUEST"


def run_cli(argv, sim, state, netlink=None):
    out: list[str] = []
    from hostdevd.core.sysfs import Sysfs
    rc = cli.main(["--state-dir", str(state), "--no-daemon"] + argv, sysfs=Sysfs(sim, 2.0), out=out.append,
                  netlink=netlink)
    return rc, "\n".join(out)


def test_hostdevctl_vfs_set_and_list(tmp_path):
    sim = load_sim("sriov_pf")
    nl = FakeNetlink().add_pf("enp3s0f0", 8)
    rc, out = run_cli(["vfs", "set", "enp3s0f0", "3", "--no-autoprobe"], sim, tmp_path, nl)
    assert rc == 0 and out.startswith(f"PF {PF}: 3 VFs set in ") and "(sysfs)" in out
    assert all(v in out for v in sim.vfs(PF))
    eng = make_engine(sim, tmp_path, netlink=nl)
    eng.prepare([A.parse(sim.vfs(PF)[2])], WEB1)
    nl.pfs["enp3s0f0"][2].mac, nl.pfs["enp3s0f0"][2].vlan = "52:54:00:12:34:56", 42
    rc, out = run_cli(["vfs"], sim, tmp_path, nl)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == f"PF {PF} enp3s0f0 (igb): 3 of 8 VFs, autoprobe off, set by hostdevd: ready in " \
                       f"{eng.ledger().sriov[PF].seconds:.3f} s"
    assert lines[2].split() == ["PF", "VF", "ADDRESS", "GROUP", "DRIVER", "OWNER", "MAC", "VLAN"]
    row = lines[5].split()
    assert row == [PF, "2", sim.vfs(PF)[2], str(sim.group_of(sim.vfs(PF)[2])), "vfio-pci", "web1",
                   "52:54:00:12:34:56", "42"]
    assert lines[3].split()[4:] == ["-", "-", "00:00:00:00:00:00", "0"]
    rc, out = run_cli(["vfs", "--json"], sim, tmp_path, nl)
    data = json.loads(out)
    vf = data["pfs"][0]["vfs"][2]
    assert (vf["owner"], vf["driver"], vf["mac"], vf["vlan"]) == ("web1", "vfio-pci", "52:54:00:12:34:56", 42)
    assert vf["saved"]["pf_netdev"] == "enp3s0f0" and vf["saved"]["vf_index"] == 2
    # refused while assigned: exit 1, reason and fix
    rc, out = run_cli(["vfs", "set", PF, "1"], sim, tmp_path, nl)
    assert rc == 1 and "REFUSED" in out and "web1" in out and "fix: stop or release web1" in out
    rc, out = run_cli(["vfs", "set", PF, "1", "--json"], sim, tmp_path, nl)
    assert rc == 1 and json.loads(out)["ok"] is False


def test_hostdevctl_vfs_without_netlink_and_without_pfs(tmp_path):
    rc, out = run_cli(["vfs"], load_sim("lab"), tmp_path)
    assert rc == 0 and "PF 0000:03:00.0 - (nvme): 0 of 16 VFs, autoprobe off" in out
    rc, out = run_cli(["vfs"], load_sim("desktop_gpu"), tmp_path)
    assert rc == 0 and out == "no SR-IOV capable PF on this host"


def test_hostdevctl_vfs_set_goes_through_the_daemon_when_it_runs(tmp_path):
    sim = load_sim("sriov_pf")
    with running_daemon(sim) as (d, _, _):
        conf = tmp_path / "hostdevd.toml"
        conf.write_text(f'runtime_dir = "{d.engine.config.runtime_dir}"\nstate_dir = "{d.engine.config.state_dir}"\n')
        out: list[str] = []
        from hostdevd.core.sysfs import Sysfs
        rc = cli.main(["--config", str(conf), "vfs", "set", PF, "2"], sysfs=Sysfs(sim, 2.0), out=out.append)
        assert rc == 0 and "note: done by the hostdevd daemon" in "\n".join(out)
        assert len(sim.vfs(PF)) == 2 and d.dispatcher is not None


def test_vfs_set_by_hand_takes_defaults_from_the_config_entry(tmp_path):
    sim = load_sim("sriov_pf")
    eng = make_engine(sim, tmp_path, '[[sriov]]\npf = "enp3s0f0"\nnumvfs = 4\nautoprobe = false\nwait_timeout = 7\n')
    res = set_vfs_by_hand(eng, PF, 2)
    assert all(sim.driver(v) is None for v in res.vfs)             # autoprobe from the entry
    assert "the next daemon start sets that again" in res.notes[0]


# --------------------------------------------------------------------------- assignment and release (R6)


def test_vf_hostdev_released_driverless_when_autoprobe_off(tmp_path):
    sim = load_sim("sriov_pf")
    eng = make_engine(sim, tmp_path)
    vfs = eng.set_vfs(PF, 2, autoprobe=False).vfs
    before = sim.state()
    eng.prepare([A.parse(vfs[0])], WEB1)
    assert sim.driver(vfs[0]) == "vfio-pci" and sim.driver(PF) == "igb"
    eng.release(WEB1)
    assert sim.state() == before and sim.driver(vfs[0]) is None       # drivers_probe alone would do nothing


def test_vf_hostdev_released_back_to_its_vf_driver_when_autoprobe_on(tmp_path):
    sim = load_sim("sriov_pf")
    eng = make_engine(sim, tmp_path)
    vfs = eng.set_vfs(PF, 2, autoprobe=True).vfs
    before = sim.state()
    assert before[vfs[1]] == ("igbvf", None)
    eng.prepare([A.parse(vfs[1])], WEB1)
    eng.release(WEB1)
    assert sim.state() == before


def test_vf_on_its_driver_returns_there_even_if_autoprobe_went_off_meanwhile(tmp_path):
    sim = load_sim("sriov_pf")
    eng = make_engine(sim, tmp_path)
    vfs = eng.set_vfs(PF, 2, autoprobe=True).vfs
    eng.prepare([A.parse(vfs[0])], WEB1)
    eng.sysfs.set_sriov_drivers_autoprobe(A.parse(PF), False)
    eng.release(WEB1)
    assert sim.state()[vfs[0]] == ("igbvf", None)                    # named explicitly, override restored
    assert list(sim.writes_to(f"{vfs[0]}/driver_override"))[-2:] == [
        (f"bus/pci/devices/{vfs[0]}/driver_override", "igbvf"), (f"bus/pci/devices/{vfs[0]}/driver_override", "\n")]


def test_vf_sharing_the_pf_group_is_refused_explaining_acs(tmp_path):
    sim = SimKernel.from_spec(sriov_spec(vfs_share_group=True))
    eng = make_engine(sim, tmp_path)
    vfs = eng.set_vfs(PF, 2, autoprobe=False).vfs
    assert {sim.group_of(v) for v in vfs} == {sim.group_of(PF)}
    before = sim.state()
    plan = eng.plan_prepare([A.parse(vfs[0])], WEB1)
    assert not plan.ok
    why = " ".join(r.reason + " " + r.hint for r in plan.refusals)
    assert "SR-IOV PF with 2 VFs enabled" in why and "lacks ACS" in why
    with pytest.raises(Refused):
        eng.prepare([A.parse(vfs[0])], WEB1)
    assert sim.state() == before and eng.ledger().claims == {}


def test_domain_with_vf_hostdev_through_the_daemon(tmp_path):
    sim = load_sim("sriov_pf")
    with running_daemon(sim, config_text='[[sriov]]\npf = "enp3s0f0"\nnumvfs = 2\n') as (d, _, _):
        vf = sim.vfs(PF)[1]
        xml = domain_xml("web1", WEB1.uuid, vf)
        r = wire.call(d.server.path, {"op": "prepare", "origin": "hook", "domain": {"name": "web1"}, "xml": xml})
        assert r["ok"] and sim.driver(vf) == "vfio-pci"
        r = wire.call(d.server.path, {"op": "vfs_set", "pf": PF, "numvfs": 0})
        assert not r["ok"] and "web1" in r["error"]["message"] and len(sim.vfs(PF)) == 2
        r = wire.call(d.server.path, {"op": "release", "origin": "hook", "domain": {"name": "web1"}, "xml": xml})
        assert r["ok"] and sim.driver(vf) is None


def test_numvfs_write_error_is_reported(tmp_path):
    sim = load_sim("sriov_pf")
    eng = make_engine(sim, tmp_path)
    sim.fail_writes("sriov_numvfs", errno.ENOMEM)
    with pytest.raises(Exception) as e:
        eng.set_vfs(PF, 2)
    assert "ENOMEM" in str(e.value) and eng.ledger().sriov[PF].state == "failed"
    store = LedgerStore(tmp_path)
    assert store.read().sriov[PF].note


# --------------------------------------------------------------------------- hostdev networks


class NetAdapter:
    """Just enough of the libvirt adapter for a hook prepare: the network's XML."""
    uri, connected = "test:///", True

    def __init__(self, networks):
        self.networks, self.asked = networks, []

    def network_xml(self, name):
        self.asked.append(name)
        return self.networks.get(name)

    def stop(self):
        pass


def test_hostdev_network_pool_is_resolved_from_the_network_xml():
    from hostdevd.core.netxml import parse_network
    from hostdevd.core.sriov import network_pool
    sim = load_sim("sriov_pf")
    with running_daemon(sim, config_text='[[sriov]]\npf = "enp3s0f0"\nnumvfs = 2\n') as (d, _, _):
        vfs = sim.vfs(PF)
        net = ("<network><name>pool</name><forward mode='hostdev' managed='yes'><pf dev='enp3s0f0'/>"
               "</forward></network>")
        assert [str(a) for a in network_pool(d.engine.topology(), parse_network(net))] == vfs
        d.adapter = NetAdapter({"pool": net, "nat": "<network><name>nat</name><forward mode='nat'/></network>"})
        d._lv_connected = True
        xml = ("<domain><name>web1</name><devices><interface type='network'><source network='pool'/></interface>"
               "<interface type='network'><source network='nat'/></interface></devices></domain>")
        r = wire.call(d.server.path, {"op": "prepare", "origin": "hook", "domain": {"name": "web1"}, "xml": xml})
        assert r["ok"] and r["networks"][0]["hostdev_pool"] == vfs and r["networks"][0]["assignable"] == vfs
        assert "hostdev_pool" not in r["networks"][1] and d.adapter.asked == ["pool", "nat"]
        assert "'start begin' hook" in r["warnings"][0]
        d.engine.prepare([A.parse(v) for v in vfs], DB1)          # every VF of the pool is taken
        r = wire.call(d.server.path, {"op": "prepare", "origin": "hook", "domain": {"name": "web1"}, "xml": xml})
        assert not r["ok"] and "hostdev network 'pool' has no VF web1 could get" in r["error"]["message"]
        assert "db1" in r["error"]["message"]
        # the pool's own refusal first, then each VF's (held by db1), each with its code
        assert {x["code"] for x in r["error"]["refusals"]} == {"NO_FREE_VF", "GROUP_HELD"}
        assert r["error"]["refusals"][0]["code"] == "NO_FREE_VF"


def test_managed_no_hostdev_network_vf_is_prepared_at_prepare_begin():
    """libvirt refuses an unmanaged VF that is not on vfio-pci before 'start begin' ("Unmanaged PCI
    device … must be manually detached"): hostdevd prepares the VF libvirt will pick (the first
    of the pool without a user) at 'prepare begin', and leaves its MAC to libvirt."""
    sim = load_sim("sriov_pf")
    nl = FakeNetlink().add_pf("enp3s0f0", 8)
    with running_daemon(sim, config_text='[[sriov]]\npf = "enp3s0f0"\nnumvfs = 3\n', netlink=nl) as (d, _, _):
        vfs = sim.vfs(PF)
        d.adapter = NetAdapter({"pool": "<network><name>pool</name><forward mode='hostdev' managed='no'>"
                                         "<pf dev='enp3s0f0'/></forward></network>"})
        d._lv_connected = True

        def xml(name, mac):
            return (f"<domain><name>{name}</name><devices><interface type='network'><mac address='{mac}'/>"
                    "<source network='pool'/></interface></devices></domain>")
        d.engine.prepare([A.parse(vfs[0])], DB1)                  # taken directly by another domain
        r = wire.call(d.server.path, {"op": "prepare", "origin": "hook", "domain": {"name": "web1"},
                                      "xml": xml("web1", "52:54:00:00:00:01")})
        assert r["ok"] and r["networks"][0]["prepared"] == vfs[1] and sim.driver(vfs[1]) == "vfio-pci"
        cfg = d.engine.ledger().claim_for_device(vfs[1]).device(vfs[1]).vf_netconfig
        assert (cfg.state, cfg.mac, cfg.requested_mac) == ("libvirt", ZERO_MAC_, "52:54:00:00:00:01")
        assert nl.calls == []
        r = wire.call(d.server.path, {"op": "prepare", "origin": "hook", "domain": {"name": "app2"},
                                      "xml": xml("app2", "52:54:00:00:00:02")})
        assert r["ok"] and r["networks"][0]["prepared"] == vfs[2]
        r = wire.call(d.server.path, {"op": "prepare", "origin": "hook", "domain": {"name": "app3"},
                                      "xml": xml("app3", "52:54:00:00:00:03")})
        assert not r["ok"] and "has no VF app3 could get" in r["error"]["message"]
        wire.call(d.server.path, {"op": "release", "origin": "hook", "domain": {"name": "web1"}})
        assert sim.driver(vfs[1]) is None and d.engine.ledger().claim_for_device(vfs[1]) is None


ZERO_MAC_ = "00:00:00:00:00:00"
