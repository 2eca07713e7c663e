#!/usr/bin/env python3
"""Quick benchmark on the simulated kernel: hostdevd's per-cycle overhead, no VM.

In one process, runs N (default 1,000) prepare/release cycles of one device
through :class:`hostdevd.core.engine.Engine` on
``SimKernel.from_file('tests/topologies/lab.json')`` and compares the
per-cycle median with a baseline that does the same sysfs writes raw on the
simulated kernel (driver_override, unbind, drivers_probe, read the driver
link; and back). It also reports how much of the Engine's time goes into
saving the ledger (the atomic replace, and the fsync calls within it), and
the process RSS (VmRSS from /proc/self/status) after start-up, after the
warm-up and after the cycles.

    python bench/sim_cycles.py                    # 1,000 cycles of nic1 (0000:01:00.0)
    python bench/sim_cycles.py --cycles 200 --device 0000:04:00.0 --json
    python bench/sim_cycles.py --save             # also bench/results/sim_cycles-<date>.json

This is a benchmark, not a test: it asserts nothing beyond "the device went
to vfio-pci and came back", and it is never run by the test suite.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from benchutil import source_info  # bench/ is sys.path[0] when run as a script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "daemon"))  # run from a checkout without installing

from hostdevd.core.address import PciAddress  # noqa: E402
from hostdevd.core.config import Config  # noqa: E402
from hostdevd.core.engine import Engine  # noqa: E402
from hostdevd.core.ledger import Owner  # noqa: E402
from hostdevd.core.ledger_store import LedgerStore  # noqa: E402
from hostdevd.core.sysfs import Sysfs  # noqa: E402
from hostdevd.sim.simkernel import SimKernel  # noqa: E402

TOPOLOGY = REPO / "tests" / "topologies" / "lab.json"
VFIO = "vfio-pci"


def rss_kib() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in KiB (after a full garbage collection)."""
    gc.collect()
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(val.split()[0])
    return out


