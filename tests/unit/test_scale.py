"""Cost that does not grow with the host (issue 13), checked by counting, never by timing: what
a prepare, a release, a dry run and an adoption read from sysfs, how many ledger saves are
fsynced, the host-critical cache and its invalidation, and the simulated kernel's in-place
patch of a bind (which must give the tree a full rebuild would)."""
from __future__ import annotations

import json
import threading
from collections import Counter

import pytest

from hostdevd.core.address import PciAddress as A
from hostdevd.core.errors import HostdevError
from hostdevd.core.ledger import Claim, DeviceRecord, Owner
from hostdevd.core.ledger_store import LedgerStore
from hostdevd.core.reconcile import RunningDomain
from hostdevd.sim.simkernel import SimKernel

from .conftest import TOPOLOGIES, make_engine

VM1 = Owner(name="vm1", uuid="00000000-0000-0000-0000-000000000001")
PAIR, PAIR_B = "0000:04:00.0", "0000:04:00.1"       # lab group 15, multifunction e1000e pair
MGMT_NIC = "0000:00:11.0"                           # lab: virtio-net carrying the default route


def big_lab(extra: int) -> SimKernel:
    """The lab topology plus ``extra`` single-function e1000e devices, each its own group."""
    spec = json.loads((TOPOLOGIES / "lab.json").read_text())
    for i in range(extra):
        spec["devices"].append({"address": f"0001:{1 + i // 32:02x}:{i % 32:02x}.0", "vendor": "8086",
                                "device": "10d3", "class": "020000", "group": 1000 + i, "driver": "e1000e"})
    return SimKernel.from_spec(spec)


class CountingReads:
    """Counts Sysfs.read_device per address and whole-host enumerations."""

    def __init__(self, sysfs, monkeypatch):
        self.reads: Counter[str] = Counter()
        self.enumerations = 0
        real_read, real_list = sysfs.read_device, sysfs.device_addresses

        def read_device(addr):
            self.reads[str(addr)] += 1
            return real_read(addr)

        def device_addresses():
            self.enumerations += 1
            return real_list()

        monkeypatch.setattr(sysfs, "read_device", read_device)
        monkeypatch.setattr(sysfs, "device_addresses", device_addresses)

    def reset(self) -> None:
        self.reads.clear()
        self.enumerations = 0


@pytest.mark.parametrize("extra", [0, 300])
def test_prepare_and_release_read_only_the_group(tmp_path, monkeypatch, extra):
    sim = big_lab(extra)
    eng = make_engine(sim, tmp_path)
    count = CountingReads(eng.sysfs, monkeypatch)
    eng.critical()                 # host-critical devices: their own cache (see below)
    count.reset()
    eng.prepare([A.parse(PAIR)], VM1)
    assert sim.driver(PAIR) == sim.driver(PAIR_B) == "vfio-pci"
    assert count.enumerations == 0
    assert set(count.reads) == {PAIR, PAIR_B}, count.reads       # the request and its group, nothing else
    assert max(count.reads.values()) <= 2, count.reads     # planned under the lock, recorded at the claim
    count.reset()
    eng.release(VM1)
    assert sim.driver(PAIR) == sim.driver(PAIR_B) == "e1000e"
    assert count.enumerations == 0 and set(count.reads) <= {PAIR, PAIR_B}, count.reads
    count.reset()
    assert eng.plan_prepare([A.parse(PAIR)], VM1).ok and eng.plan_release(VM1).groups == []
    assert count.enumerations == 0 and set(count.reads) <= {PAIR, PAIR_B}


@pytest.mark.parametrize("extra", [0, 300])
def test_preflight_runs_on_the_requested_group_of_the_group_only_topology(tmp_path, monkeypatch, extra):
    """Main's pre-flight checks (holders, power, reset, NUMA) survive issue 13's O(group) reads:
    with_preflight gets the request's groups' endpoints from from_group_reads, no other device."""
    import hostdevd.core.preflight as preflight
    sim = big_lab(extra)
    eng = make_engine(sim, tmp_path)
    gathered: list[tuple[list[str], list[int]]] = []
    real = preflight.gather

    def gather(sysfs, addresses, vfio_groups=(), members=None):
        addresses, vfio_groups = list(addresses), list(vfio_groups)
        gathered.append((sorted(map(str, addresses)), vfio_groups))
        return real(sysfs, addresses, vfio_groups, members)

    monkeypatch.setattr(preflight, "gather", gather)
    count = CountingReads(eng.sysfs, monkeypatch)
    eng.critical()
    count.reset()
    plan = eng.plan_prepare([A.parse(PAIR)], VM1)
    assert plan.ok and gathered == [([PAIR, PAIR_B], [])]
    assert count.enumerations == 0 and set(count.reads) <= {PAIR, PAIR_B}
    gathered.clear()
    eng.prepare([A.parse(PAIR)], VM1)
    assert gathered == [([PAIR, PAIR_B], [])]
    assert count.enumerations == 0 and set(count.reads) <= {PAIR, PAIR_B}


