#!/usr/bin/env python3
"""Benchmark in the nested-VM lab: how long hostdevd takes to move devices to vfio-pci and back,
compared with raw sysfs writes and with libvirt's virsh nodedev-detach / nodedev-reattach.

In ONE boot of the lab's L1 guest (tests/lab, QEMU TCG), bench/guest_bind.py is
uploaded and run with /opt/hostdevd/bin/python. It times N rounds (default 7,
after one untimed warm-up round) of:

1. nic1 (e1000e, singleton group): raw driver_override + unbind + drivers_probe
   until the driver link is vfio-pci, and back until it is e1000e again;
2. nic1: ``virsh nodedev-detach`` / ``virsh nodedev-reattach`` (after one warm-up
   virsh call: the first libvirt call after boot probes capabilities);
3. nic1: hostdevd prepare/release (a) in-process through ``Engine`` (the daemon's
   path; ledger in a temp dir) and (b) through the ``hostdevctl`` CLI (Python start-up included);
4. the multifunction pair nic2a (+ companion nic2b) through Engine vs raw;
5. four independent groups (nic1, nic2a, nic3a, nic4a): prepared at once from 4
   threads on one Engine (different owners) vs one after another, and released likewise;
   the same for raw writes, for reference.

Prints a table of medians, the ratios hostdevd/raw, hostdevd/virsh and
parallel/sequential, and a JSON blob, also written to
bench/results/lab_bind-<date>.json. The devices are restored and the VM is
stopped in every case. A benchmark, never a test: nothing here asserts speed.

    python bench/lab_bind.py                 # 7 rounds
    python bench/lab_bind.py --rounds 3 --only raw,engine
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchutil import source_info  # bench/ is sys.path[0] when run as a script

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests" / "lab"))
import labvm  # noqa: E402  (tests/lab/labvm.py, standard library only)

GUEST_PY = "/opt/hostdevd/bin/python"
GUEST_SCRIPT = "/root/guest_bind.py"
GUEST_OUT = "/root/bench_bind.json"
DEVICES = ["nic1", "nic2a", "nic2b", "nic3a", "nic3b", "nic4a"]


def log(msg: str) -> None:
    sys.stderr.write(f"[lab_bind] {msg}\n")
    sys.stderr.flush()


# ---------------------------------------------------------------- one VM at a time
def running_lab_instances() -> list[str]:
    """Other lab VMs: run dirs with a live qemu pid, or any qemu-system process at all."""
    found = []
    run = labvm.lab_dir() / "run"
    if run.is_dir():
        for d in sorted(run.iterdir()):
            pidfile = d / "qemu.pid"
            try:
                if labvm._pid_alive(int(pidfile.read_text().split()[0])):
                    found.append(d.name)
            except (OSError, ValueError, IndexError):
                continue
    p = subprocess.run(["pgrep", "-a", "qemu-system"], capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.strip() and not any(n in line for n in found):
            found.append(line.split()[0] + " " + line.split()[1])
    return found


def wait_for_idle_lab(poll: float = 30.0, max_wait: float = 3 * 3600) -> float:
    """This machine has 2 cores: wait until no other lab VM runs. Returns seconds waited."""
    t0 = time.monotonic()
    while True:
        others = running_lab_instances()
        if not others:
            return time.monotonic() - t0
        if time.monotonic() - t0 > max_wait:
            raise SystemExit(f"another lab VM has been running for {max_wait:.0f} s: {others}")
        log("another lab VM is running ({}); waiting {:.0f} s".format(", ".join(others), poll))
        time.sleep(poll)


# ---------------------------------------------------------------- statistics
def summary(values: list[float]) -> dict:
    return {"n": len(values), "median_s": statistics.median(values), "min_s": min(values),
            "max_s": max(values)}


def ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or not b["median_s"]:
        return None
    return a["median_s"] / b["median_s"]


def analyse(raw: dict) -> dict:
    stats = {key: {kind: summary(v) for kind, v in kinds.items()} for key, kinds in raw["samples"].items()}

    def s(key: str, kind: str) -> dict | None:
        return stats.get(key, {}).get(kind)

    pairs = [  # (label, numerator key, kind suffix, denominator key, kind suffix)
        ("nic1 engine/raw", "nic1.engine", "", "nic1.raw", ""),
        ("nic1 cli/raw", "nic1.cli", "", "nic1.raw", ""),
        ("nic1 virsh/raw", "nic1.virsh", "", "nic1.raw", ""),
        ("nic1 engine/virsh", "nic1.engine", "", "nic1.virsh", ""),
        ("nic1 cli/virsh", "nic1.cli", "", "nic1.virsh", ""),
        ("pair engine/raw", "pair.engine", "", "pair.raw", ""),
        ("groups4 engine parallel/sequential", "groups4.engine", "_par", "groups4.engine", "_seq"),
        ("groups4 raw parallel/sequential", "groups4.raw", "_par", "groups4.raw", "_seq"),
        ("groups4 engine/raw sequential", "groups4.engine", "_seq", "groups4.raw", "_seq"),
        ("groups4 engine/raw parallel", "groups4.engine", "_par", "groups4.raw", "_par"),
    ]
    ratios: dict[str, dict[str, float]] = {}
    for label, num, ns, den, ds in pairs:
        row = {kind: ratio(s(num, kind + ns), s(den, kind + ds)) for kind in ("prepare", "release", "cycle")}
        row = {k: v for k, v in row.items() if v is not None}
        if row:
            ratios[label] = row
    return {"stats": stats, "ratios": ratios}


def ms(x: dict | None) -> str:
    return "-" if x is None else f"{x['median_s'] * 1e3:.0f}"


def rng(x: dict | None) -> str:
    return "-" if x is None else "{:.0f}-{:.0f}".format(x["min_s"] * 1e3, x["max_s"] * 1e3)


def report(result: dict) -> str:
    st, ra = result["stats"], result["ratios"]
    rows = [("nic1", "raw sysfs", "nic1.raw", ""), ("nic1", "virsh nodedev-detach/reattach", "nic1.virsh", ""),
            ("nic1", "hostdevd Engine (in-process)", "nic1.engine", ""),
            ("nic1", "hostdevctl CLI", "nic1.cli", ""),
            ("nic2a+nic2b", "raw sysfs", "pair.raw", ""), ("nic2a+nic2b", "hostdevd Engine", "pair.engine", ""),
            ("4 groups", "hostdevd Engine, sequential", "groups4.engine", "_seq"),
            ("4 groups", "hostdevd Engine, 4 threads", "groups4.engine", "_par"),
            ("4 groups", "raw sysfs, sequential", "groups4.raw", "_seq"),
            ("4 groups", "raw sysfs, 4 threads", "groups4.raw", "_par")]
    meta = result["meta"]
    out = ["", f"medians in ms over {meta.get('rounds', 0):d} rounds (cycle min-max in brackets); guest: "
               f"{meta.get('kernel', '?')}, {meta.get('cpus', '?')} CPUs, TCG",
           f"{'devices':<12} {'method':<31} {'prepare':>8} {'release':>8} {'cycle':>8}  (cycle range)"]
    for dev, name, key, suf in rows:
        if key not in st:
            continue
        prepare, release, cycle = (st[key].get(phase + suf) for phase in ("prepare", "release", "cycle"))
        out.append(f"{dev:<12} {name:<31} {ms(prepare):>8} {ms(release):>8} {ms(cycle):>8}  ({rng(cycle)})")
    extra = result.get("extra", {})
    notes = []
    if "cli.startup" in st:
        notes.append("hostdevctl --version (Python start-up + imports): {} ms".format(ms(st["cli.startup"]["once"])))
    if "engine.topology_scan" in st:
        notes.append("Engine.topology() scan: {} ms; vfio_group_users scan of /proc ({} processes): {} ms".format(
            ms(st["engine.topology_scan"]["once"]), extra.get("proc_count", "?"),
            ms(st["engine.vfio_group_users_scan"]["once"])))
    if "nic1.engine" in st and "ledger_save" in st["nic1.engine"]:
        notes.append("Engine ledger saves per nic1 cycle: {}, {} ms in total (state dir on {})".format(
            extra.get("engine_ledger_saves_per_cycle", "?"), ms(st["nic1.engine"]["ledger_save"]),
            result["meta"].get("state_dir_fs", "?")))
    for label, key, suf in (("nic1 raw", "nic1.raw", ""), ("nic1 Engine", "nic1.engine", ""),
                            ("4 groups Engine sequential", "groups4.engine", "_seq"),
                            ("4 groups Engine 4 threads", "groups4.engine", "_par"),
                            ("4 groups raw sequential", "groups4.raw", "_seq"),
                            ("4 groups raw 4 threads", "groups4.raw", "_par")):
        k = st.get(key, {})
        if "cpu_user" + suf in k:
            notes.append("CPU per cycle, {}: user {} ms, system {} ms (wall {} ms)".format(
                label, ms(k["cpu_user" + suf]), ms(k["cpu_sys" + suf]), ms(k.get("cycle" + suf))))
    prof = extra.get("engine_profile_top") or []
    if prof:
        notes.append("Engine nic1 cycle under cProfile: {} ms per cycle; top entries by own time "
                     "(ms per cycle, calls):".format(prof[0]["total_ms_per_cycle"]))
        notes += ["  {:>8.2f} {:>7d}  {}".format(r["own_ms"], r["calls"], r["where"]) for r in prof[1:]]
    if "virsh_first_call_s" in extra:
        notes.append("first virsh call after boot: {:.1f} s (libvirtd {} before it); "
                     "the same call later: {:.2f} s".format(
            extra["virsh_first_call_s"], extra.get("libvirtd_before_first_call", "?"),
            extra.get("virsh_noop_call_s", float("nan"))))
    out += [""] + notes
    out += ["", f"{'ratios of medians':<40} {'prepare':>8} {'release':>8} {'cycle':>8}"]
    for k, row in ra.items():
        prepare, release, cycle = (f"{row[c]:.2f}" if c in row else "-" for c in ("prepare", "release", "cycle"))
        out.append(f"{k:<40} {prepare:>8} {release:>8} {cycle:>8}")
    return "\n".join(out)


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds per measurement (default 7)")
    ap.add_argument("--only", help="comma-separated phases: raw,virsh,engine,cli,pair,groups4 (default all)")
    ap.add_argument("--results-dir", default=str(BENCH / "results"), help="where the JSON goes")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for other lab VMs to finish")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")

    t_start = time.monotonic()
    waited = 0.0 if args.no_wait else wait_for_idle_lab()
    log(f"image: {labvm.ensure_image():.1f} s")
    vm = labvm.LabVM()
    raw = None
    guest_rc = None
    restored = None
    try:
        boot_s = vm.boot(REPO)
        source = source_info()  # just before the wheel is built from the working tree
        install = vm.install_hostdevd()
        topo = vm.topology()
        devs = {n: topo[n] for n in DEVICES}
        log(f"devices: {devs}")
        vm.put(BENCH / "guest_bind.py", GUEST_SCRIPT, mode="755")
        cmd = [GUEST_PY, GUEST_SCRIPT, "--devices", json.dumps(devs), "--rounds", str(args.rounds),
               "--out", GUEST_OUT]
        if args.only:
            cmd += ["--only", args.only]
        # TCG: a round of everything takes about half a minute; be generous.
        timeout = 600 + 180 * (args.rounds + 1)
        log(f"running guest_bind.py ({args.rounds:d} rounds, guest timeout {timeout:d} s)")
        r = vm.run(cmd, timeout=timeout, check=False)
        guest_rc = r.rc
        sys.stderr.write(r.stderr)
        try:
            raw = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            try:  # killed before printing: take what it wrote, if anything
                raw = json.loads(vm.read_text(GUEST_OUT))
            except Exception:
                raw = None
        if raw is None:
            raise labvm.LabError(f"guest_bind.py produced no result:\n{r}")
    finally:
        if vm.running:
            try:  # the guest script restores on its own; this covers a killed one
                rr = vm.run([GUEST_PY, GUEST_SCRIPT, "--restore", "--devices", json.dumps(
                    {n: vm.topology()[n] for n in DEVICES})], timeout=300, check=False)
                restored = json.loads(rr.stdout.strip().splitlines()[-1])
                log(f"restore check: {restored}")
            except Exception as e:
                log(f"restore check failed: {e}")
        vm.stop()

    result = {"benchmark": "lab_bind", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "meta": raw["meta"], "extra": raw.get("extra", {}), "errors": raw.get("errors", []),
              "restore_problems": raw.get("restore_problems"), "final_restore_check": restored,
              "guest_rc": guest_rc}
    result.update(analyse(raw))
    result["host"] = {
        "cpus": os.cpu_count(),
        "cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                     if line.startswith("model name")), "?"),
        "python": platform.python_version(),
        "accel": "tcg",
        "source": source,
        "lab_boot_s": round(boot_s, 1),
        "install": install,
        "waited_for_other_lab_s": round(waited, 1),
        "wall_s": round(time.monotonic() - t_start, 1),
    }
    result["samples"] = raw["samples"]
    print(report(result))
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("lab_bind-{}.json".format(time.strftime("%Y%m%d-%H%M%S")))
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    log(f"written {path}")
    if result["errors"] or result["restore_problems"]:
        log("ERRORS: {}; restore problems: {}".format(result["errors"], result["restore_problems"]))
        return 1
    return 0


if __name__ == "__main__":
    import signal
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    sys.exit(main())
