"""`hostdevctl groups --json` is the versioned inventory: every topology's output conforms to the
checked-in schemas/inventory.schema.json, keeps the hostdevd-topology/1 keys, and reports the
facts the simulated kernel and its pci.ids give; the pci.ids lookup and the sysfs reads alone."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from hostdevd.core.address import PciAddress as A
from hostdevd.core.errors import ConfigError
from hostdevd.core.inventory import INVENTORY_SCHEMA, Inventory
from hostdevd.core.pciids import PciIds
from hostdevd.core.sysfs import RealHost, Sysfs
from hostdevd.core.sysfs_inventory import link_speed_gts
from hostdevd.core.topology import from_sysfs
from hostdevd.sim.simkernel import SimKernel

from .conftest import TOPOLOGIES, load_sim, make_engine
from .schema_check import errors
from .test_cli import GTX, run

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "schemas" / "inventory.schema.json").read_text(encoding="utf-8"))
ALL = sorted(p.stem for p in TOPOLOGIES.glob("*.json"))


def inventory(state, sim, *extra) -> dict:
    rc, out = run([*state, "groups", "--json", *extra], sim)
    assert rc in (0, 1), out
    return json.loads(out)


def devices(inv: dict) -> dict[str, dict]:
    return {d["address"]: d for d in [d for g in inv["groups"] for d in g["devices"]] + inv["ungrouped"]}


@pytest.mark.parametrize("name", ALL)
def test_every_topology_conforms_to_the_checked_in_schema(state, name):
    sim = load_sim(name)
    if name in ("sriov_pf", "lab"):             # VFs too: physfn, inherited NUMA node
        pf = "0000:03:00.0"
        sim.write(f"bus/pci/devices/{pf}/sriov_numvfs", "2")
    inv = inventory(state, sim)
    assert errors(inv, SCHEMA) == []
    Inventory.model_validate(inv)
    assert inv["schema"] == INVENTORY_SCHEMA and list(inv)[0] == "schema"


@pytest.mark.parametrize("name", ALL)
def test_topology_keys_are_kept_with_their_meaning(state, name):
    """Only added: every hostdevd-topology/1 key, the owner and the vfio driver as before."""
    sim = load_sim(name)
    topo = from_sysfs(Sysfs(sim))
    before = topo.to_json()
    inv = inventory(state, sim)
    for key in set(before) - {"groups", "ungrouped"}:
        assert inv[key] == before[key], key
    assert [g["group"] for g in inv["groups"]] == [g["group"] for g in before["groups"]]
    old = {d["address"]: d for d in [d for g in before["groups"] for d in g["devices"]] + before["ungrouped"]}
    new = devices(inv)
    assert list(new) == list(old)
    for addr, d in old.items():
        assert {k: new[addr][k] for k in d} == d
        dev = topo.devices[A.parse(addr)]
        if not dev.bridge and dev.group is not None:      # what lab tests read, as before
            assert new[addr]["vfio_driver"] and new[addr]["vfio_driver_from"] and "owner" in new[addr]


def test_listing_and_snapshot_inventories_conform(state, tmp_path):
    rc, out = run(["groups", "--listing", GTX, "--json"])
    inv = json.loads(out)
    assert rc == 0 and errors(inv, SCHEMA) == [] and inv["source"] == "listing"
    gpu = devices(inv)["0000:01:00.0"]
    assert gpu["name"].startswith("NVIDIA") and gpu["vendor_name"] is None and gpu["numa_node"] is None
    snap = tmp_path / "snap.json"
    run([*state, "groups", "--json", "--save", str(snap)], load_sim("lab"))
    rc, out = run(["groups", "--snapshot", str(snap), "--json"])
    again = json.loads(out)
    assert rc == 0 and errors(again, SCHEMA) == [] and again["source"] == "snapshot"
    assert [g["group"] for g in again["groups"]] == [g["group"] for g in json.loads(snap.read_text())["groups"]]


def test_sim_facts_and_names(state):
    sim = load_sim("lab")
    sim.write("bus/pci/devices/0000:03:00.0/sriov_numvfs", "1")
    d = devices(inventory(state, sim))
    nic = d["0000:01:00.0"]
    assert (nic["vendor_name"], nic["device_name"]) == ("Intel Corporation", "82574L Gigabit Network Connection")
    assert nic["numa_node"] == 0 and nic["power_state"] == "D0"
    assert nic["pcie_link"] == {"current_speed_gts": 2.5, "current_width": 1, "max_speed_gts": 2.5, "max_width": 1}
    assert (nic["subsystem_vendor"], nic["subsystem_device"]) == ("0000", "0000")
    assert d["0000:04:00.1"]["power_state"] == "D3hot" and d["0000:04:00.1"]["pcie_link"] is None
    assert d["0000:00:12.0"]["numa_node"] is None              # the kernel's -1
    assert d["0000:00:02.0"]["pcie_link"]["max_width"] == 32   # a root port has a link too
    vf = d["0000:03:00.1"]
    assert vf["physfn"] == "0000:03:00.0" and d["0000:03:00.0"]["virtfns"] == ["0000:03:00.1"]
    assert vf["numa_node"] == 0 and vf["device_name"] == "QEMU NVM Express Controller"
    assert d["0000:00:1f.3"]["device_name"] == "82801I (ICH9 Family) SMBus Controller"


def test_groups_host_critical_owner_and_reserved(state, tmp_path):
    sim = load_sim("lab")
    inv = inventory(state, sim)
    groups = {g["group"]: g for g in inv["groups"]}
    assert groups[12]["assignable"] and groups[12]["refusals"] == [] and groups[15]["assignable"]
    assert not groups[7]["assignable"] and "host-critical" in groups[7]["refusals"][0]["reason"]
    assert not groups[1]["assignable"] and "only PCI bridges" in groups[1]["refusals"][0]["reason"]
    disk = devices(inv)["0000:00:10.0"]
    assert disk["host_critical"] and disk["host_critical_reason"].startswith("controller of a mounted filesystem")
    assert disk["group"] == 7 and disk["group_assignable"] is False
    rc, _ = run([*state, "prepare", "--device", "0000:04:00.0", "--owner", "web1"], sim)
    assert rc == 0
    make_engine(sim, tmp_path / "state", 'reserve = ["0000:01:00.0"]').apply_reservations()
    d = devices(inventory(state, sim))
    assert d["0000:04:00.1"]["owner"] == "web1" and not d["0000:04:00.1"]["reserved"]
    assert d["0000:01:00.0"]["reserved"] and d["0000:01:00.0"]["owner"] == "reserved"
    assert errors(inventory(state, sim), SCHEMA) == []


def test_no_iommu_devices_are_ungrouped_and_not_assignable(state):
    inv = inventory(state, load_sim("no_iommu"))
    assert inv["groups"] == [] and errors(inv, SCHEMA) == []
    assert all(d["group"] is None and d["group_assignable"] is False and d["owner"] is None
               for d in inv["ungrouped"])


def test_schema_check_catches_a_drifting_output(state):
    inv = inventory(state, load_sim("lab"))
    inv["groups"][0]["devices"][0]["surprise"] = 1
    inv["groups"][0]["devices"][0]["numa_node"] = -1
    del inv["ungrouped"]
    found = errors(inv, SCHEMA)
    assert any("surprise" in e for e in found) and any("numa_node" in e for e in found)
    assert any("missing 'ungrouped'" in e for e in found)


# ----- pci.ids --------------------------------------------------------------------------------
PCI_IDS = """#\tList of PCI ID's
# Version: 2025.01.01
0001  SafeNet (wrong ID)
8086  Intel Corporation
\t0007  82379AB
# a comment inside the vendor's block
\t10d3  82574L Gigabit Network Connection
\t\t8086 a01f  Gigabit CT Desktop Adapter
\t\t10d3 0000  not a device line
\t1521  I350 Gigabit Network Connection
8087  Intel Corporation (second id)
\t10d4  not Intel's 10d4