def fs_type(path: str) -> str:
    """The filesystem type of the mount holding path (longest mount-point prefix)."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


class TimedStore(LedgerStore):
    """A LedgerStore that adds up the time spent in save() and in its fsync calls."""

    def __init__(self, state_dir):
        super().__init__(state_dir)
        self.save_s = 0.0
        self.fsync_s = 0.0

    def save(self, ledger) -> None:
        real_fsync = os.fsync

        def timed_fsync(fd):
            t = time.perf_counter()
            try:
                real_fsync(fd)
            finally:
                self.fsync_s += time.perf_counter() - t

        t0 = time.perf_counter()
        os.fsync = timed_fsync  # ledger.py calls os.fsync through the os module
        try:
            super().save(ledger)
        finally:
            os.fsync = real_fsync
            self.save_s += time.perf_counter() - t0


def stats(samples: list[float]) -> dict:
    return {"n": len(samples), "median_s": statistics.median(samples), "min_s": min(samples),
            "max_s": max(samples), "mean_s": statistics.fmean(samples)}


def raw_cycle(sim: SimKernel, bdf: str, orig: str) -> None:
    """The writes hostdevd's executor makes, done directly on the simulated kernel."""
    dev = f"bus/pci/devices/{bdf}"

    def drv() -> str | None:
        try:
            return os.path.basename(sim.readlink(f"{dev}/driver"))
        except OSError:
            return None

    sim.write(f"{dev}/driver_override", VFIO)
    sim.write(f"bus/pci/drivers/{orig}/unbind", bdf)
    sim.write("bus/pci/drivers_probe", bdf)
    if drv() != VFIO:
        raise RuntimeError(f"{bdf} did not bind to vfio-pci (driver {drv()})")
    sim.write(f"{dev}/driver_override", "\n")
    sim.write(f"bus/pci/drivers/{VFIO}/unbind", bdf)
    sim.write("bus/pci/drivers_probe", bdf)
    if drv() != orig:
        raise RuntimeError(f"{bdf} did not return to {orig} (driver {drv()})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=1000, help="timed prepare/release cycles (default 1000)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed cycles first (default 10)")
    ap.add_argument("--device", default="0000:01:00.0", help="device to cycle (default nic1, 0000:01:00.0)")
    ap.add_argument("--topology", default=str(TOPOLOGY), help="SimKernel spec (default tests/topologies/lab.json)")
    ap.add_argument("--state-dir", help="parent of the temporary ledger dir (default: $TMPDIR)")
    ap.add_argument("--leak-cycles", type=int, default=200, help=(
        "after the timed run, this many more cycles under tracemalloc to tell a Python-level "
        "leak from allocator noise in RSS (default 200; 0 skips)"))
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    ap.add_argument("--save", action="store_true",
                    help="also write the JSON to bench/results/sim_cycles-<date>.json")
    args = ap.parse_args(argv)

    rss_start = rss_kib()
    addr = PciAddress.parse(args.device)
    bdf = str(addr)
    owner = Owner(name="bench-sim", kind="manual")

    with tempfile.TemporaryDirectory(prefix="hostdevd-sim-bench.", dir=args.state_dir) as tmp:
        # ---- hostdevd: Engine on the simulated kernel
        sim = SimKernel.from_file(args.topology)
        orig = sim.driver(bdf)
        cfg = Config(state_dir=tmp)
        store = TimedStore(tmp)
        eng = Engine(cfg, Sysfs(sim), store, modprobe=sim.load_module)

        def cycle() -> tuple[float, float]:
            t0 = time.perf_counter()
            eng.prepare([addr], owner)
            t1 = time.perf_counter()
            if sim.driver(bdf) != VFIO:
                raise RuntimeError(f"{bdf} is on {sim.driver(bdf)} after prepare")
            eng.release(owner)
            t2 = time.perf_counter()
            if sim.driver(bdf) != orig:
                raise RuntimeError(f"{bdf} is on {sim.driver(bdf)} after release")
            sim.write_log.clear()  # the sim's own observation log; not hostdevd's memory
            return t1 - t0, t2 - t1

        for _ in range(args.warmup):
            cycle()
        rss_warm = rss_kib()
        store.save_s = store.fsync_s = 0.0
        saves0 = store.saves
        prep, rel, tot = [], [], []
        t_all = time.perf_counter()
        for _ in range(args.cycles):
            p, r = cycle()
            prep.append(p)
            rel.append(r)
            tot.append(p + r)
        engine_wall = time.perf_counter() - t_all
        rss_end = rss_kib()
        saves = store.saves - saves0
        save_s, fsync_s = store.save_s, store.fsync_s
        # Untimed: Python-level allocations still alive after more cycles (a leak grows here).
        traced_growth = None
        if args.leak_cycles > 0:
            tracemalloc.start()
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(args.leak_cycles):
                cycle()
            gc.collect()  # cyclic garbage waiting for the collector is not a leak
            traced_growth = tracemalloc.get_traced_memory()[0] - before
            tracemalloc.stop()
        ledger_left = store.read().claims

        # ---- baseline: the same writes, raw, on a fresh simulated kernel
        raw_sim = SimKernel.from_file(args.topology)
        raw_sim.load_module("vfio_pci")  # hostdevd's first prepare did this (warm-up)
        for _ in range(args.warmup):
            raw_cycle(raw_sim, bdf, orig)
            raw_sim.write_log.clear()
        raw = []
        for _ in range(args.cycles):
            t0 = time.perf_counter()
            raw_cycle(raw_sim, bdf, orig)
            raw.append(time.perf_counter() - t0)
            raw_sim.write_log.clear()
        state_fs = fs_type(tmp)

    if ledger_left:
        raise RuntimeError(f"claims left in the ledger: {ledger_left}")

    e, b = stats(tot), stats(raw)
    result = {
        "benchmark": "sim_cycles",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "source": source_info(),
        "topology": os.path.relpath(args.topology, REPO),
        "device": bdf,
        "cycles": args.cycles,
        "warmup": args.warmup,
        "state_dir_fs": state_fs,
        "engine": {"cycle": e, "prepare": stats(prep), "release": stats(rel), "wall_s": engine_wall},
        "raw": {"cycle": b},
        "ratio_engine_over_raw": e["median_s"] / b["median_s"],
        "ledger": {
            "saves_per_cycle": saves / args.cycles,
            "save_s_per_cycle": save_s / args.cycles,
            "fsync_s_per_cycle": fsync_s / args.cycles,
            "save_share_of_engine_time": save_s / engine_wall,
            "fsync_share_of_engine_time": fsync_s / engine_wall,
        },
        "rss_kib": {"start": rss_start["VmRSS"], "after_warmup": rss_warm["VmRSS"],
                    "after_cycles": rss_end["VmRSS"], "peak": rss_end["VmHWM"],
                    "growth_during_cycles": rss_end["VmRSS"] - rss_warm["VmRSS"]},
        "tracemalloc": {"cycles": args.leak_cycles,
                        "net_growth_bytes": traced_growth},
    }
    if args.save:
        out = REPO / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"sim_cycles-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"written {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    ms = lambda s: f"{s * 1e3:8.3f} ms"  # noqa: E731
    led = result["ledger"]
    rss = result["rss_kib"]
    print(f"sim_cycles: {args.cycles} prepare/release cycles of {bdf} on {result['topology']} "
          f"(warm-up {args.warmup}; ledger on {state_fs})")
    print(f"  {'':24}{'median':>11}{'min':>12}{'max':>12}")
    for name, s in (("Engine cycle", e), ("  prepare", result["engine"]["prepare"]),
                    ("  release", result["engine"]["release"]), ("raw sim writes cycle", b)):
        print(f"  {name:24}{ms(s['median_s'])}  {ms(s['min_s'])}  {ms(s['max_s'])}")
    print(f"  Engine / raw (median cycle): {result['ratio_engine_over_raw']:.1f}x "
          f"(+{ms(e['median_s'] - b['median_s']).strip()} per cycle)")
    print(f"  ledger: {led['saves_per_cycle']:.0f} saves/cycle, {ms(led['save_s_per_cycle']).strip()} per cycle "
          f"= {led['save_share_of_engine_time']:.0%} of Engine time; fsync alone "
          f"{ms(led['fsync_s_per_cycle']).strip()} = {led['fsync_share_of_engine_time']:.0%}")
    print(f"  RSS: start {rss['start'] / 1024:.1f} MiB, after warm-up {rss['after_warmup'] / 1024:.1f} MiB, "
          f"after {args.cycles} cycles {rss['after_cycles'] / 1024:.1f} MiB "
          f"(growth during cycles {rss['growth_during_cycles']} KiB; peak {rss['peak'] / 1024:.1f} MiB)")
    if traced_growth is not None:
        print(f"  tracemalloc: {traced_growth / 1024:+.1f} KiB of live Python allocations after "
              f"{args.leak_cycles} more cycles")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