def test_adopting_running_domains_reads_their_groups_not_the_host(tmp_path, monkeypatch):
    sim = big_lab(40)
    eng = make_engine(sim, tmp_path)
    doms = []
    for i in range(3):
        a = f"0001:01:{i:02x}.0"
        sim.load_module("vfio_pci")
        sim.write(f"bus/pci/devices/{a}/driver_override", "vfio-pci")
        sim.write("bus/pci/drivers/e1000e/unbind", a)
        sim.write("bus/pci/drivers_probe", a)
        doms.append(RunningDomain(f"vm{i}", None, [A.parse(a)]))
    count = CountingReads(eng.sysfs, monkeypatch)
    for dom in doms:
        assert eng.adopt_domain(dom) == [1000 + int(str(dom.addresses[0])[-4:-2], 16)]
    assert count.enumerations == 0 and max(count.reads.values()) <= 2 and len(count.reads) == 3


def test_a_cycle_fsyncs_intents_fully_and_outcomes_data_only(tmp_path):
    eng = make_engine(big_lab(0), tmp_path)
    store = eng.store
    saves, durable, fsyncs = store.saves, store.durable_saves, store.fsyncs
    eng.prepare([A.parse(PAIR)], VM1)
    # written ahead: the claim with both devices' intents (binding, original drivers): durable
    # (data and directory fsynced); the activation with both on vfio: an outcome (data fsynced
    # before the rename, the directory not: a power cut loses at worst the rename, never the file)
    assert (store.saves - saves, store.durable_saves - durable, store.fsyncs - fsyncs) == (2, 1, 3)
    saves, durable, fsyncs = store.saves, store.durable_saves, store.fsyncs
    eng.release(VM1)
    # releasing with both devices restoring: durable; the drop: an outcome
    assert (store.saves - saves, store.durable_saves - durable, store.fsyncs - fsyncs) == (2, 1, 3)
    assert eng.ledger().claims == {}