C 02  Network controller
\t00  Ethernet controller
"""


def test_pci_ids_lookup():
    ids = PciIds(PCI_IDS)
    assert ids.names("8086", "10d3") == ("Intel Corporation", "82574L Gigabit Network Connection")
    assert ids.names("8086", "1521") == ("Intel Corporation", "I350 Gigabit Network Connection")
    assert ids.names("8086", "0000") == ("Intel Corporation", None)      # a subsystem line is no device
    assert ids.names("8086", "10d4") == ("Intel Corporation", None)      # the next vendor's block
    assert ids.names("8087", "10d4") == ("Intel Corporation (second id)", "not Intel's 10d4")
    assert ids.names("10DE", "1B80") == (None, None) and ids.names("C 02", "00") == (None, None)
    assert ids.names("8086", ".*") == (None, None) and PciIds("").names("8086", "10d3") == (None, None)


def test_pci_ids_from_the_hosts_share_dir(tmp_path):
    """Debian's /usr/share/misc first, Fedora's /usr/share/hwdata next, none: no names."""
    share = tmp_path / "share"
    (share / "hwdata").mkdir(parents=True)
    (share / "hwdata" / "pci.ids").write_text(PCI_IDS)
    host = RealHost(str(tmp_path / "sys"), str(tmp_path / "proc"), str(tmp_path / "dev"), str(tmp_path / "mod"),
                    str(share))
    assert Sysfs(host).pci_ids().names("8086", "1521")[1] == "I350 Gigabit Network Connection"
    (share / "misc").mkdir()
    (share / "misc" / "pci.ids").write_text("8086  Intel (misc)\n")
    assert Sysfs(host).pci_ids().names("8086", "1521") == ("Intel (misc)", None)
    empty = RealHost(str(tmp_path / "sys"), share_root=str(tmp_path / "nothing"))
    assert Sysfs(empty).pci_ids().names("8086", "1521") == (None, None)


def test_pci_ids_read_once():
    sim = load_sim("lab")
    reads = []
    real = sim.share_read
    sim.share_read = lambda rel: reads.append(rel) or real(rel)
    s = Sysfs(sim)
    for a in ("0000:01:00.0", "0000:02:00.0", "0000:04:00.0"):
        s.device_facts(A.parse(a), "8086", "10d3")
    assert reads == ["misc/pci.ids"]


# ----- the sysfs reads ------------------------------------------------------------------------
@pytest.mark.parametrize("text,gts", [("8.0 GT/s PCIe", 8.0), ("2.5 GT/s PCIe", 2.5), ("16 GT/s", 16.0),
                                      ("Unknown", None), ("", None), (None, None), ("8.0 GB/s", None)])
def test_link_speed(text, gts):
    assert link_speed_gts(text) == gts


def test_an_unreadable_attribute_is_unknown_not_an_error():
    sim = load_sim("lab")
    real_read = sim.read

    def read(rel: str) -> str:
        if rel.endswith("0000:01:00.0/current_link_speed"):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_read(rel)
    sim.read = read
    f = Sysfs(sim).device_facts(A.parse("0000:01:00.0"), "8086", "10d3")
    assert f.pcie_link is not None and f.pcie_link.current_speed_gts is None and f.pcie_link.max_width == 1
    assert f.numa_node == 0


@pytest.mark.parametrize("extra,msg", [
    ({"numa_node": -2}, "numa_node"), ({"power_state": "D4"}, "power_state"),
    ({"pcie_link": {"speed": 3.0}}, "GT/s"), ({"pcie_link": {"width": 3}}, "lanes"),
    ({"pcie_link": {"lanes": 4}}, "unknown key"),
])
def test_sim_spec_checks_the_new_keys(extra, msg):
    spec = {"devices": [{"address": "0000:01:00.0", "vendor": "8086", "device": "10d3", "class": "020000",
                         "group": 1, **extra}]}
    with pytest.raises(ConfigError, match=msg):
        SimKernel.from_spec(spec)


def test_sim_pci_ids_spec_is_checked():
    with pytest.raises(ConfigError, match="pci_ids"):
        SimKernel.from_spec({"pci_ids": {"80x6": {"name": "x", "devices": {}}}})
