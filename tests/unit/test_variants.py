"""R13 VFIO variant drivers: modules.alias decides (most specific vfio_pci: alias wins, the generic one
last, vfio-pci without the file), <driver model> and [vfio_drivers] override it, a host or unknown
driver is refused; the variant is loaded, bound through driver_override, counted as on vfio,
recorded in the ledger, shown by plan and groups, and the device goes back to its host driver."""
from __future__ import annotations

import json

import pytest

from hostdevd.core.address import PciAddress as A
from hostdevd.core.checks import run_checks
from hostdevd.core.config import parse_config
from hostdevd.core.domxml import parse_domain
from hostdevd.core.engine import DomainPrepare
from hostdevd.core.errors import ConfigError, Refused
from hostdevd.core.ledger import DeviceRecord, Ledger, Owner
from hostdevd.core.pci_events import PciEventHandler
from hostdevd.core.sysfs import RealHost, Sysfs
from hostdevd.core.topology import from_sysfs
from hostdevd.core.variants import VariantTable, VfioAlias, choose_driver, parse_vfio_aliases
from hostdevd.doors.cli import main
from hostdevd.sim.simkernel import SimKernel

from .conftest import TOPOLOGIES, load_sim, make_engine

VM1 = Owner(name="vm1", uuid="00000000-0000-0000-0000-000000000001")
VF = A.parse("0000:03:00.2")            # ConnectX-6 Dx VF 15b3:101e: mlx5_vfio_pci's alias
VIRTIO = A.parse("0000:00:12.0")        # virtio-net 1af4:1041: virtio_vfio_pci's alias
E1000E = A.parse("0000:01:00.0")        # only the generic alias matches
FN0, FN1 = A.parse("0000:05:00.0"), A.parse("0000:05:00.1")   # one group (20)
VF_MODALIAS = "pci:v000015B3d0000101Esv00000000sd00000000bc02sc00i00"

ALIAS_TEXT = """# Aliases extracted from modules themselves.
alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci
alias pci:v000015B3d0000101Esv*sd*bc*sc*i* mlx5_core
alias vfio_pci:v000015B3d*sv*sd*bc*sc*i* mellanox_any_vfio_pci
alias vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i* mlx5_vfio_pci
alias vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i* ../../evil
alias vfio_pci:v00001AF4d00001041sv*sd*bc*sc*i* virtio_vfio_pci
"""


@pytest.fixture
def sim() -> SimKernel:
    return load_sim("variants")


@pytest.fixture
def eng(sim, tmp_path):
    return make_engine(sim, tmp_path / "state")


def _xml(addr: A, driver: str = "") -> str:
    return (f"<domain><name>vm1</name><uuid>{VM1.uuid}</uuid><devices><hostdev mode='subsystem' type='pci' "
            f"managed='yes'>{driver}<source><address domain='0x0000' bus='0x{addr.bus:02x}' slot='0x{addr.slot:02x}' "
            f"function='0x{addr.function:x}'/></source></hostdev></devices></domain>")


def _prepare_xml(eng, xml: str):
    parsed = parse_domain(xml)
    return eng.prepare_domain(DomainPrepare(VM1, parsed.addresses(), parsed))


# --------------------------------------------------------------------------- the choice


def test_parse_keeps_vfio_pci_aliases_with_safe_module_names_only():
    aliases = parse_vfio_aliases(ALIAS_TEXT)
    assert [a.module for a in aliases] == ["vfio_pci", "mellanox_any_vfio_pci", "mlx5_vfio_pci", "virtio_vfio_pci"]


def test_most_specific_alias_wins_and_the_generic_one_comes_last():
    table = VariantTable("6.12", parse_vfio_aliases(ALIAS_TEXT), found=True)
    assert table.best(VF_MODALIAS) == "mlx5_vfio_pci"          # fewer wildcards than the vendor-wide one
    assert table.best(VF_MODALIAS.replace("101E", "1017")) == "mellanox_any_vfio_pci"
    assert table.best("pci:v00008086d000010D3sv00000000sd00000000bc02sc00i00") == "vfio_pci"
    # order in the file does not matter
    reordered = VariantTable("6.12", tuple(reversed(table.aliases)), found=True)
    assert reordered.best(VF_MODALIAS) == "mlx5_vfio_pci"
    # same number of wildcards: the longer literal part is the more specific
    a, b = VfioAlias("vfio_pci:v000015B3d*", "x_vfio_pci"), VfioAlias("vfio_pci:v000015B3d0000*", "y_vfio_pci")
    assert min((a, b), key=lambda x: x.specificity) is b


