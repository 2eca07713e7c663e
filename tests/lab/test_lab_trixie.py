"""Debian 13 "trixie" (kernel 6.12, libvirt 11, QEMU 10, Python 3.13): hostdevd installed the
operator's way, `apt install ./hostdevd_*.deb` with no venv and no pip, judged by the real kernel
and libvirt (issue 11). Runs only in the trixie lab session:

    HOSTDEVD_LAB_SUITE=trixie HOSTDEVD_LAB_DIR=/var/tmp/hostdevd-lab13 pytest tests/lab -m lab_trixie

(run-tests.sh does this when HOSTDEVD_LAB_TRIXIE=1). The package's life cycle goes last: upgrade
and remove while a domain holds the pair, then purge.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time

import labvm
import pytest
from labops import claims, drivers, owners, wait_active, wait_drivers, wait_no_claims

pytestmark = [pytest.mark.lab, pytest.mark.lab_trixie, pytest.mark.trixie_only]

HCTL = "/usr/bin/hostdevctl"
START = "virsh start --paused %s"


@pytest.fixture(scope="module")
def trixie(lab):
    if labvm.SUITE != "trixie":
        pytest.fail("test_lab_trixie.py runs in the trixie lab session (HOSTDEVD_LAB_SUITE=trixie)")
    wait_active(lab)
    topo = lab.topology()
    # module scope, but the package's removal runs last in the session: this may run twice
    lab.run("for d in tx1 tx2; do virsh -q destroy $d; virsh -q undefine $d; done 2>/dev/null", timeout=120,
            check=False)
    lab.labsh(f"mkdom tx1 {topo['nic2a']} && virsh -q define /root/tx1.xml && "
              f"mkdom tx2 {topo['nic2b']} && virsh -q define /root/tx2.xml", timeout=120)
    return topo


def test_stack_and_package_as_installed(lab, trixie):
    stack = lab.run("uname -r; virsh --version; qemu-system-x86_64 --version | head -1; python3 --version; "
                    "dpkg-query -W -f='${Version}\\n' hostdevd python3-libvirt python3-pydantic", timeout=60).stdout
    print("trixie L1:\n" + stack)
    kernel, libvirt = stack.splitlines()[:2]
    assert kernel.startswith("6.12") and libvirt.startswith("11."), stack
    files = lab.run("dpkg -L hostdevd", timeout=60).stdout.split()
    for f in ("/usr/bin/hostdevd", "/usr/bin/hostdevctl", "/usr/lib/systemd/system/hostdevd.service",
              "/etc/libvirt/hooks/qemu.d/hostdevd", "/etc/hostdevd/hostdevd.toml",
              "/usr/lib/systemd/catalog/hostdevd.catalog", "/usr/share/man/man8/hostdevctl.8.gz",
              "/usr/share/man/man5/hostdevd.toml.5.gz"):
        assert f in files, f
    assert not lab.run("test -e /opt/hostdevd", timeout=10, check=False).ok, "no venv on trixie"
    r = lab.run("systemctl is-enabled hostdevd; systemctl is-active hostdevd; "
                "systemctl show hostdevd -p ExecStart --value", timeout=30)
    assert r.stdout.startswith("enabled\nactive\n") and "/usr/bin/hostdevd" in r.stdout, r.stdout
    # the catalog was compiled on install (systemd's dpkg trigger): MESSAGE_IDs have their text
    assert lab.run("journalctl --list-catalog 3ed3dbad284a4a169e375538b43659fd", timeout=60).stdout.strip()


def test_what_debian13_does_not_have_and_what_hostdevd_says_about_it(lab, trixie):
    """The parts of issue 11 that depend on the stack, as Debian 13 ships it. Each assertion is a
    fact of the stack; when one stops holding (a point release enables iommufd, libvirt ships
    virtqemud), this test fails so that the lab grows the scenario it then can run."""
    kver = lab.run("uname -r", timeout=10).stdout.strip()
    config = lab.run(f"grep -E '^(# )?CONFIG_(IOMMUFD|VFIO_DEVICE_CDEV|VIRTIO_VFIO_PCI)[ =]' /boot/config-{kver}",
                     timeout=30, check=False).stdout
    print(config)
    # no iommufd and no VFIO device cdevs: QEMU can only open /dev/vfio/N
    assert "# CONFIG_IOMMUFD is not set" in config and "CONFIG_VFIO_DEVICE_CDEV=y" not in config, config
    assert not lab.run("test -e /dev/iommu || modprobe -n iommufd", timeout=30, check=False).ok
    # no virtio_vfio_pci (the variant driver of modern virtio-net), and no variant driver at all:
    # modules.alias has vfio_pci's own entry only
    assert not lab.run("modinfo virtio_vfio_pci", timeout=30, check=False).ok
    variants = lab.run(f"grep '^alias vfio_pci:' /lib/modules/{kver}/modules.alias | awk '{{print $3}}' | sort -u",
                       timeout=30).stdout.split()
    assert variants == ["vfio_pci"], variants
    # libvirt 11.3 as Debian packages it: the monolithic libvirtd only, no virtqemud & co.
    assert not lab.run("command -v virtqemud || test -e /usr/lib/systemd/system/virtqemud.service",
                       timeout=30, check=False).ok
    # ... and its domain capabilities offer no iommufd hostdevs
    assert "name='iommufd'" not in lab.run("virsh domcapabilities", timeout=120).stdout
    # what hostdevd says: nothing to fix, with the reasons
    checks = json.loads(lab.run([HCTL, "check", "--json"], timeout=120, check=False).stdout)["checks"]
    c = {x["name"]: x for x in checks}
    print("check iommufd: " + c["iommufd"]["message"])
    assert c["iommufd"]["status"] == "ok", c["iommufd"]
    assert "CONFIG_IOMMUFD is not set" in c["iommufd"]["message"]
    assert "does not advertise iommufd" in c["iommufd"]["message"]


def test_every_module_of_the_package_imports_on_python_313_in_l1(lab, trixie):
    """In L1 itself: each module of the installed package imports on Debian 13's Python (the unit
    suite runs in the image's root filesystem on the host, below: under TCG it takes an hour)."""
    r = lab.run(["python3", "-c", "import hostdevd, pkgutil, importlib, sys; "
                 "names = [m.name for m in pkgutil.walk_packages(hostdevd.__path__, 'hostdevd.')]; "
                 "[importlib.import_module(n) for n in names]; print(len(names), hostdevd.__file__, sys.version)"],
                timeout=600)
    count, where, version = r.stdout.split(" ", 2)
    assert int(count) > 80 and where.startswith("/usr/lib/python3/dist-packages/hostdevd/"), r.stdout
    assert version.startswith("3.13."), r.stdout


