#!/usr/bin/env python3
"""Daemon benchmark on the simulated kernel (one process tree, one run; ratios, not asserts).

* Hook round trip, p50/p99 over N calls (default 200), for a domain without host devices
  (the hook answers without contacting the daemon) and with one hostdev (prepare begin,
  then release end, through the daemon), as libvirt runs it: a fresh process per call.
  Baseline in the same run: the bare interpreter start-up (`python -IS -c pass`), which
  bounds what any Python hook can cost.
* Daemon RSS (VmRSS of the daemon process) after start and after 1,000 prepare/release
  cycles through the socket.

    python bench/daemon_bench.py [--calls 200] [--cycles 1000]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "daemon"))

from hostdevd.doors import wire  # noqa: E402
from hostdevd.doors.daemon_main import hook_script  # noqa: E402

NIC = "0000:01:00.0"  # lab topology: the singleton e1000e
NO_HOSTDEV = "<domain type='kvm'><name>plain</name><devices><disk type='file'/></devices></domain>"
ONE_HOSTDEV = ("<domain type='kvm'><name>bench</name><uuid>00000000-0000-0000-0000-00000000be0c</uuid>"
               "<devices><hostdev mode='subsystem' type='pci' managed='yes'><source>"
               "<address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source></hostdev>"
               "</devices></domain>")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def timed(argv: list[str], stdin: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{argv} failed: {r.stderr}")
    return dt * 1000


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--cycles", type=int, default=1000)
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="hdb", dir="/tmp"))
    run_dir, state = base / "run", base / "state"
    sock = str(run_dir / "hostdevd.sock")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "daemon"))
    daemon = subprocess.Popen([sys.executable, "-m", "hostdevd.doors.daemon_main", "run", "--no-libvirt",
                               "--sim", str(ROOT / "tests/topologies/lab.json"), "--state-dir", str(state),
                               "--runtime-dir", str(run_dir), "--log-level", "WARNING"], env=env,
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                if wire.call(sock, {"op": "ping"}, timeout=2).get("ok"):
                    break
            except wire.WireError:
                time.sleep(0.05)
        time.sleep(0.5)
        rss_start = rss_kib(daemon.pid)
        hook = base / "hook"
        hook.write_text(hook_script(sock))
        hook.chmod(0o755)

        baseline = [timed([sys.executable, "-IS", "-c", "pass"], "") for _ in range(a.calls)]
        plain = [timed([str(hook), "plain", "prepare", "begin", "-"], NO_HOSTDEV) for _ in range(a.calls)]
        prep, rel = [], []
        for _ in range(a.calls):
            prep.append(timed([str(hook), "bench", "prepare", "begin", "-"], ONE_HOSTDEV))
            rel.append(timed([str(hook), "bench", "release", "end", "-"], ONE_HOSTDEV))

        # RSS after the hook calls (every code path warm), then after each half of the cycles:
        # a leak grows in both halves alike; warm-up and allocator settling do not
        rss_warm = rss_kib(daemon.pid)
        dom = {"name": "cycle", "uuid": "00000000-0000-0000-0000-0000000c1c1e"}
        t0 = time.perf_counter()
        rss_half = rss_warm
        for i in range(a.cycles):
            r = wire.call(sock, {"op": "prepare", "domain": dom, "addresses": ["0000:04:00.0"]}, timeout=30)
            assert r["ok"], r
            r = wire.call(sock, {"op": "release", "domain": dom}, timeout=30)
            assert r["ok"], r
            if i + 1 == a.cycles // 2:
                rss_half = rss_kib(daemon.pid)
        cycle_ms = (time.perf_counter() - t0) * 1000 / a.cycles
        rss_end = rss_kib(daemon.pid)
    finally:
        daemon.terminate()
        daemon.wait(10)

    res = {
        "calls": a.calls, "cycles": a.cycles,
        "interpreter_start_ms": {"p50": round(pct(baseline, 50), 1), "p99": round(pct(baseline, 99), 1)},
        "hook_no_hostdev_ms": {"p50": round(pct(plain, 50), 1), "p99": round(pct(plain, 99), 1)},
        "hook_prepare_one_hostdev_ms": {"p50": round(pct(prep, 50), 1), "p99": round(pct(prep, 99), 1)},
        "hook_release_one_hostdev_ms": {"p50": round(pct(rel, 50), 1), "p99": round(pct(rel, 99), 1)},
        "ratio_hook_no_hostdev_to_interpreter": round(statistics.median(plain) / statistics.median(baseline), 2),
        "ratio_hook_prepare_to_interpreter": round(statistics.median(prep) / statistics.median(baseline), 2),
        "socket_cycle_ms": round(cycle_ms, 2),
        "daemon_rss_kib": {"after_start": rss_start, "after_hook_calls": rss_warm,
                           f"after_{a.cycles // 2}_cycles": rss_half, f"after_{a.cycles}_cycles": rss_end,
                           "growth_ratio": round(rss_end / rss_start, 3),
                           "first_half_kib": rss_half - rss_warm, "second_half_kib": rss_end - rss_half},
    }
    print(json.dumps(res, indent=2))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / f"daemon_bench-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
