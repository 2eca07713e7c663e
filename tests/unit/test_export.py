"""hostdevctl export nova|kubevirt on every topology: the output parses as each project documents
it, offers no host-critical device, and leaves out with a reason every function whose IOMMU group
cannot be handed over whole; then one test per rule (core/export.py)."""
from __future__ import annotations

import json
import re

import pytest

from hostdevd.core.export import FALLBACK_DOMAIN, alias_name, offer, resource_name
from hostdevd.core.ledger import Ledger
from hostdevd.core.sysfs import Sysfs
from hostdevd.core.topology import from_sysfs
from hostdevd.sim.simkernel import SimKernel

from .conftest import TOPOLOGIES, load_sim
from .test_cli import GTX, run

try:                                   # not a dependency: a cross-check where PyYAML happens to be there
    import yaml
except ImportError:                    # pragma: no cover
    yaml = None

ALL = sorted(p.stem for p in TOPOLOGIES.glob("*.json"))
SPEC_KEYS = {"vendor_id", "product_id", "address"}
ALIAS_KEYS = {"name", "vendor_id", "product_id", "device_type"}
LEFT_OUT = re.compile(r"^# left out: (\S+) \(([0-9a-f]{4}:[0-9a-f]{4})\): (.+)$")


def with_config(tmp_path, text: str) -> list[str]:
    cfg = tmp_path / "policy.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path / "run"}"\n{text}\n')
    return ["--config", str(cfg)]


def sim_for(name: str) -> SimKernel:
    sim = load_sim(name)
    if name == "sriov_pf":                     # VFs (type-VF) next to their PF (type-PF)
        sim.write("bus/pci/devices/0000:03:00.0/sriov_numvfs", "2")
    return sim


# ----- parsing what was printed, as Nova and KubeVirt would ------------------------------------
def parse_nova(text: str) -> tuple[list[dict], list[dict], dict[str, str]]:
    """oslo.config's view: comments, one [pci] section, multi-valued keys of one JSON dict each."""
    specs, aliases, left = [], [], {}
    section = None
    for line in text.splitlines():
        if m := LEFT_OUT.match(line):
            left[m[1]] = m[3]
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("["):
            assert line == "[pci]" and section is None, line
            section = line
            continue
        assert section == "[pci]", line
        key, _, value = line.partition(" = ")
        entry = json.loads(value)
        assert isinstance(entry, dict)
        if key == "device_spec":
            assert set(entry) == SPEC_KEYS, entry
            specs.append(entry)
        else:
            assert key == "alias" and set(entry) == ALIAS_KEYS, line
            assert entry["device_type"] in ("type-PCI", "type-PF", "type-VF")
            assert ":" not in entry["name"]                    # flavors say alias=NAME:COUNT
            aliases.append(entry)
    assert section == "[pci]"
    return specs, aliases, left


_KV_ITEM = re.compile(r'^  - pciVendorSelector: "([0-9A-F]{4}:[0-9A-F]{4})"$')
_KV_NAME = re.compile(r'^    resourceName: "([a-z0-9.-]+/[A-Za-z0-9][A-Za-z0-9._-]{0,61}[A-Za-z0-9]?)"$')


def parse_kubevirt(text: str) -> tuple[list[dict], dict[str, str]]:
    """The one shape the export prints, line by line (and PyYAML's reading of it where installed)."""
    entries: list[dict] = []
    left = {m[1]: m[3] for line in text.splitlines() if (m := LEFT_OUT.match(line))}
    body = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert body[0] == "permittedHostDevices:", body
    if body[1:] == ["  pciHostDevices: []"]:
        return entries, left
    assert body[1] == "  pciHostDevices:"
    rest = body[2:]
    assert len(rest) % 3 == 0, rest
    for i in range(0, len(rest), 3):
        sel, name = _KV_ITEM.match(rest[i]), _KV_NAME.match(rest[i + 1])
        assert sel and name and rest[i + 2] == "    externalResourceProvider: false", rest[i:i + 3]
        entries.append({"pciVendorSelector": sel[1], "resourceName": name[1], "externalResourceProvider": False})
    if yaml is not None:
        assert yaml.safe_load(text) == {"permittedHostDevices": {"pciHostDevices": entries}}
    return entries, left