def test_an_outcome_save_fsyncs_the_file_not_the_directory(tmp_path, monkeypatch):
    import os
    store = LedgerStore(tmp_path)
    synced: list[str] = []
    real = os.fsync

    def fsync(fd):
        synced.append("dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with store.transaction():
        pass
    assert synced == ["file", "dir"]
    synced.clear()
    with store.transaction(durable=False):
        pass
    assert synced == ["file"]                      # data on disk before the rename
    assert store.read().claims == {} and not list(tmp_path.glob(".*.tmp"))


def test_host_critical_is_cached_and_dropped_when_its_facts_change(tmp_path, monkeypatch):
    sim = big_lab(0)
    eng = make_engine(sim, tmp_path)
    calls = []
    real = eng.sysfs.host_critical
    monkeypatch.setattr(eng.sysfs, "host_critical", lambda listed=(): calls.append(1) or real(listed))
    first = eng.critical()
    assert A.parse(MGMT_NIC) in first
    eng.critical()
    eng.prepare([A.parse(PAIR)], VM1)
    assert len(calls) == 1, "read once, then cached"
    sim.default_route = None                      # the route table changed: its fingerprint too
    assert A.parse(MGMT_NIC) not in eng.critical() and len(calls) == 2
    eng.forget_host_facts()                       # what a udev event does
    eng.critical()
    assert len(calls) == 3


def test_the_sim_patches_a_bind_into_the_tree_a_rebuild_would_give():
    sim = big_lab(4)

    def tree() -> dict:
        out = {}

        def walk(rel: str) -> None:
            for name in sorted(sim.listdir(rel)):
                child = f"{rel}/{name}" if rel else name
                try:
                    out[child] = ("link", sim.readlink(child))
                    continue
                except OSError:
                    pass
                try:
                    sim.listdir(child)
                except OSError:
                    try:
                        out[child] = ("file", sim.read_bytes(child, 4096))
                    except OSError:
                        out[child] = ("file", None)
                    continue
                walk(child)
        walk("")
        return out

    tree()
    sim.load_module("vfio_pci")
    for a in ("0001:01:00.0", "0001:01:01.0", PAIR):       # PAIR: its netdev goes with its driver
        sim.write(f"bus/pci/devices/{a}/driver_override", "vfio-pci")
        sim.write("bus/pci/drivers/e1000e/unbind", a)
        assert sim._tree is not None, "patched, not thrown away"
        sim.write("bus/pci/drivers_probe", a)
        tree()
    sim.write("bus/pci/drivers/vfio-pci/unbind", "0001:01:00.0")
    assert "class/net/enp4s0f0" not in tree()
    sim.write(f"bus/pci/devices/{PAIR}/driver_override", "\n")
    sim.write("bus/pci/drivers/vfio-pci/unbind", PAIR)
    sim.write("bus/pci/drivers_probe", PAIR)                  # back on e1000e: its netdev again
    assert sim._tree is not None and sim.driver(PAIR) == "e1000e"
    patched = tree()
    assert "class/net/enp4s0f0" in patched
    sim._changed()                                 # a full rebuild from the same state
    assert tree() == patched
    assert patched["devices/pci0001:01/0001:01:01.0/driver"] == ("link", "../../../bus/pci/drivers/vfio-pci")
    assert "devices/pci0001:01/0001:01:00.0/driver" not in patched
    assert "bus/pci/drivers/vfio-pci/0001:01:01.0" in patched and "bus/pci/drivers/vfio-pci/0001:01:00.0" not in patched


NIC1 = "0000:01:00.0"                               # lab group 12, alone


def test_independent_groups_of_one_request_bind_at_once(tmp_path):
    sim = big_lab(0)
    eng = make_engine(sim, tmp_path)
    threads: dict[str, str] = {}
    eng.executor.on_step = lambda name: threads.setdefault(name, threading.current_thread().name)
    eng.prepare([A.parse(NIC1), A.parse(PAIR)], VM1)
    assert sim.driver(NIC1) == sim.driver(PAIR) == sim.driver(PAIR_B) == "vfio-pci"
    assert [n for n in threads if n.startswith("claim:")] == ["claim:12", "claim:15"]   # both claims first
    assert threads[f"bind:{NIC1}"] != threads[f"bind:{PAIR}"] == threads[f"bind:{PAIR_B}"]
    assert {c.state.value for c in eng.ledger().claims.values()} == {"active"}
    eng.release(VM1)
    assert sim.driver(NIC1) == sim.driver(PAIR) == "e1000e"


@pytest.mark.parametrize("failing", [NIC1, PAIR_B])
def test_a_failing_group_rolls_back_every_group_of_the_request(tmp_path, failing):
    sim = big_lab(0)
    before = sim.state()
    eng = make_engine(sim, tmp_path)
    sim.fail_writes(f"bus/pci/devices/{failing}/driver_override", count=1)
    with pytest.raises(HostdevError):
        eng.prepare([A.parse(NIC1), A.parse(PAIR)], VM1)
    assert sim.state() == before and eng.ledger().claims == {}


def test_groups_stay_one_after_another_when_asked(tmp_path):
    eng = make_engine(big_lab(0), tmp_path)
    eng.executor.parallel_groups = False
    names: list[str] = []
    eng.executor.on_step = names.append
    eng.prepare([A.parse(NIC1), A.parse(PAIR)], VM1)
    assert names == ["claim:12", f"bind:{NIC1}", "activate:12", "claim:15", f"bind:{PAIR}", f"bind:{PAIR_B}",
                     "activate:15"]


def test_ledger_peek_is_parsed_once_per_version_of_the_file(tmp_path):
    store = LedgerStore(tmp_path)
    empty = store.peek()
    assert empty.claims == {}
    with store.transaction() as led:
        led.put(Claim(group=12, owner=VM1, devices=[DeviceRecord(address=NIC1, role="requested",
                                                                  original_driver="e1000e", original_override=None)]))
    first = store.peek()
    assert first is store.peek(), "parsed once, shared while the file is the same"
    assert first.claim_for_group(12) is not None
    with store.transaction() as led:
        led.drop(12)
    assert store.peek() is not first and store.peek().claims == {}, "a save is a new file: parsed again"
    assert store.read() is not store.read(), "read() still hands out a private copy"


def test_reconciliation_reads_claimed_groups_and_driver_links_not_every_device(tmp_path, monkeypatch):
    sim = big_lab(300)
    eng = make_engine(sim, tmp_path)
    eng.prepare([A.parse(PAIR)], VM1)
    orphan = "0001:01:05.0"                       # on vfio-pci, no claim: reported, left alone
    sim.write(f"bus/pci/devices/{orphan}/driver_override", "vfio-pci")
    sim.write("bus/pci/drivers/e1000e/unbind", orphan)
    sim.write("bus/pci/drivers_probe", orphan)
    count = CountingReads(eng.sysfs, monkeypatch)
    report = eng.reconcile(None)
    assert [o["address"] for o in report.orphans] == [orphan] and not report.errors
    assert set(count.reads) <= {PAIR, PAIR_B, orphan}, count.reads
    assert count.enumerations == 1                # the driver links, once


def test_the_running_index_finds_what_the_scan_finds():
    from itertools import product

    from hostdevd.core.reconcile import _find_running, _RunningIndex
    uuids = [None, "00000000-0000-0000-0000-00000000000a", "00000000-0000-0000-0000-00000000000b"]
    running = [RunningDomain(n, u, []) for n, u in product(["a", "b"], uuids)][::-1]
    for cut in range(len(running) + 1):
        doms = running[cut:] + running[:cut]
        index = _RunningIndex(doms)
        for name, uuid, kind in product(["a", "b", "c"], uuids, ["domain", "manual"]):
            owner = Owner(name=name, uuid=uuid, kind=kind)
            assert index.find(owner) is _find_running(doms, owner), (owner, doms)


def test_status_says_how_requests_read_the_host():
    from hostdevd.doors.wire import call

    from .daemon_support import running_daemon
    with running_daemon("lab") as (d, sim, path):
        topo = call(path, {"op": "status"})["topology"]
        assert topo["requests"].startswith("per group")
        assert "udev not watched" in topo["host_critical"]          # the sim has no uevents
        assert call(path, {"op": "prepare", "domain": {"name": "vm1"}, "addresses": [NIC1]})["ok"]