def test_choice_on_the_simulated_kernel(sim):
    topo = from_sysfs(Sysfs(sim))
    assert topo.variants is not None and topo.variants.found
    assert topo.variants.release == "6.12.38+deb13-amd64"
    picks = {a: choose_driver(topo.require(a), topo.variants) for a in (VF, VIRTIO, E1000E)}
    assert {a: (c.driver, c.source) for a, c in picks.items()} == {
        VF: ("mlx5_vfio_pci", "modules.alias"), VIRTIO: ("virtio_vfio_pci", "modules.alias"),
        E1000E: ("vfio-pci", "default")}


def test_no_modules_alias_means_vfio_pci():
    sim = SimKernel.from_file(TOPOLOGIES / "variants.json")
    sim.modules_alias = False
    topo = from_sysfs(Sysfs(sim))
    assert topo.variants is not None and not topo.variants.found
    assert choose_driver(topo.require(VF), topo.variants).driver == "vfio-pci"


def test_modules_alias_is_read_once_per_kernel_release(sim):
    reads = []
    real = sim.modules_read
    sim.modules_read = lambda rel: reads.append(rel) or real(rel)
    s = Sysfs(sim)
    s.vfio_variants()
    s.vfio_variants()
    assert reads == ["6.12.38+deb13-amd64/modules.alias"]
    sim.kernel_release = "6.13.0"           # another release (after a reboot): its own file
    assert s.vfio_variants().release == "6.13.0" and reads[1:] == ["6.13.0/modules.alias"]


def test_realhost_reads_modules_alias_under_its_modules_root(tmp_path):
    (tmp_path / "proc/sys/kernel").mkdir(parents=True)
    (tmp_path / "proc/sys/kernel/osrelease").write_text("6.12.38+deb13-amd64\n")
    (tmp_path / "lib/6.12.38+deb13-amd64").mkdir(parents=True)
    (tmp_path / "lib/6.12.38+deb13-amd64/modules.alias").write_text(ALIAS_TEXT)
    (tmp_path / "sys/bus/pci/drivers/vfio-pci").mkdir(parents=True)
    s = Sysfs(RealHost(str(tmp_path / "sys"), str(tmp_path / "proc"), str(tmp_path / "dev"),
                       str(tmp_path / "lib")))
    table = s.vfio_variants()
    assert table.found and table.best(VF_MODALIAS) == "mlx5_vfio_pci" and "vfio_pci" in table.loaded
    assert s.pci_driver_name("vfio_pci") == "vfio-pci" and s.pci_driver_name("mlx5_vfio_pci") is None


# --------------------------------------------------------------------------- overrides


def test_driver_model_overrides_modules_alias(eng, sim):
    _prepare_xml(eng, _xml(VF, "<driver name='vfio' model='vfio-pci'/>"))
    assert sim.driver(VF) == "vfio-pci"
    assert eng.ledger().claim_for_device(VF).device(VF).vfio_driver is None


def test_config_overrides_modules_alias_and_driver_model_wins_over_config(sim, tmp_path):
    eng = make_engine(sim, tmp_path / "s", '[vfio_drivers]\n"15b3:101e" = "vfio-pci"\n')
    plan = eng.plan_prepare([VF], VM1)
    bind = [s for s in plan.steps if s.action == "bind"]
    assert [s.driver for s in bind] == ["vfio-pci"] and bind[0].detail.endswith("-> vfio-pci ([vfio_drivers])")
    plan = eng.plan_prepare([VF], VM1, driver_models={VF: "mlx5_vfio_pci"})
    assert [s.driver for s in plan.steps if s.action == "bind"] == ["mlx5_vfio_pci"]
    # an address entry wins over a vendor:device one
    eng = make_engine(sim, tmp_path / "t", '[vfio_drivers]\n"15b3:101e" = "vfio-pci"\n'
                                           '"0000:03:00.2" = "mlx5-vfio-pci"\n')
    assert [s.driver for s in eng.plan_prepare([VF], VM1).steps if s.action == "bind"] == ["mlx5_vfio_pci"]