def export(state, sim, target, *extra) -> tuple[int, str]:
    return run([*state, "export", target, *extra], sim)


def facts(state, sim) -> dict[str, dict]:
    rc, out = run([*state, "groups", "--json"], sim)
    inv = json.loads(out)
    return {d["address"]: d for d in [d for g in inv["groups"] for d in g["devices"]] + inv["ungrouped"]}


# ----- every topology ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_nova_parses_offers_no_critical_device_and_says_why(state, name):
    sim = sim_for(name)
    devs = facts(state, sim)
    rc, out = export(state, sim, "nova")
    specs, aliases, left = parse_nova(out)
    assert rc == (0 if name != "no_iommu" else 1)
    offered = {s["address"] for s in specs}
    assert not offered & {a for a, d in devs.items() if d["host_critical"]}
    assert {(a["vendor_id"], a["product_id"]) for a in aliases} == {(s["vendor_id"], s["product_id"]) for s in specs}
    assert len({a["name"] for a in aliases}) == len(aliases)
    for a, d in devs.items():
        if d["bridge"]:
            assert a not in offered and a not in left
            continue
        assert (a in offered) != (a in left), a             # every endpoint: offered, or left out with why
        if a in offered:
            spec = next(s for s in specs if s["address"] == a)
            assert (spec["vendor_id"], spec["product_id"]) == (d["vendor"], d["device"])
        endpoints = [x for x in devs.values() if x["group"] == d["group"] and not x["bridge"]]
        if d["group"] is None or not d["group_assignable"] or len(endpoints) > 1:
            assert a in left and left[a], a                 # not whole: left out with a reason


@pytest.mark.parametrize("name", ALL)
def test_kubevirt_parses_and_permits_no_id_of_a_critical_or_split_device(state, name):
    sim = sim_for(name)
    devs = facts(state, sim)
    rc, out = export(state, sim, "kubevirt")
    entries, left = parse_kubevirt(out)
    assert rc == (0 if name != "no_iommu" else 1)
    permitted = {e["pciVendorSelector"].lower() for e in entries}
    for a, d in devs.items():
        if d["bridge"]:
            continue
        vd = f"{d['vendor']}:{d['device']}"
        if d["host_critical"] or a in left:                # a selector would take this one too
            assert vd not in permitted, (a, vd)
    assert len({e["resourceName"] for e in entries}) == len(entries)


@pytest.mark.parametrize("target", ["nova", "kubevirt"])
def test_json_output_matches_the_text(state, target):
    sim = sim_for("sriov_pf")
    rc, text = export(state, sim, target)
    rc2, out = export(state, sim, target, "--json")
    data = json.loads(out)
    assert rc == rc2 == 0 and data["target"] == target and data["source"] == "sysfs"
    left = {lo["address"]: lo["reason"] for lo in data["left_out"]}
    if target == "nova":
        specs, aliases, left_text = parse_nova(text)
        assert (data["device_spec"], data["alias"]) == (specs, aliases)
    else:
        entries, left_text = parse_kubevirt(text)
        assert data["pciHostDevices"] == entries
    assert left == left_text


