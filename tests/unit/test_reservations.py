"""Reservations: bound at daemon start, borrowed by domains, never returned to host drivers."""
from __future__ import annotations

import pytest

from hostdevd.core.address import PciAddress as A
from hostdevd.core.errors import HostdevError, Refused
from hostdevd.core.ledger import Owner
from hostdevd.core.reservations import apply_reservations

from .conftest import load_sim, make_engine

VM1 = Owner(name="vm1", uuid="00000000-0000-0000-0000-0000000000a1")
VM2 = Owner(name="vm2", uuid="00000000-0000-0000-0000-0000000000a2")


@pytest.fixture
def reserved(tmp_path):
    sim = load_sim("lab")
    initial = sim.state()
    eng = make_engine(sim, tmp_path)
    report = apply_reservations(eng, ["0000:04:00.0"])
    assert report.reserved == [15] and not report.errors
    return sim, eng, initial


def test_reserved_group_bound_and_recorded(reserved):
    sim, eng, initial = reserved
    assert sim.driver("0000:04:00.0") == sim.driver("0000:04:00.1") == "vfio-pci"
    led = eng.ledger()
    claim = led.claim_for_group(15)
    assert claim.owner.kind == "reservation" and claim.reserved and claim.state == "active"
    assert led.reservations == ["0000:04:00.0"]
    assert claim.device("0000:04:00.1").original_driver == "e1000e"


def test_domain_borrows_and_gives_back_without_touching_sysfs(reserved):
    sim, eng, _ = reserved
    writes = len(sim.write_log)
    eng.prepare([A.parse("0000:04:00.1")], VM1)
    claim = eng.ledger().claim_for_group(15)
    assert claim.owner.name == "vm1" and claim.reserved and claim.requested == ["0000:04:00.1"]
    with pytest.raises(Refused, match="held by domain vm1"):
        eng.prepare([A.parse("0000:04:00.0")], VM2)
    eng.release(VM1)
    claim = eng.ledger().claim_for_group(15)
    assert claim.owner.kind == "reservation" and claim.state == "active"
    assert sim.driver("0000:04:00.0") == sim.driver("0000:04:00.1") == "vfio-pci"
    assert len(sim.write_log) == writes, "borrowing must not rebind anything"
    # original drivers are still known after the round trip
    assert claim.device("0000:04:00.0").original_driver == "e1000e"


def test_failed_borrow_returns_group_to_reservation(reserved):
    sim, eng, _ = reserved

    def boom(step):
        if step.startswith("activate"):
            raise RuntimeError("injected")

    eng.executor.on_step = boom
    with pytest.raises(HostdevError):
        eng.prepare([A.parse("0000:04:00.0")], VM1)
    claim = eng.ledger().claim_for_group(15)
    assert claim.owner.kind == "reservation" and claim.state == "active"
    assert sim.driver("0000:04:00.0") == "vfio-pci"


def test_unconfigured_reservation_goes_back_to_the_host(reserved):
    sim, eng, initial = reserved
    report = apply_reservations(eng, [])
    assert report.released == [15]
    assert sim.state() == initial and eng.ledger().claims == {}


def test_reapplying_is_idempotent(reserved):
    sim, eng, _ = reserved
    writes = len(sim.write_log)
    assert apply_reservations(eng, ["0000:04:00.0"]).reserved == []
    assert len(sim.write_log) == writes


def test_reservation_by_vendor_device_and_host_critical_refused(tmp_path):
    sim = load_sim("lab")
    eng = make_engine(sim, tmp_path)
    report = apply_reservations(eng, ["8086:100e", "0000:00:10.0"])  # both e1000s; the root disk
    assert report.reserved == [16]
    assert any("host-critical" in e for e in report.errors)
    assert sim.driver("0000:00:10.0") == "virtio-pci"


def test_daemon_start_binds_reservations_and_groups_shows_them(tmp_path):
    from hostdevd.core.sysfs import Sysfs
    from hostdevd.doors.cli import main

    from .daemon_support import running_daemon

    with running_daemon("lab", start=False) as (daemon, sim, sock):
        daemon.config.reserve = ["0000:01:00.0"]
        daemon.start()
        try:
            assert sim.driver("0000:01:00.0") == "vfio-pci"
            cfg = tmp_path / "c.toml"
            cfg.write_text(f'state_dir = "{daemon.engine.config.state_dir}"\n'
                           f'runtime_dir = "{tmp_path}"\n')
            lines = []
            main(["--config", str(cfg), "groups"], sysfs=Sysfs(sim), out=lines.append)
            row = next(line for line in "\n".join(lines).splitlines() if "0000:01:00.0" in line)
            assert "reserved" in row
        finally:
            daemon.stop(drain_timeout=2)
