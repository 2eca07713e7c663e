"""systemd files: a catalog entry per MESSAGE_ID, a sane unit, tmpfiles and an example config that parses."""
from __future__ import annotations

import re
from pathlib import Path

from hostdevd.core.config import Config, parse_config
from hostdevd.core.logfields import MSG

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"


def catalog_entries() -> dict[str, str]:
    text = (SYSTEMD / "hostdevd.catalog").read_text()
    parts = re.split(r"^-- ([0-9a-f]{32})\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=False))


def test_every_message_id_has_a_catalog_entry():
    entries = catalog_entries()
    assert set(entries) == set(MSG.values()), {k for k, v in MSG.items() if v not in entries}


def test_catalog_entries_are_well_formed():
    for mid, body in catalog_entries().items():
        head, _, text = body.partition("\n\n")
        fields = dict(line.split(": ", 1) for line in head.splitlines())
        assert fields.get("Subject") and fields.get("Defined-By") == "hostdevd", mid
        assert len(text.split()) >= 20, f"{mid}: say what happened and what to do"
        for var in re.findall(r"@([A-Z_]+)@", body):
            assert var in ("HOSTDEV_ADDRESS", "IOMMU_GROUP", "DOMAIN_UUID", "DOMAIN_NAME", "ACTION", "RESULT"), var


def test_unit_file():
    unit = (SYSTEMD / "hostdevd.service").read_text()
    keys = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            keys[k] = v
    assert keys["Type"] == "notify" and keys["NotifyAccess"] == "main" and keys["WatchdogSec"] == "30s"
    assert keys["Restart"] == "on-failure" and "libvirt-guests.service" in keys["Before"]
    # Before libvirtd, not after: libvirtd autostarts domains as soon as it is up, and their
    # prepare hooks need hostdevd already serving (it connects to libvirt in the background).
    assert "libvirtd.service" in keys["Before"] and "virtqemud.service" in keys["Before"]
    assert "libvirtd" not in keys["After"]
    assert keys["ProtectSystem"] == "strict" and "/sys/bus/pci" in keys["ReadWritePaths"]
    assert keys["RestrictAddressFamilies"] == "AF_UNIX AF_NETLINK" and keys["NoNewPrivileges"] == "yes"
    assert "ProtectKernelTunables" not in keys, "it would make /sys read-only"
    for cap in ("CAP_SYS_ADMIN", "CAP_SYS_MODULE", "CAP_DAC_OVERRIDE", "CAP_SYS_PTRACE"):
        assert cap in keys["CapabilityBoundingSet"]
    assert keys["RuntimeDirectory"] == keys["StateDirectory"] == "hostdevd"


def test_tmpfiles_match_the_default_config():
    lines = [line.split() for line in (SYSTEMD / "hostdevd.tmpfiles").read_text().splitlines()
             if line and not line.startswith("#")]
    assert {(t, p, m) for t, p, m, *_ in lines} == {("d", Config().state_dir, "0700"),
                                                    ("d", Config().runtime_dir, "0700")}


def test_example_config_parses_to_the_defaults():
    assert parse_config((SYSTEMD / "hostdevd.toml.example").read_text()) == Config()