# ----- one test per rule ------------------------------------------------------------------------
def test_host_critical_never_even_when_policy_allows_it(tmp_path):
    sim = load_sim("desktop_gpu")
    argv = with_config(tmp_path, '[policy]\nallow_host_critical = ["0000:00:02.0", "0000:02:00.0"]')
    rc, out = export(argv, sim, "nova")
    specs, _, left = parse_nova(out)
    assert rc == 0 and {s["address"] for s in specs}.isdisjoint({"0000:00:02.0", "0000:02:00.0"})
    assert left["0000:00:02.0"] == "host-critical: boot VGA (the host console)"
    assert left["0000:02:00.0"].startswith("host-critical: controller of a mounted filesystem")
    rc, out = export(argv, sim, "kubevirt")
    entries, _ = parse_kubevirt(out)
    assert not {e["pciVendorSelector"] for e in entries} & {"8086:3E92", "144D:A808"}


def test_a_host_critical_sibling_keeps_the_group_out(state):
    # chipset_group: the Realtek NIC shares group 7 with the SATA controller of the root fs
    _, out = export(state, load_sim("chipset_group"), "nova")
    _, _, left = parse_nova(out)
    assert "cannot go whole" in left["0000:02:00.0"] and "host-critical" in left["0000:02:00.0"]


def test_bridges_stay_bridge_class_devices_and_their_groups_too(state):
    _, out = export(state, load_sim("lab"), "nova")
    specs, _, left = parse_nova(out)
    assert "# groups of PCI bridges only, which stay with the host: 1, 2, 3, 4, 5, 6, 17" in out.splitlines()
    assert left["0000:00:00.0"].startswith("is a bridge-class device (class 0600)")        # the host bridge
    assert left["0000:00:1f.0"].startswith("is a bridge-class device (class 0601)")        # LPC
    assert "also holds 0000:00:1f.0, a bridge-class device" in left["0000:00:1f.2"]        # AHCI beside it
    assert "0000:05:00.0" not in out                                                      # the PCIe-PCI bridge


def test_several_kinds_in_one_group_are_left_out(state):
    _, out = export(state, load_sim("desktop_gpu"), "nova")
    specs, _, left = parse_nova(out)
    for a in ("0000:01:00.0", "0000:01:00.1"):        # GPU and its HDMI audio, behind the root port
        assert "holds 2 functions of 2 kinds (10de:10f0, 10de:1b80)" in left[a]
    assert not {s["address"] for s in specs} & {"0000:01:00.0", "0000:01:00.1"}


def test_several_functions_of_one_kind_are_left_out(state):
    _, out = export(state, load_sim("dual_port_nic"), "nova")
    specs, _, left = parse_nova(out)
    assert "holds 2 functions (0000:01:00.0, 0000:01:00.1)" in left["0000:01:00.1"]
    assert specs == []


def test_device_types_and_aliases_for_sriov(state):
    _, out = export(state, sim_for("sriov_pf"), "nova")
    specs, aliases, _ = parse_nova(out)
    assert [s["address"] for s in specs] == ["0000:03:00.0", "0000:03:10.0", "0000:03:10.4"]
    assert aliases == [
        {"name": "8086-1521-pf", "vendor_id": "8086", "product_id": "1521", "device_type": "type-PF"},
        {"name": "8086-1520-vf", "vendor_id": "8086", "product_id": "1520", "device_type": "type-VF"}]


def test_a_pf_without_vfs_is_still_type_pf(state):
    """Nova: type-PF must be given to pass a SR-IOV capable device whole."""
    _, out = export(state, load_sim("sriov_pf"), "nova")
    _, aliases, _ = parse_nova(out)
    assert [a["device_type"] for a in aliases] == ["type-PF"]


def test_kubevirt_keeps_out_an_id_another_function_of_which_is_left_out(state):
    # lab: 8086:10d3 is alone in groups 12, 18, 19 but shares group 15 with its sibling
    _, out = export(state, load_sim("lab"), "kubevirt")
    entries, left = parse_kubevirt(out)
    assert "8086:10D3" not in {e["pciVendorSelector"] for e in entries} and "0000:04:00.0" in left
    assert any(line.startswith("# 8086:10D3 not permitted: the selector would take every 8086:10d3")
               for line in out.splitlines())
    _, nova_out = export(state, load_sim("lab"), "nova")
    assert {"0000:01:00.0", "0000:09:00.0", "0000:0a:00.0"} <= {s["address"] for s in parse_nova(nova_out)[0]}


