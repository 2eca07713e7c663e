"""Operations against the real kernel and libvirt (issue 14), on the Debian 13 L1 where hostdevd
runs from its package as operators run it: Prometheus metrics scraped over HTTP around a domain
start and stop (and the same families in a node_exporter textfile), the live inventory validated
against schemas/inventory.schema.json, and the Nova and KubeVirt exports of the lab's devices.
"""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from labops import CONF, HCTL, PKG_CONF, SYS, drivers, wait_active, wait_drivers, wait_no_claims
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.lab, pytest.mark.lab_trixie, pytest.mark.trixie_only]

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
URL = "http://127.0.0.1:9477/metrics"
DROPIN = "/etc/systemd/system/hostdevd.service.d/metrics.conf"


def scrape(lab) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    text = lab.run(["python3", "-c", f"import urllib.request; print(urllib.request.urlopen({URL!r}, timeout=30)"
                                     ".read().decode())"], timeout=90).stdout
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def metrics(lab):
    """The package's daemon with [metrics] listen on loopback (and the drop-in the README names)."""
    topo = lab.topology()
    lab.run(f"test -e {PKG_CONF} || cp -p {CONF} {PKG_CONF}; "
            # the package's config has a [metrics] table with listen = "" (off): set it there
            f"sed -i 's/^listen = \"\"/listen = \"127.0.0.1:9477\"/' {CONF} && grep -q '^listen = \"127' {CONF} && "
            f"mkdir -p {Path(DROPIN).parent} && printf '[Service]\\nRestrictAddressFamilies=AF_UNIX AF_NETLINK "
            f"AF_INET AF_INET6\\n' > {DROPIN} && systemctl daemon-reload && systemctl restart hostdevd", timeout=180)
    wait_active(lab)
    lab.labsh(f"mkdom ops1 {topo['nic2a']} && virsh -q define /root/ops1.xml && "
              f"mkdom ops2 {topo['nic2b']} && virsh -q define /root/ops2.xml", timeout=120)
    yield topo
    lab.run("virsh -q destroy ops1; virsh -q destroy ops2; virsh -q undefine ops1; virsh -q undefine ops2",
            timeout=120, check=False)
    lab.run(f"rm -f {DROPIN}; cp -p {PKG_CONF} {CONF}; systemctl daemon-reload; systemctl restart hostdevd",
            timeout=180, check=False)


def test_metrics_move_with_a_domain_start_a_refusal_and_a_stop(lab, metrics):
    a, b = metrics["nic2a"], metrics["nic2b"]
    group = str(lab.pci_info(a)["iommu_group"])
    before = scrape(lab)
    assert value(before, "hostdevd_daemon_running") == 1 and value(before, "hostdevd_libvirt_connected") == 1
    assert value(before, "hostdevd_group_owner", group=group, owner="ops1", owner_kind="domain") == 0
    lab.run("virsh start --paused ops1", timeout=300)
    r = lab.run("virsh start --paused ops2", timeout=300, check=False)          # the same group: refused
    assert r.rc != 0 and "ops1" in r.stderr, r
    during = scrape(lab)
    moved = {k: during.get(k, 0.0) - before.get(k, 0.0) for k in set(during) | set(before)}
    print("metrics that moved at the start:\n" + "\n".join(f"  {k[0]}{dict(k[1])} {v:+g}" for k, v in
                                                           sorted(moved.items()) if v and "_bucket" not in k[0]))
    assert value(during, "hostdevd_operations_total", operation="prepare", result="ok") >= \
        value(before, "hostdevd_operations_total", operation="prepare", result="ok") + 1
    assert value(during, "hostdevd_operations_total", operation="bind", result="ok") >= \
        value(before, "hostdevd_operations_total", operation="bind", result="ok") + 2
    assert value(during, "hostdevd_devices", driver_kind="vfio") == value(before, "hostdevd_devices",
                                                                          driver_kind="vfio") + 2
    assert value(during, "hostdevd_group_owner", group=group, owner="ops1", owner_kind="domain") == 1
    assert sum(v for (n, _), v in moved.items() if n == "hostdevd_refusals_total") >= 1, moved
    assert sum(v for (n, lb), v in moved.items()
               if n == "hostdevd_hook_request_duration_seconds_count" and ("op", "prepare") in lb) >= 2
    # the same families for node_exporter's textfile collector
    lab.run(f"rm -rf /root/tf && mkdir /root/tf && {HCTL} metrics --textfile /root/tf", timeout=120)
    tf = lab.run("cat /root/tf/hostdevd.prom", timeout=30).stdout
    names = {f.name for f in text_string_to_metric_families(tf)}
    assert {"hostdevd_devices", "hostdevd_claims", "hostdevd_group_owner", "hostdevd_build_info"} <= names

    lab.run("virsh destroy ops1", timeout=120)
    assert wait_drivers(lab, {a: "e1000e", b: "e1000e"}) == {a: "e1000e", b: "e1000e"}
    assert wait_no_claims(lab) == {}
    after = scrape(lab)
    assert value(after, "hostdevd_operations_total", operation="release", result="ok") >= \
        value(during, "hostdevd_operations_total", operation="release", result="ok") + 1
    assert value(after, "hostdevd_devices", driver_kind="vfio") == value(before, "hostdevd_devices",
                                                                         driver_kind="vfio")
    assert value(after, "hostdevd_group_owner", group=group, owner="ops1", owner_kind="domain") == 0
    assert value(after, "hostdevd_drift_devices") == 0
    # label values stay bounded: no free text
    assert all(len(v) <= 64 for (_n, lb) in after for _k, v in lb), "an unbounded label value"


