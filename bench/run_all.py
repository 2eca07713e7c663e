#!/usr/bin/env python3
"""Every issue-13 benchmark in one run: one JSON file in bench/results/, one table.

    nice -n 19 .venv/bin/python bench/run_all.py            # everything (~5-10 min on 2 busy cores)
    .venv/bin/python bench/run_all.py --only engine,hook    # some of them
    .venv/bin/python bench/run_all.py --quick               # fewer samples, for a smoke run
    .venv/bin/python bench/run_all.py --lab                 # and the lab's (bench/lab_bind.py: boots L1)

Benchmarks, not tests: nothing asserts a time. The machine is shared and noisy, so compare the
ratios within one run (the project's rule), not milliseconds across runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale
from benchutil import source_info

ALL = ("engine", "hook", "startup", "concurrent", "reconcile")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    ap.add_argument("--quick", action="store_true", help="fewer samples")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "hostdevd-bench"),
                    help="where generated hosts (and the materialised /sys) are kept between runs")
    ap.add_argument("--reconcile-claims", type=int, default=1000, help="claims in the reconciliation benchmark")
    ap.add_argument("--label", default="", help="a word for the result file name (before, after, ...)")
    ap.add_argument("--lab", action="store_true",
                    help="also the lab's: engine cycle / raw sysfs writes and 4 groups in parallel / one after "
                         "another, in the nested-VM lab (bench/lab_bind.py, one L1 boot, about 7 minutes)")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    only = [x for x in a.only.split(",") if x]
    res: dict = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": {
        "cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_start": os.getloadavg(),
        "note": "shared 2-core machine with a nested-QEMU lab running: compare ratios within one run"},
        "source": source_info(), "results": {}}
    q = a.quick
    runs = {
        "engine": lambda: scale.bench_engine_cycles(cycles=3 if q else 9),
        "hook": lambda: scale.bench_hook(work, calls=10 if q else 30),
        "startup": lambda: scale.bench_startup(work, runs=3 if q else 7),
        "concurrent": lambda: scale.bench_concurrent(work),
        "reconcile": lambda: scale.bench_reconcile(a.reconcile_claims),
    }
    for name in only:
        t0 = time.perf_counter()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        res["results"][name] = runs[name]()
        res["results"][name]["wall_s"] = round(time.perf_counter() - t0, 1)
    res["host"]["loadavg_end"] = os.getloadavg()
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    path = out / f"scale-{time.strftime('%Y%m%d-%H%M%S')}{'-' + a.label if a.label else ''}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(table(res["results"]))
    print(f"written {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    if a.lab:       # its own JSON file and table (lab_bind-<date>.json): the ratios are within that run
        return subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "lab_bind.py"),
                               "--rounds", "3" if q else "5"]).returncode
    return 0


def table(r: dict) -> str:
    rows = []
    if "engine" in r:
        e = r["engine"]
        for v in e["sizes"].values():
            rows.append((f"engine cycle, {v['functions']} functions", f"{v['cycle_ms']['p50']} ms",
                         f"{v['ledger_saves_per_cycle']:g} saves, "
                         f"{v.get('ledger_fsynced_saves_per_cycle', v['ledger_saves_per_cycle']):g} durable, "
                         f"{v.get('ledger_fsyncs_per_cycle', 2 * v['ledger_saves_per_cycle']):g} fsyncs"))
        rows.append(("engine cycle largest/smallest host", f"{e['ratio_largest_to_smallest']}x", "goal <= 1.3"))
    if "hook" in r:
        h = r["hook"]
        rows.append(("hook prepare begin (1 hostdev) p50", f"{h['hook_prepare_ms']['p50']} ms",
                     f"{h['ratio_prepare_p50_to_interpreter']}x python -IS (goal <= 3)"))
        rows.append(("hook release end p50", f"{h['hook_release_ms']['p50']} ms",
                     f"{h['ratio_release_p50_to_interpreter']}x python -IS"))
    if "startup" in r:
        s = r["startup"]
        rows.append(("python -IS -c pass p50", f"{s['interpreter_ms']['p50']} ms", "1x"))
        rows.append(("hostdevctl --version p50", f"{s['version_ms']['p50']} ms",
                     f"{s['ratio_version_to_interpreter']}x"))
        rows.append((f"hostdevctl groups ({s['functions']} fn) p50", f"{s['groups_ms']['p50']} ms",
                     f"{s['ratio_groups_to_interpreter']}x"))
        rows.append((f"hostdevd READY ({s['functions']} fn) p50", f"{s['daemon_ready_ms']['p50']} ms",
                     f"{s['ratio_ready_to_interpreter']}x"))
    if "concurrent" in r:
        c = r["concurrent"]
        rows.append((f"{c['domains']} concurrent prepares, {c['groups']} groups",
                     f"p50 {c['prepare_latency_ms']['p50']} / p99 {c['prepare_latency_ms']['p99']} ms",
                     f"total {c['prepare_total_ms']} ms = {c['ratio_total_to_64_solo']}x 64 solo"))
        rows.append((f"{c['domains']} concurrent releases",
                     f"p50 {c['release_latency_ms']['p50']} / p99 {c['release_latency_ms']['p99']} ms",
                     f"total {c['release_total_ms']} ms"))
    if "reconcile" in r:
        c = r["reconcile"]
        rows.append((f"reconcile {c['claims']} claims", f"{c['reconcile_ms']['p50']} ms",
                     f"{c['ms_per_claim']} ms/claim"))
    w = [max(len(x[i]) for x in rows) for i in range(3)]
    return "\n".join(f"{a:<{w[0]}}  {b:>{w[1]}}  {c}" for a, b, c in rows)


if __name__ == "__main__":
    sys.exit(main())