@pytest.mark.parametrize("model, needle", [
    ("mlx5_core", "is not a VFIO driver"),               # the device's own host driver
    ("e1000e", "is not a VFIO driver"),
    ("foo_vfio_pci", "is unknown to kernel 6.12.38+deb13-amd64"),
    ("../../vfio_pci", "is not a driver name"),
])
def test_bad_driver_model_is_refused_with_one_line_and_a_hint(eng, sim, model, needle):
    before = sim.state()
    with pytest.raises(Refused) as e:
        _prepare_xml(eng, _xml(VF, f"<driver model='{model}'/>"))
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and str(VF) in msg
    assert "name a vfio driver" in e.value.refusals[0]["hint"]
    assert sim.state() == before and eng.ledger().claims == {}


def test_bad_config_driver_is_refused_at_plan_and_bad_syntax_at_load(sim, tmp_path):
    eng = make_engine(sim, tmp_path / "s", '[vfio_drivers]\n"0000:03:00.2" = "mlx5_core"\n')
    plan = eng.plan_prepare([VF], VM1)
    assert not plan.ok and "([vfio_drivers]), which is not a VFIO driver" in plan.refusal_message()
    with pytest.raises(ConfigError, match=r"vfio_drivers.*not a driver name"):
        parse_config('[vfio_drivers]\n"0000:03:00.2" = "../x"\n')


# --------------------------------------------------------------------------- bind, viability, release


def test_variant_is_loaded_bound_recorded_and_released_back(sim, tmp_path):
    loaded = []
    eng = make_engine(sim, tmp_path / "s")
    eng.executor.modprobe = lambda m: (loaded.append(m), sim.load_module(m))
    before = sim.state()
    plan, _ = eng.prepare([VF], VM1)
    assert loaded == ["mlx5_vfio_pci"]
    assert sim.driver(VF) == "mlx5_vfio_pci" and sim.driver_override(VF) == "mlx5_vfio_pci"
    rec = eng.ledger().claim_for_device(VF).device(VF)
    assert rec.vfio_driver == "mlx5_vfio_pci" and rec.original_driver == "mlx5_core" and rec.bound_by_us
    dev = eng.topology().require(VF)
    assert dev.on_vfio and dev.viable_for_vfio and dev.has_vfio_dev
    sim.open_group(dev.group)                     # the kernel finds the group viable
    sim.close_group(dev.group)
    checks = {c.name: c.status for c in run_checks(eng.sysfs, eng.ledger())}
    assert checks["ledger"] == "ok" and "unclaimed-vfio" not in checks      # no drift, nothing unclaimed
    assert PciEventHandler(eng).check_device(VF) is None
    release = eng.plan_release(VM1)
    assert any(s.action == "restore" and s.detail.startswith("mlx5_vfio_pci -> mlx5_core") for s in release.steps)
    eng.release(VM1)
    assert sim.state() == before and eng.ledger().claims == {}


def test_virtio_variant_through_a_domain(eng, sim):
    done = _prepare_xml(eng, _xml(VIRTIO))
    assert sim.driver(VIRTIO) == "virtio_vfio_pci"
    bind = next(s for s in done.plan.steps if s.action == "bind")
    assert bind.driver == "virtio_vfio_pci" and bind.detail.endswith("-> virtio_vfio_pci (modules.alias)")
    eng.release(VM1)
    assert sim.driver(VIRTIO) == "virtio-pci" and sim.driver_override(VIRTIO) is None


