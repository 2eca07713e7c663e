"""hostdevctl end to end on the simulated kernel and on listings: output shapes, exit codes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hostdevd.core.sysfs import Sysfs
from hostdevd.doors.cli import main

from .conftest import load_sim

LISTINGS = Path(__file__).resolve().parents[1] / "listings"
GTX = str(LISTINGS / "gtx1080_z270_inline_unsorted.txt")


def run(argv, sim=None):
    lines: list[str] = []
    rc = main(argv, sysfs=Sysfs(sim, 2.0) if sim is not None else None, out=lines.append)
    return rc, "\n".join(lines)


def test_groups_listing_json_shape():
    rc, out = run(["groups", "--listing", GTX, "--json"])
    assert rc == 0
    data = json.loads(out)
    nums = [g["group"] for g in data["groups"]]
    assert nums == sorted(nums) and nums[:3] == [0, 1, 2]
    g1 = data["groups"][1]["devices"]
    assert [(d["address"], d["class"], d["vendor"], d["device"], d["bridge"]) for d in g1] == [
        ("0000:00:01.0", "0604", "8086", "1901", True),
        ("0000:01:00.0", "0300", "10de", "1b80", False),
        ("0000:01:00.1", "0403", "10de", "10f0", False),
    ]


def test_plan_listing_json():
    rc, out = run(["plan", "--listing", GTX, "--device", "01:00.0", "--json"])
    assert rc == 0
    d = json.loads(out)
    assert d["ok"] is True
    assert d["groups"] == [{"group": 1, "requested": ["0000:01:00.0"], "bind": ["0000:01:00.0", "0000:01:00.1"],
                            "companions": ["0000:01:00.1"], "skip": ["0000:00:01.0"], "keep": [],
                            "already_held": False, "takeover": False}]


def test_plan_listing_refusal_and_warning():
    # the Z270 chipset group 9: NIC, audio, LPC... the ISA bridge is an endpoint the host needs
    rc, out = run(["plan", "--listing", GTX, "--device", "0000:00:1f.6", "--json"])
    d = json.loads(out)
    assert d["groups"][0]["group"] == 9
    assert "0000:00:1f.0" in d["groups"][0]["companions"]
    assert rc == (0 if d["ok"] else 1)
    rc, out = run(["plan", "--listing", GTX, "--device", "0000:00:17.0", "--json"])
    d = json.loads(out)
    assert any("storage" in w for w in d["warnings"])
    rc, out = run(["plan", "--listing", GTX, "--device", "0000:00:1b.0", "--json"])
    d = json.loads(out)
    assert rc == 1 and d["ok"] is False and "bridge" in d["refusals"][0]["reason"]
    assert d["groups"] == []


REDDIT = str(LISTINGS / "reddit_b550_rx6700xt_noise.txt")


@pytest.mark.parametrize("argv", [["groups"], ["plan", "--device", "0c:00.0"]])
def test_listing_lines_not_understood_are_reported(argv, capsys):
    rc, out = run([*argv, "--listing", REDDIT, "--json"])
    assert rc == 0
    unparsed = json.loads(out)["unparsed"]
    assert unparsed["count"] == 3 and [u["line"] for u in unparsed["lines"]] == [1, 2, 42]
    assert unparsed["lines"][2] == {"line": 42, "text": "Edit: kernel 6.1, amd_iommu=on iommu=pt in the cmdline."}
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        "hostdevctl: warning: 3 lines of the listing not understood, skipped: line 1 'Trying to pass my 6700 XT")
    assert err[0].endswith("if one is a device, paste it as `lspci -nn` prints it")
    rc, out = run([*argv, "--listing", REDDIT])              # the table too: the same line on stderr
    assert rc == 0 and "unparsed" not in out and len(capsys.readouterr().err.splitlines()) == 1


def test_clean_listing_reports_nothing_unparsed(capsys):
    rc, out = run(["groups", "--listing", GTX, "--json"])
    assert rc == 0 and json.loads(out)["unparsed"] == {"count": 0, "lines": []}
    assert capsys.readouterr().err == ""


def test_plan_prints_each_refusal_naming_the_device_once():
    rc, out = run(["plan", "--listing", GTX, "--device", "0000:00:1b.0", "--device", "0000:09:00.0"])
    assert rc == 1
    assert "  refused: 0000:09:00.0 does not exist on this host" in out.splitlines()
    assert "  refused: 0000:00:1b.0 is a PCI bridge; bridges are never bound to vfio-pci" in out.splitlines()
    assert out.count("0000:00:1b.0") == 1
    many = [f"--device=0000:40:{i // 8:02x}.{i % 8}" for i in range(40)]
    rc, out = run(["plan", "--listing", GTX, *many])
    assert rc == 1 and [line for line in out.splitlines() if "refused" in line] == [
        "  refused: 40 requested devices do not exist on this host: 0000:40:00.0, 0000:40:00.1, 0000:40:00.2, \u2026"]


def test_groups_sim_table_and_owner(state):
    sim = load_sim("lab")
    rc, out = run(state + ["groups"], sim)
    assert rc == 0
    assert "0000:04:00.1" in out and "host-critical" in out  # root disk / default route
    rc, out = run(state + ["prepare", "--device", "0000:04:00.0", "--owner", "web1"], sim)
    assert rc == 0, out
    rc, out = run(state + ["groups", "--json"], sim)
    devs = {d["address"]: d for g in json.loads(out)["groups"] for d in g["devices"]}
    assert devs["0000:04:00.1"]["owner"] == "web1" and devs["0000:04:00.1"]["driver"] == "vfio-pci"
    rc, out = run(state + ["status"], sim)
    assert "web1" in out and "companion" in out and "e1000e" in out
    rc, out = run(state + ["prepare", "--device", "0000:04:00.1", "--owner", "db1", "--json"], sim)
    assert rc == 1 and "held by domain web1" in out
    rc, out = run(state + ["release", "--owner", "web1"], sim)
    assert rc == 0 and sim.driver("0000:04:00.0") == "e1000e"


def test_prepare_from_domain_xml(state, tmp_path):
    sim = load_sim("lab")
    xml = tmp_path / "dom.xml"
    xml.write_text("""<domain type='kvm'><name>l2</name><uuid>6f8b1c9e-3b1a-4a34-9d2e-0c1c2f3e4d5a</uuid>
      <devices><hostdev mode='subsystem' type='pci' managed='yes'>
        <source><address domain='0x0000' bus='0x06' slot='0x01' function='0x0'/></source>
        <address type='pci' domain='0x0000' bus='0x00' slot='0x07' function='0x0'/>
      </hostdev></devices></domain>""")
    rc, out = run(state + ["plan", str(xml)], sim)
    assert rc == 0 and "skip bridges 0000:05:00.0" in out
    rc, out = run(state + ["prepare", str(xml), "--json"], sim)
    assert rc == 0
    assert json.loads(out)["owner"]["uuid"] == "6f8b1c9e-3b1a-4a34-9d2e-0c1c2f3e4d5a"
    assert sim.driver("0000:06:02.0") == "vfio-pci" and sim.driver("0000:05:00.0") is None
    rc, out = run(state + ["release", str(xml)], sim)
    assert rc == 0 and sim.driver("0000:06:02.0") == "e1000"


def test_snapshot_roundtrip(state, tmp_path):
    sim = load_sim("lab")
    snap = tmp_path / "snap.json"
    rc, live = run(state + ["groups", "--json", "--save", str(snap)], sim)
    rc2, again = run(["groups", "--snapshot", str(snap), "--json"])
    def strip(d):
        return [(g["group"], [(x["address"], x["class"], x["bridge"]) for x in g["devices"]])
                           for g in json.loads(d)["groups"]]
    assert rc == rc2 == 0 and strip(live) == strip(again)


def test_check_lab_ok_and_no_iommu_fails(state):
    rc, out = run(state + ["check", "--json"], load_sim("lab"))
    d = json.loads(out)
    status = {c["name"]: c["status"] for c in d["checks"]}
    assert rc == 0 and status["iommu"] == "ok" and status["interrupt-remapping"] == "ok"
    rc, out = run(state + ["check"], load_sim("no_iommu"))
    assert rc == 1 and "FAIL  iommu" in out
    rc, out = run(state + ["groups"], load_sim("no_iommu"))
    assert rc == 1 and "IOMMU is off or absent" in out


@pytest.mark.parametrize("argv,needle", [
    (["plan", "--device", "zz:zz.z"], "not a PCI address"),
    (["bogus"], "invalid choice"),
    (["prepare", "--device", "0000:04:00.0"], "needs an owner"),
    (["plan"], "nothing to plan"),
])
def test_usage_errors_exit_2(state, argv, needle, capsys):
    rc, _ = run(state + argv, load_sim("lab"))
    assert rc == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_malformed_xml_exit_2(state, tmp_path, capsys):
    bad = tmp_path / "bad.xml"
    bad.write_text("<!DOCTYPE x [<!ENTITY a 'b'>]><domain>&a;</domain>")
    rc, _ = run(state + ["plan", str(bad)], load_sim("lab"))
    assert rc == 2 and "hostdevctl:" in capsys.readouterr().err


def test_bad_config_exit_2(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[policy]\ndeny = ['nonsense']\n")
    rc, _ = run(["--config", str(cfg), "groups"], load_sim("lab"))
    err = capsys.readouterr().err
    assert rc == 2 and "policy.deny[0]" in err


def test_prepare_release_go_through_the_running_daemon(tmp_path):
    """With the daemon up, hand-run writes take its locks and show up as its claims."""
    from .daemon_support import running_daemon

    with running_daemon("lab") as (daemon, sim, sock):
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'state_dir = "{daemon.engine.config.state_dir}"\n'
                       f'runtime_dir = "{daemon.engine.config.runtime_dir}"\n')
        base = ["--config", str(cfg)]
        # a separate Sysfs would see the same sim; the daemon must do the work itself
        rc, out = run(base + ["prepare", "--device", "0000:04:00.0", "--owner", "web1"], sim)
        assert rc == 0 and "done by the hostdevd daemon" in out
        assert daemon.engine.ledger().claim_for_group(15).owner.name == "web1"
        rc, out = run(base + ["prepare", "--device", "0000:04:00.1", "--owner", "db1", "--json"], sim)
        assert rc == 1 and "web1" in out
        rc, out = run(base + ["release", "--owner", "web1"], sim)
        assert rc == 0 and sim.driver("0000:04:00.1") == "e1000e"
        rc, out = run(base + ["--no-daemon", "status"], sim)
        assert "no claims" in out


def test_attach_without_daemon_is_a_clear_error(state, capsys):
    rc, _ = run(state + ["attach", "vm1", "--device", "0000:04:00.0"], load_sim("lab"))
    assert rc == 1 and "needs the hostdevd daemon" in capsys.readouterr().err