def test_kubevirt_resource_names(state):
    _, out = export(state, load_sim("variants"), "kubevirt")
    entries, _ = parse_kubevirt(out)
    assert {"pciVendorSelector": "15B3:101D", "resourceName": "nvidia.com/MT2892_Family_ConnectX-6_Dx",
            "externalResourceProvider": False} in entries
    _, out = export(state, load_sim("variants"), "kubevirt", "--resource-domain", "gpu.example.org")
    assert all(e["resourceName"].startswith("gpu.example.org/") for e in parse_kubevirt(out)[0])
    assert resource_name("1b21", "1242", None) == f"{FALLBACK_DOMAIN}/1b21_1242"
    assert resource_name("1b21", "1242", "ASM1142 USB 3.1 Host Controller") == \
        f"{FALLBACK_DOMAIN}/1b21_ASM1142_USB_3.1_Host_Controller"
    assert resource_name("10de", "1b80", "GP104 [GeForce GTX 1080]") == "nvidia.com/GP104_GeForce_GTX_1080"
    assert len(resource_name("8086", "0001", "x" * 200).split("/")[1]) == 63


def test_bad_resource_domain_is_a_usage_error(state):
    rc, _ = export(state, load_sim("lab"), "kubevirt", "--resource-domain", "Not A Domain")
    assert rc == 2


def test_kubevirt_notes_a_variant_driver(state):
    """KubeVirt's device plugin lists functions on vfio-pci only; hostdevd would use mlx5_vfio_pci."""
    spec = json.loads((TOPOLOGIES / "variants.json").read_text())
    spec["devices"] = [d for d in spec["devices"] if d["address"] != "0000:05:00.1"]   # 05:00.0 alone
    _, out = export(state, SimKernel.from_spec(spec), "kubevirt")
    entries, _ = parse_kubevirt(out)
    assert "15B3:101E" in {e["pciVendorSelector"] for e in entries}
    assert "# note: hostdevd binds 0000:03:00.2 to mlx5_vfio_pci (modules.alias); KubeVirt takes only " \
           "functions on vfio-pci: name vfio-pci for 15b3:101e under [vfio_drivers]" in out.splitlines()


def test_a_held_group_is_offered_with_a_note(state):
    sim = load_sim("lab")
    assert run([*state, "prepare", "--device", "0000:01:00.0", "--owner", "web1"], sim)[0] == 0
    _, out = export(state, sim, "nova")
    assert "0000:01:00.0" in {s["address"] for s in parse_nova(out)[0]}
    assert "# 0000:01:00.0 is held by web1 now: an instance given it is refused until that lets go" in out


def test_no_iommu_offers_nothing(state):
    rc, out = export(state, load_sim("no_iommu"), "nova")
    specs, aliases, left = parse_nova(out)
    assert rc == 1 and specs == aliases == []
    assert left["0000:00:19.0"].startswith("host-critical")
    assert left["0000:01:00.1"] == "has no IOMMU group: the IOMMU is off or absent"
    rc, out = export(state, load_sim("no_iommu"), "kubevirt")
    assert rc == 1 and parse_kubevirt(out)[0] == [] and "  pciHostDevices: []" in out


def test_a_listing_exports_too():
    rc, out = run(["export", "nova", "--listing", GTX])
    specs, _, left = parse_nova(out)
    assert rc == 0 and "0000:01:00.0" in left and "kinds" in left["0000:01:00.0"]


def test_core_offer_is_pure_and_alias_names_are_stable():
    topo = from_sysfs(Sysfs(load_sim("lab")))
    first, again = offer(topo, Ledger()), offer(topo, Ledger())
    assert first == again and [alias_name(o) for o in first.offered][:1] == ["8086-10d3"]