def test_unit_suite_on_debian13_python_from_the_installed_package(lab, trixie, tmp_path):
    """The unit suite on Debian 13's Python 3.13 and Debian's pydantic, lxml, libvirt-python,
    prometheus-client ..., with hostdevd installed from the .deb by dpkg (its modules in
    /usr/lib/python3/dist-packages, not the checkout's): in a chroot of the L1 image's own root
    filesystem (read out of it with debugfs, no mount), at native speed."""
    root = tmp_path / "root"
    root.mkdir()
    image = labvm.lab_dir() / "img" / "l1-base.raw"
    subprocess.run(["debugfs", "-R", f"rdump / {root}", str(image)], check=True, capture_output=True, timeout=600)
    deb = labvm.build_deb()[0]
    shutil.copy(deb, root / "root" / deb.name)
    (root / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")   # a chroot starts no services
    (root / "usr/sbin/policy-rc.d").chmod(0o755)
    ut = root / "root" / "ut"
    shutil.copytree(labvm.REPO_ROOT, ut, ignore=shutil.ignore_patterns(
        ".git", ".venv", "daemon", "dist", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"))
    script = (f"mount -t proc proc {root}/proc && mount --rbind /dev {root}/dev && "
              f"chroot {root} /bin/sh -c 'dpkg -i /root/{deb.name} >/root/dpkg.log 2>&1 || "
              "{ tail -20 /root/dpkg.log; exit 3; }; cd /root/ut && python3 -c \"import hostdevd, sys; "
              "print(hostdevd.__file__, sys.version.split()[0])\" && PYTHONDONTWRITEBYTECODE=1 "
              "python3 -m pytest tests/unit -q -p no:cacheprovider -rs 2>&1 | tail -15'")
    t0 = time.monotonic()
    r = subprocess.run(["unshare", "--mount", "--fork", "/bin/sh", "-c", script], capture_output=True, text=True,
                       timeout=1800)
    out = r.stdout + r.stderr
    print(f"unit suite in a Debian 13 chroot ({time.monotonic() - t0:.0f} s):\n{out}")
    assert r.returncode == 0 and "/usr/lib/python3/dist-packages/hostdevd/" in out and " 3.13." in out, out
    assert " passed" in out and " failed" not in out and " error" not in out, out
    assert " skipped" not in out, "a unit test was skipped on Debian 13: " + out


def test_groups_equal_the_kernels_and_check(lab, trixie):
    data = json.loads(lab.run([HCTL, "groups", "--json"], timeout=120).stdout)
    ours = {int(g["group"]): sorted(d["address"] for d in g["devices"]) for g in data["groups"]}
    kernel = json.loads(lab.run(["python3", "-c", "import json,os; B='/sys/kernel/iommu_groups'; "
                                 "print(json.dumps({g: sorted(os.listdir(f'{B}/{g}/devices')) "
                                 "for g in os.listdir(B)}))"], timeout=60).stdout)
    assert ours == {int(g): m for g, m in kernel.items()}
    # the variant lookup on the real 6.12 modules.alias picks plain vfio-pci for the lab's devices
    notes = {d["address"]: d.get("vfio_driver") for g in data["groups"] for d in g["devices"]}
    assert notes[trixie["nic2a"]] == "vfio-pci", notes
    r = lab.run([HCTL, "check", "--json"], timeout=120, check=False)
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    print("hostdevctl check: " + "; ".join(f"{n}={c['status']}" for n, c in checks.items()))
    assert checks["iommu"]["status"] == "ok" and checks["interrupt-remapping"]["status"] == "ok"
    assert checks["iommufd"]["status"] in ("ok", "warn"), checks["iommufd"]


def test_l2_start_with_one_function_binds_the_pair_and_destroy_returns_it(lab, trixie):
    a, b = trixie["nic2a"], trixie["nic2b"]
    lab.run(START % "tx1", timeout=300)
    assert drivers(lab, a, b) == {a: "vfio-pci", b: "vfio-pci"}
    assert set(owners(lab).values()) == {"tx1"}
    r = lab.run(START % "tx2", timeout=300, check=False)          # the other function's domain
    assert r.rc != 0 and "tx1" in r.stderr, r
    lab.run("virsh destroy tx1", timeout=120)
    assert wait_drivers(lab, {a: "e1000e", b: "e1000e"}) == {a: "e1000e", b: "e1000e"}
    assert wait_no_claims(lab) == {}


def test_kill9_and_libvirt_restart_keep_the_claim(lab, trixie):
    a, b = trixie["nic2a"], trixie["nic2b"]
    lab.run(START % "tx1", timeout=300)
    try:
        lab.run("kill -9 $(systemctl show -p MainPID --value hostdevd)", timeout=30)
        time.sleep(3)
        wait_active(lab)
        lab.run("systemctl restart libvirtd", timeout=180)
        assert lab.run("virsh domstate tx1", timeout=60).stdout.strip() == "paused"
        assert drivers(lab, a, b) == {a: "vfio-pci", b: "vfio-pci"}
        assert set(owners(lab).values()) == {"tx1"}
    finally:
        lab.run("virsh destroy tx1", timeout=120, check=False)
    assert wait_drivers(lab, {a: "e1000e", b: "e1000e"}) == {a: "e1000e", b: "e1000e"}


@pytest.mark.lab_last
def test_package_upgrade_and_remove_while_a_domain_holds_the_pair_then_purge(lab, trixie):
    a, b = trixie["nic2a"], trixie["nic2b"]
    deb = lab.run("ls /root/debs/hostdevd_*_all.deb", timeout=30).stdout.split()[0]
    # a newer build of the same package: the version bumped, nothing else
    lab.run(f"rm -rf /root/up && dpkg-deb -R {deb} /root/up && "
            "sed -i 's/^Version: .*/&+lab1/' /root/up/DEBIAN/control && dpkg-deb -b /root/up /root/up.deb",
            timeout=120)
    lab.run(START % "tx1", timeout=300)
    pid = lab.run("systemctl show -p MainPID --value hostdevd", timeout=30).stdout.strip()
    before = claims(lab)
    r = lab.run("DEBIAN_FRONTEND=noninteractive apt-get install -y /root/up.deb", timeout=300)
    print(r.stdout[-1500:])
    wait_active(lab)
    assert lab.run("systemctl show -p MainPID --value hostdevd", timeout=30).stdout.strip() != pid, \
        "the upgrade did not restart hostdevd"
    assert claims(lab) == before and drivers(lab, a, b) == {a: "vfio-pci", b: "vfio-pci"}

    r = lab.run("DEBIAN_FRONTEND=noninteractive apt-get remove -y hostdevd", timeout=300)
    print(r.stdout[-1500:] + r.stderr[-1500:])
    assert drivers(lab, a, b) == {a: "vfio-pci", b: "vfio-pci"}, "remove unbound a device in use"
    assert lab.run("test -s /var/lib/hostdevd/ledger.json", timeout=10, check=False).ok, "remove lost the ledger"
    assert lab.run("virsh domstate tx1", timeout=60).stdout.strip() == "paused"
    # the hook left behind (a conffile) lets libvirt be: the domain stops, others can start
    lab.run("virsh destroy tx1", timeout=120)
    r = lab.run("DEBIAN_FRONTEND=noninteractive apt-get purge -y hostdevd", timeout=300, check=False)
    said = r.stdout + r.stderr
    print(said[-1500:])
    # the destroy's release never ran (no daemon): the claim is still recorded, so purge keeps it
    assert lab.run("test -s /var/lib/hostdevd/ledger.json", timeout=10, check=False).ok, said
    assert "claim" in said, said
    # reinstall: the daemon finds the claim of a domain that is not running and gives the pair back
    lab.run(f"DEBIAN_FRONTEND=noninteractive apt-get install -y {deb}", timeout=300)
    wait_active(lab)
    assert wait_drivers(lab, {a: "e1000e", b: "e1000e"}, timeout=120) == {a: "e1000e", b: "e1000e"}
    assert wait_no_claims(lab) == {}
    r = lab.run("DEBIAN_FRONTEND=noninteractive apt-get purge -y hostdevd", timeout=300)
    assert not lab.run("test -e /var/lib/hostdevd", timeout=10, check=False).ok, r.stdout[-1000:]
    assert not lab.run("test -e /etc/libvirt/hooks/qemu.d/hostdevd", timeout=10, check=False).ok
    lab.run(f"DEBIAN_FRONTEND=noninteractive apt-get install -y {deb}", timeout=300)
    wait_active(lab)
