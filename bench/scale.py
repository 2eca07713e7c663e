#!/usr/bin/env python3
"""Cost against host size (issue 13): every benchmark here reports ratios within one run.

Each ``bench_*`` function returns a dict; ``bench/run_all.py`` runs them all, writes one JSON file
to bench/results/ and prints a table. This is a benchmark, never a test: nothing here asserts a
time. The simulated kernel (hostdevd.sim) stands in for the host; ``bench/hostgen.py`` grows the
lab topology to 256, 1,024 or 4,096 PCI functions.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from hostgen import extra_devices, host_spec  # bench/ is sys.path[0]

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "daemon"))

PY = sys.executable
ENV = dict(os.environ, PYTHONPATH=str(REPO / "daemon"))
CLI = [PY, "-m", "hostdevd.doors.cli"]
DAEMON = [PY, "-m", "hostdevd.doors.daemon_main"]


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def stats(samples: list[float]) -> dict:
    return {"p50": round(pct(samples, 50), 2), "p99": round(pct(samples, 99), 2),
            "min": round(min(samples), 2), "max": round(max(samples), 2), "n": len(samples)}


def spec_file(functions: int, work: Path) -> Path:
    path = work / f"host{functions}.json"
    if not path.exists():
        path.write_text(json.dumps(host_spec(functions)))
    return path


# --------------------------------------------------------------------------- engine cycles
def bench_engine_cycles(sizes: tuple[int, ...] = (256, 1024, 4096), cycles: int = 9) -> dict:
    """Engine.prepare + release of one device per cycle, on hosts of each size (one process)."""
    from hostdevd.core.address import PciAddress
    from hostdevd.core.config import Config
    from hostdevd.core.engine import Engine
    from hostdevd.core.ledger import Owner
    from hostdevd.core.ledger_store import LedgerStore
    from hostdevd.core.sysfs import Sysfs
    from hostdevd.sim.simkernel import SimKernel

    out: dict = {"cycles": cycles, "sizes": {}}
    for n in sizes:
        spec = host_spec(n)
        k = SimKernel.from_spec(spec)
        k.write_log = []
        state = tempfile.mkdtemp(prefix="hdbs")
        try:
            store = LedgerStore(state)
            eng = Engine(Config(), Sysfs(k), store, modprobe=k.load_module)
            dev = PciAddress.parse(extra_devices(spec, 1)[0])
            owner = Owner(name="bench", uuid="00000000-0000-0000-0000-0000000be7c0")
            eng.prepare([dev], owner)          # warm-up: loads vfio-pci, builds caches
            eng.release(owner)
            prep, rel, cyc = [], [], []
            saves0, durable0 = store.saves, getattr(store, "durable_saves", store.saves)
            fsyncs0 = getattr(store, "fsyncs", 2 * store.saves)
            for _ in range(cycles):
                t0 = time.perf_counter()
                eng.prepare([dev], owner)
                t1 = time.perf_counter()
                eng.release(owner)
                t2 = time.perf_counter()
                prep.append((t1 - t0) * 1000)
                rel.append((t2 - t1) * 1000)
                cyc.append((t2 - t0) * 1000)
                k.write_log.clear()
            assert k.driver(dev) == "e1000e"
            out["sizes"][str(n)] = {"functions": len(k.devices), "prepare_ms": stats(prep),
                                    "release_ms": stats(rel), "cycle_ms": stats(cyc),
                                    "ledger_saves_per_cycle": (store.saves - saves0) / cycles,
                                    # saves with the directory fsynced too (intents; before issue 13:
                                    # every save)
                                    "ledger_fsynced_saves_per_cycle":
                                        (getattr(store, "durable_saves", store.saves) - durable0) / cycles,
                                    # fsync calls: the data of every save, the directory of intents
                                    # (before issue 13: both, every save)
                                    "ledger_fsyncs_per_cycle":
                                        (getattr(store, "fsyncs", 2 * store.saves) - fsyncs0) / cycles}
        finally:
            shutil.rmtree(state, ignore_errors=True)
    p50 = [v["cycle_ms"]["p50"] for v in out["sizes"].values()]
    out["ratio_largest_to_smallest"] = round(p50[-1] / p50[0], 2)
    return out


# --------------------------------------------------------------------------- the daemon
class Daemon:
    """``hostdevd run --no-libvirt --sim SPEC`` in a child; READY=1 timed through $NOTIFY_SOCKET."""

    def __init__(self, spec: Path, work: Path, log_level: str = "WARNING"):
        self.work = Path(tempfile.mkdtemp(prefix="hdd", dir=work))
        self.sock = str(self.work / "run" / "hostdevd.sock")
        notify_path = str(self.work / "notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(notify_path)
        self.notify.settimeout(300)
        env = dict(ENV, NOTIFY_SOCKET=notify_path)
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(DAEMON + ["run", "--no-libvirt", "--sim", str(spec), "--state-dir",
                                               str(self.work / "state"), "--runtime-dir", str(self.work / "run"),
                                               "--log-level", log_level], env=env,
                                             stderr=open(self.work / "daemon.log", "wb"))
        self.ready_ms = -1.0
        while True:
            msg = self.notify.recv(4096).decode()
            if "READY=1" in msg:
                self.ready_ms = (time.perf_counter() - self.t0) * 1000
                break
        # Keep reading STATUS= updates as systemd does: python-systemd's notify() blocks on a full
        # datagram queue without releasing the GIL, which would freeze the whole daemon.
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        self.notify.settimeout(None)
        try:
            while self.notify.recv(4096):
                pass
        except OSError:
            pass

    def call(self, req: dict, timeout: float = 120) -> dict:
        from hostdevd.doors import wire
        return wire.call(self.sock, req, timeout=timeout)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.notify.close()
        shutil.rmtree(self.work, ignore_errors=True)

    def log_tail(self) -> str:
        try:
            return (self.work / "daemon.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""


def timed(argv: list[str], stdin: str = "", env: dict | None = None) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env)
    dt = (time.perf_counter() - t0) * 1000
    if r.returncode != 0:
        raise SystemExit(f"{argv} failed ({r.returncode}): {r.stderr[-2000:]}")
    return dt


def domain_xml(name: str, addr: str) -> str:
    dom, rest = addr.split(":", 1)
    bus, rest = rest.split(":")
    slot, fn = rest.split(".")
    return (f"<domain type='kvm'><name>{name}</name><devices><hostdev mode='subsystem' type='pci' "
            f"managed='yes'><source><address domain='0x{dom}' bus='0x{bus}' slot='0x{slot}' "
            f"function='0x{fn}'/></source></hostdev></devices></domain>")


def bench_hook(work: Path, calls: int = 30) -> dict:
    """libvirt's hook, a fresh process per call as libvirt runs it: ``prepare begin`` with one
    hostdev (through the daemon) against a bare ``python -IS -c pass`` in the same run."""
    from hostdevd.doors.daemon_main import hook_script
    spec = REPO / "tests" / "topologies" / "lab.json"
    d = Daemon(spec, work)
    try:
        hook = d.work / "hook"
        hook.write_text(hook_script(d.sock))
        hook.chmod(0o755)
        xml = domain_xml("bench", "0000:01:00.0")
        base, prep, rel = [], [], []
        for _ in range(calls):        # interleaved: the lab's load hits both alike
            base.append(timed([PY, "-IS", "-c", "pass"]))
            prep.append(timed([str(hook), "bench", "prepare", "begin", "-"], xml))
            rel.append(timed([str(hook), "bench", "release", "end", "-"], xml))
    except SystemExit:
        print(d.log_tail(), file=sys.stderr)
        raise
    finally:
        d.stop()
    return {"calls": calls, "interpreter_ms": stats(base), "hook_prepare_ms": stats(prep),
            "hook_release_ms": stats(rel),
            "ratio_prepare_p50_to_interpreter": round(pct(prep, 50) / pct(base, 50), 2),
            "ratio_release_p50_to_interpreter": round(pct(rel, 50) / pct(base, 50), 2)}


def materialize(spec: Path, root: Path) -> Path:
    """The simulated /sys as real files and symlinks (RealHost reads it like /sys)."""
    from hostdevd.sim.materialize import write_sys_tree
    from hostdevd.sim.simkernel import SimKernel
    k = SimKernel.from_file(spec)
    sys_root = root / "sys"
    if (root / "done").exists():
        return sys_root
    shutil.rmtree(root, ignore_errors=True)

    write_sys_tree(k, sys_root)
    (root / "done").write_text("")
    return sys_root


def bench_startup(work: Path, functions: int = 4096, runs: int = 7) -> dict:
    """``hostdevctl --version`` and ``hostdevctl groups`` (a materialised 4,096-function /sys)
    and the daemon's READY=1 on the simulated 4,096-function host, each against a bare
    ``python -IS -c pass`` in the same run."""
    spec = spec_file(functions, work)
    sys_root = materialize(spec, work / f"sys{functions}")
    state = work / "cli-state"
    base, version, groups, ready = [], [], [], []
    for _ in range(runs):
        base.append(timed([PY, "-IS", "-c", "pass"]))
        version.append(timed(CLI + ["--version"], env=ENV))
        groups.append(timed(CLI + ["--sysfs-root", str(sys_root), "--state-dir", str(state), "groups"], env=ENV))
    for _ in range(max(1, runs // 3)):
        d = Daemon(spec, work)
        ready.append(d.ready_ms)
        d.stop()
    b = pct(base, 50)
    return {"functions": functions, "interpreter_ms": stats(base), "version_ms": stats(version),
            "groups_ms": stats(groups), "daemon_ready_ms": stats(ready),
            "ratio_version_to_interpreter": round(pct(version, 50) / b, 2),
            "ratio_groups_to_interpreter": round(pct(groups, 50) / b, 2),
            "ratio_ready_to_interpreter": round(pct(ready, 50) / b, 2)}


def bench_concurrent(work: Path, domains: int = 64, groups: int = 1024) -> dict:
    """``domains`` domains prepare at once through the socket, each its own group, on a host of
    ``groups`` added groups; then release at once. Per-request latency and the total."""
    spec_d = host_spec(groups * 3 // 2 + 64)
    spec = work / f"host{groups}groups.json"
    spec.write_text(json.dumps(spec_d))
    addrs = extra_devices(spec_d, domains)
    d = Daemon(spec, work)
    try:
        def run(op: str) -> tuple[list[float], float]:
            lat = [0.0] * domains
            errs: list[str] = []
            barrier = threading.Barrier(domains)

            def one(i: int) -> None:
                dom = {"name": f"vm{i}", "uuid": f"00000000-0000-0000-0000-{i:012x}"}
                req = {"op": op, "domain": dom, **({"addresses": [addrs[i]]} if op == "prepare" else {})}
                barrier.wait()
                t0 = time.perf_counter()
                r = d.call(req, timeout=600)
                lat[i] = (time.perf_counter() - t0) * 1000
                if not r.get("ok"):
                    errs.append(str(r)[:300])
            ts = [threading.Thread(target=one, args=(i,)) for i in range(domains)]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            total = (time.perf_counter() - t0) * 1000
            if errs:
                raise SystemExit(f"{op} failed: {errs[:3]}")
            return lat, total
        # one domain alone first: what a request costs without company
        solo = []
        for _ in range(3):
            t0 = time.perf_counter()
            assert d.call({"op": "prepare", "domain": {"name": "solo"}, "addresses": [addrs[0]]})["ok"]
            solo.append((time.perf_counter() - t0) * 1000)
            assert d.call({"op": "release", "domain": {"name": "solo"}})["ok"]
        plat, ptotal = run("prepare")
        rlat, rtotal = run("release")
    finally:
        d.stop()
    return {"domains": domains, "groups": groups, "solo_prepare_ms": stats(solo),
            "prepare_latency_ms": stats(plat), "prepare_total_ms": round(ptotal, 1),
            "release_latency_ms": stats(rlat), "release_total_ms": round(rtotal, 1),
            "ratio_total_to_64_solo": round(ptotal / (domains * pct(solo, 50)), 2)}


def bench_reconcile(claims: int = 1000, runs: int = 2) -> dict:
    """Reconciliation at start with ``claims`` active claims whose domains all run (each pass
    finds every claim consistent: it reads, decides, and writes nothing)."""
    from hostdevd.core.address import PciAddress
    from hostdevd.core.config import Config
    from hostdevd.core.engine import Engine
    from hostdevd.core.ledger import Claim, DeviceRecord, Ledger, Owner
    from hostdevd.core.ledger_store import LedgerStore
    from hostdevd.core.reconcile import RunningDomain
    from hostdevd.core.states import ClaimState, DeviceState
    from hostdevd.core.sysfs import Sysfs
    from hostdevd.sim.simkernel import SimKernel

    spec = host_spec(claims * 3 // 2 + 64)
    k = SimKernel.from_spec(spec)
    k.load_module("vfio_pci")
    k.write_log = []
    ledger = Ledger()
    running = []
    by_group: dict[int, list[str]] = {}
    for dev in spec["devices"]:
        if isinstance(dev.get("group"), int) and dev["group"] >= 1000:
            by_group.setdefault(dev["group"], []).append(dev["address"])
    for i, (g, members) in enumerate(sorted(by_group.items())[:claims]):
        owner = Owner(name=f"vm{i}", uuid=f"00000000-0000-0000-0000-{i:012x}")
        recs = []
        for j, a in enumerate(members):
            k.write(f"bus/pci/devices/{a}/driver_override", "vfio-pci")
            k.write("bus/pci/drivers/e1000e/unbind", a)
            k.write("bus/pci/drivers_probe", a)
            recs.append(DeviceRecord(address=a, role="requested" if j == 0 else "companion", state=DeviceState.VFIO,
                                     original_driver="e1000e", original_override=None, bound_by_us=True,
                                     vendor_device="8086:10d3", subsystem=None))
        ledger.put(Claim(group=g, owner=owner, state=ClaimState.ACTIVE, devices=recs, boot_id=k.boot_id))
        running.append(RunningDomain(owner.name, owner.uuid, [PciAddress.parse(members[0])]))
    k.write_log.clear()
    state = tempfile.mkdtemp(prefix="hdbr")
    try:
        store = LedgerStore(state)
        store.save(ledger)
        eng = Engine(Config(), Sysfs(k), store, modprobe=k.load_module)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            rep = eng.reconcile(running)
            times.append((time.perf_counter() - t0) * 1000)
            assert not rep.errors, rep.errors
        assert len(store.read().claims) == claims
    finally:
        shutil.rmtree(state, ignore_errors=True)
    return {"claims": claims, "functions": len(k.devices), "reconcile_ms": stats(times),
            "ms_per_claim": round(pct(times, 50) / claims, 3), "writes": len(k.write_log)}