def test_group_with_a_variant_member_is_viable_and_kept(eng, sim):
    s = eng.sysfs
    sim.load_module("mlx5_vfio_pci")
    for a, drv in ((FN0, "mlx5_vfio_pci"), (FN1, "vfio-pci")):
        s.set_driver_override(a, drv)
        s.unbind(a)
        s.drivers_probe(a)
    topo = eng.topology()
    assert all(topo.require(a).on_vfio and topo.require(a).viable_for_vfio for a in (FN0, FN1))
    sim.open_group(20)                            # the kernel agrees: every member is on a vfio driver
    sim.close_group(20)
    plan = eng.plan_prepare([FN0], VM1)
    assert plan.ok and plan.groups[0].keep == [FN0, FN1]
    eng.prepare([FN0], VM1)
    recs = {r.pci: r for r in eng.ledger().claim_for_group(20).devices}
    assert (recs[FN0].vfio_driver, recs[FN1].vfio_driver) == ("mlx5_vfio_pci", None)
    assert not recs[FN0].bound_by_us and recs[FN0].state == "vfio"
    checks = {c.name: c for c in run_checks(s, eng.ledger())}
    assert checks["ledger"].status == "ok" and "unclaimed-vfio" not in checks


def test_a_driver_with_a_dash_resolves_to_the_module_name(sim):
    s = Sysfs(sim)
    assert s.pci_driver_name("mlx5-vfio-pci") is None          # not loaded yet
    sim.load_module("mlx5-vfio-pci")
    assert s.pci_driver_name("mlx5-vfio-pci") == "mlx5_vfio_pci"
    assert s.pci_driver_name("vfio_pci") == "vfio-pci"
    assert s.pci_driver_name("../x") is None


# --------------------------------------------------------------------------- ledger


def test_ledger_record_reads_without_vfio_driver_and_round_trips_with_it():
    old = {"address": "0000:03:00.2", "role": "requested", "state": "vfio", "original_driver": "mlx5_core",
           "original_override": None, "bound_by_us": True}
    assert DeviceRecord.model_validate(old).vfio_driver is None
    rec = DeviceRecord.model_validate({**old, "vfio_driver": "mlx5_vfio_pci"})
    assert DeviceRecord.model_validate_json(rec.model_dump_json()).vfio_driver == "mlx5_vfio_pci"
    with pytest.raises(ValueError):
        DeviceRecord.model_validate({**old, "vfio_driver": "../x"})
    assert Ledger().claims == {}


# --------------------------------------------------------------------------- plan and groups


def _run(argv, sim):
    lines: list[str] = []
    rc = main(argv, sysfs=Sysfs(sim, 2.0), out=lines.append)
    return rc, "\n".join(lines)


def test_plan_shows_the_chosen_driver(state, sim):
    rc, out = _run(state + ["plan", "--device", str(VF)], sim)
    assert rc == 0 and "mlx5_core -> mlx5_vfio_pci (modules.alias)" in out
    rc, out = _run(state + ["plan", "--device", str(VF), "--json"], sim)
    assert [s["driver"] for s in json.loads(out)["steps"] if s["action"] == "bind"] == ["mlx5_vfio_pci"]


def test_plan_of_a_domain_xml_with_a_driver_model(state, sim, tmp_path):
    xml = tmp_path / "vm1.xml"
    xml.write_text(_xml(VF, "<driver model='mlx5_core'/>"))
    rc, out = _run(state + ["plan", str(xml)], sim)
    assert rc == 1 and "asks for driver 'mlx5_core' (<driver model>), which is not a VFIO driver" in out


def test_groups_shows_the_chosen_driver(state, sim):
    rc, out = _run(state + ["groups"], sim)
    line = next(ln for ln in out.splitlines() if str(VF) in ln)
    assert rc == 0 and "vfio: mlx5_vfio_pci (modules.alias)" in line
    assert "vfio:" not in next(ln for ln in out.splitlines() if str(E1000E) in ln)
    rc, out = _run(state + ["groups", "--json"], sim)
    devs = {d["address"]: d for g in json.loads(out)["groups"] for d in g["devices"]}
    assert (devs[str(VF)]["vfio_driver"], devs[str(VF)]["vfio_driver_from"]) == ("mlx5_vfio_pci", "modules.alias")
    assert devs[str(E1000E)]["vfio_driver"] == "vfio-pci"