def test_live_inventory_follows_its_schema(lab, metrics):
    inv = json.loads(lab.run([HCTL, "groups", "--json"], timeout=120).stdout)
    jsonschema.validate(inv, json.loads((SCHEMAS / "inventory.schema.json").read_text()))
    assert inv["schema"] == "hostdevd-inventory/1"
    devs = {d["address"]: d for g in inv["groups"] for d in g["devices"]}
    nic = devs[metrics["nic1"]]
    print(json.dumps(nic, indent=1))
    assert nic["vendor"] == "8086" and nic["driver"] == "e1000e" and nic["vfio_driver"] == "vfio-pci"
    assert drivers(lab, metrics["nic1"]) == {metrics["nic1"]: "e1000e"}


def test_exports_for_nova_and_kubevirt_list_the_assignable_devices(lab, metrics):
    nova = lab.run([HCTL, "export", "nova"], timeout=120).stdout
    kube = lab.run([HCTL, "export", "kubevirt"], timeout=120).stdout
    print(nova + "\n" + kube)
    assert "[pci]" in nova and "device_spec" in nova and '"address": "' + metrics["nic1"] + '"' in nova
    assert "permittedHostDevices" in kube and "pciVendorSelector" in kube and "8086:10D3" in kube
    # the root disk's controller and the default-route NIC are never offered, and each says why
    crit = {d["address"] for g in json.loads(lab.run([HCTL, "groups", "--json"], timeout=120).stdout)["groups"]
            for d in g["devices"] if d.get("host_critical")}
    offered = "\n".join(line for line in (nova + kube).splitlines() if not line.lstrip().startswith("#"))
    assert crit and not [c for c in crit if c in offered], crit          # only in "# left out" comments
    assert all(f"# left out: {c}" in nova for c in crit), nova


def test_a_process_holding_the_device_refuses_the_start_naming_it(lab, metrics):
    """Pre-flight (issue 14.4): a process with the NIC's sysfs config open; libvirt's start is refused
    naming it, with the host action as the hint, and nothing moves; once it is gone the start works."""
    nic = metrics["nic1"]
    lab.labsh(f"mkdom ops3 {nic} && virsh -q define /root/ops3.xml", timeout=120)
    pid = lab.run(f"nohup python3 -c \"import os, time; fd = os.open('{SYS}/{nic}/config', os.O_RDONLY); "
                  "time.sleep(900)\" >/dev/null 2>&1 & echo $!", timeout=30).stdout.strip()
    try:
        lab.run(f"for i in $(seq 30); do ls -l /proc/{pid}/fd | grep -q '{nic}/config' && exit 0; sleep 1; done; "
                "exit 1", timeout=60)
        plan = json.loads(lab.run([HCTL, "plan", "--device", nic, "--json"], timeout=120, check=False).stdout)
        assert [r["code"] for r in plan["refusals"]] == ["DEVICE_IN_USE"], plan
        r = lab.run("virsh start --paused ops3", timeout=300, check=False)
        print(r.stderr)
        assert r.rc != 0 and f"python3[{pid}]" in r.stderr and "host_actions" in r.stderr, r
        assert drivers(lab, nic) == {nic: "e1000e"} and wait_no_claims(lab, timeout=10) == {}
        assert value(scrape(lab), "hostdevd_refusals_total", reason="DEVICE_IN_USE") >= 1
    finally:
        lab.run(f"kill {pid}", timeout=30, check=False)
    lab.run("virsh start --paused ops3", timeout=300)
    assert drivers(lab, nic) == {nic: "vfio-pci"}
    lab.run("virsh destroy ops3; virsh -q undefine ops3", timeout=120)
    assert wait_drivers(lab, {nic: "e1000e"}) == {nic: "e1000e"}
