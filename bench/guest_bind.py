#!/opt/hostdevd/bin/python
"""Guest side of bench/lab_bind.py: runs inside the lab's L1 with /opt/hostdevd/bin/python.

Times, with time.perf_counter, moving lab NICs from their host driver to
vfio-pci and back in several ways (raw sysfs writes, virsh nodedev-detach /
nodedev-reattach, hostdevd's Engine in-process, the hostdevctl CLI), plus a
multifunction pair and four independent groups prepared in parallel and in
sequence. Every sample is a raw number; lab_bind.py on the host computes the
statistics.

    guest_bind.py --devices '{"nic1": "0000:01:00.0", ...}' --rounds 7 --out /root/bench.json
    guest_bind.py --devices '...' --restore        # only put every device back

Prints the result as JSON on stdout (and writes it to --out); progress goes to
stderr. Whatever happens, every device it touched is put back on its original
driver with its original driver_override before it exits (SIGTERM included).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

from hostdevd.core.address import PciAddress
from hostdevd.core.config import Config
from hostdevd.core.engine import Engine
from hostdevd.core.ledger import Owner
from hostdevd.core.ledger_store import LedgerStore
from hostdevd.core.sysfs import RealHost, Sysfs

SYS = "/sys/bus/pci/devices"
VFIO = "vfio-pci"
HCTL = "/opt/hostdevd/bin/hostdevctl"
# nic1 is a singleton group; nic2a's group also holds nic2b (multifunction); nic3a's holds
# the PCI bridge (skipped) and nic3b; nic4a's holds its switch downstream port (skipped).
WATCHED = ["nic1", "nic2a", "nic2b", "nic3a", "nic3b", "nic4a"]
GROUP_HEADS = ["nic1", "nic2a", "nic3a", "nic4a"]
COMPANIONS = {"nic1": [], "nic2a": ["nic2b"], "nic3a": ["nic3b"], "nic4a": []}
POLL = 0.001  # seconds between driver-link checks while waiting for a bind


def log(msg: str) -> None:
    sys.stderr.write(f"[guest_bind {time.monotonic() - T0:7.1f}s] {msg}\n")
    sys.stderr.flush()


T0 = time.monotonic()


# ------------------------------------------------------------------ raw sysfs
def drv(bdf: str) -> str | None:
    try:
        return os.path.basename(os.readlink(f"{SYS}/{bdf}/driver"))
    except OSError:
        return None


def override(bdf: str) -> str | None:
    with open(f"{SYS}/{bdf}/driver_override") as f:
        v = f.read().strip()
    return None if v in ("", "(null)") else v


def write(path: str, data: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def wait_driver(bdf: str, want: str | None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while drv(bdf) != want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{bdf}: driver is {drv(bdf)}, expected {want} after {timeout}s")
        time.sleep(POLL)


def raw_to_vfio(bdf: str) -> None:
    write(f"{SYS}/{bdf}/driver_override", VFIO)
    cur = drv(bdf)
    if cur is not None:
        write(f"/sys/bus/pci/drivers/{cur}/unbind", bdf)
    write("/sys/bus/pci/drivers_probe", bdf)
    wait_driver(bdf, VFIO)


def raw_to_host(bdf: str, orig: str) -> None:
    write(f"{SYS}/{bdf}/driver_override", "\n")
    cur = drv(bdf)
    if cur is not None:
        write(f"/sys/bus/pci/drivers/{cur}/unbind", bdf)
    write("/sys/bus/pci/drivers_probe", bdf)
    wait_driver(bdf, orig)


def restore(original: dict[str, tuple[str | None, str | None]]) -> list[str]:
    """Put every device back on its recorded driver and driver_override; return problems."""
    problems = []
    for bdf, (want_drv, want_ovr) in original.items():
        try:
            if override(bdf) != want_ovr:
                write(f"{SYS}/{bdf}/driver_override", want_ovr or "\n")
            if drv(bdf) != want_drv:
                cur = drv(bdf)
                if cur is not None:
                    write(f"/sys/bus/pci/drivers/{cur}/unbind", bdf)
                if want_drv is not None:
                    write("/sys/bus/pci/drivers_probe", bdf)
                    if drv(bdf) != want_drv:
                        write(f"/sys/bus/pci/drivers/{want_drv}/bind", bdf)
                wait_driver(bdf, want_drv, timeout=30)
        except Exception as e:  # keep restoring the others
            problems.append(f"{bdf}: {e}")
        now = (drv(bdf), override(bdf))
        if now != (want_drv, want_ovr):
            problems.append(f"{bdf}: is {now}, was {(want_drv, want_ovr)}")
    return problems


# ------------------------------------------------------------------ hostdevd
class TimedStore(LedgerStore):
    """Adds up the time spent saving the ledger (write temp, fsync, rename, fsync dir)."""

    def __init__(self, state_dir):
        super().__init__(state_dir)
        self.save_s = 0.0

    def save(self, ledger) -> None:
        t = time.perf_counter()
        try:
            super().save(ledger)
        finally:
            self.save_s += time.perf_counter() - t


def profile_cycles(eng: Engine, addr: PciAddress, owner: Owner, bdf: str, orig: str | None,
                   cycles: int = 3, top: int = 15) -> list[dict]:
    """Where an Engine cycle's time goes (cProfile, by own time): the kernel's work shows as the
    sysfs writes (posix.write) and the waits for the driver link, hostdevd's as the rest."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(cycles):
        eng.prepare([addr], owner)
        eng.release(owner)
    prof.disable()
    wait_driver(bdf, orig, timeout=0)
    stats = pstats.Stats(prof)
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = []
    for (fname, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"where": f"{os.path.basename(fname)}:{line}({func})", "calls": nc,
                     "own_ms": round(tt * 1000 / cycles, 2), "cum_ms": round(ct * 1000 / cycles, 2)})
    rows.sort(key=lambda r: -r["own_ms"])
    return [{"total_ms_per_cycle": round(total * 1000 / cycles, 2)}] + rows[:top]


def make_engine(state_dir: str) -> tuple[Engine, TimedStore]:
    cfg = Config(state_dir=state_dir)
    store = TimedStore(state_dir)
    return Engine(cfg, Sysfs(RealHost(cfg.sysfs_root), cfg.write_timeout), store), store


def hctl(*args: str) -> float:
    t = time.perf_counter()
    p = subprocess.run([HCTL, *args], capture_output=True, text=True, timeout=300)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"hostdevctl {' '.join(args)}: rc={p.returncode}\n{p.stdout}{p.stderr}")
    return dt


def virsh(*args: str) -> None:
    p = subprocess.run(["virsh", *args], capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"virsh {' '.join(args)}: rc={p.returncode}\n{p.stdout}{p.stderr}")


def nodedev(bdf: str) -> str:
    return "pci_" + bdf.replace(":", "_").replace(".", "_")


def cpu() -> tuple[float, float]:
    """(user, system) CPU seconds of this process so far. A sysfs bind runs the driver's
    probe()/remove() synchronously in the writing thread, so system time is mostly the
    kernel's work and user time is Python's."""
    t = os.times()
    return t.user, t.system


# ------------------------------------------------------------------ runner
class Bench:
    def __init__(self, devs: dict[str, str], rounds: int):
        self.devs = devs
        self.rounds = rounds
        self.original = {devs[n]: (drv(devs[n]), override(devs[n])) for n in WATCHED}
        for n in WATCHED:
            if self.original[devs[n]][0] in (None, VFIO):
                raise RuntimeError(f"{n} {devs[n]} is on {self.original[devs[n]][0]}; expected a host driver")
        self.orig_drv = {bdf: d for bdf, (d, _) in self.original.items()}
        self.samples: dict = {}
        self.extra: dict = {}
        self.errors: list[str] = []
        self.state_root = tempfile.mkdtemp(prefix="hostdevd-bench.", dir="/var/tmp")

    def sample(self, key: str, kind: str, value: float) -> None:
        self.samples.setdefault(key, {}).setdefault(kind, []).append(value)

    def rounds_of(self, key: str, fn) -> None:
        """One untimed warm-up round (recorded apart), then `rounds` timed rounds.

        fn() returns a dict kind -> seconds for one round."""
        log(f"{key}: warm-up")
        warm = fn()
        self.extra.setdefault("warmup", {})[key] = warm
        for _i in range(self.rounds):
            for kind, v in fn().items():
                self.sample(key, kind, v)
        med = {k: sorted(v)[len(v) // 2] for k, v in self.samples[key].items()}
        log(f"{key}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in med.items()))

    def phase(self, name: str, fn) -> None:
        try:
            fn()
        except Exception as e:
            self.errors.append(f"{name}: {e}")
            log(f"{name} FAILED: {traceback.format_exc()}")
            problems = restore(self.original)
            if problems:
                raise RuntimeError(f"after {name} failed, restoring failed too: {problems}") from e

    # ---- 1. raw sysfs, nic1
    def raw_nic1(self) -> None:
        bdf = self.devs["nic1"]

        def one() -> dict:
            c0 = cpu()
            t0 = time.perf_counter()
            raw_to_vfio(bdf)
            t1 = time.perf_counter()
            raw_to_host(bdf, self.orig_drv[bdf])
            t2 = time.perf_counter()
            c1 = cpu()
            return {"prepare": t1 - t0, "release": t2 - t1, "cycle": t2 - t0,
                    "cpu_user": c1[0] - c0[0], "cpu_sys": c1[1] - c0[1]}
        self.rounds_of("nic1.raw", one)

    # ---- 2. virsh nodedev-detach / nodedev-reattach, nic1
    def virsh_nic1(self) -> None:
        bdf = self.devs["nic1"]
        name = nodedev(bdf)
        self.extra["libvirtd_before_first_call"] = subprocess.run(
            ["systemctl", "is-active", "libvirtd"], capture_output=True, text=True).stdout.strip()
        t = time.perf_counter()
        virsh("nodedev-dumpxml", name)  # first libvirt call after boot: capability probing
        self.extra["virsh_first_call_s"] = time.perf_counter() - t
        log(f"virsh first call {self.extra['virsh_first_call_s']:.1f}s")

        def one() -> dict:
            t0 = time.perf_counter()
            virsh("nodedev-detach", name)
            wait_driver(bdf, VFIO)
            t1 = time.perf_counter()
            virsh("nodedev-reattach", name)
            wait_driver(bdf, self.orig_drv[bdf])
            t2 = time.perf_counter()
            return {"prepare": t1 - t0, "release": t2 - t1, "cycle": t2 - t0}
        self.rounds_of("nic1.virsh", one)
        t = time.perf_counter()
        virsh("nodedev-dumpxml", name)
        self.extra["virsh_noop_call_s"] = time.perf_counter() - t

    # ---- 3a. hostdevd Engine in-process, nic1
    def engine_nic1(self) -> None:
        bdf = self.devs["nic1"]
        eng, store = make_engine(os.path.join(self.state_root, "engine"))
        owner = Owner(name="bench-nic1")
        addr = PciAddress.parse(bdf)
        saves = []

        def one() -> dict:
            s0, st0 = store.saves, store.save_s
            c0 = cpu()
            try:
                t0 = time.perf_counter()
                eng.prepare([addr], owner)
                t1 = time.perf_counter()
                wait_driver(bdf, VFIO, timeout=0)
            finally:
                t2 = time.perf_counter()
                eng.release(owner)
                t3 = time.perf_counter()
            c1 = cpu()
            wait_driver(bdf, self.orig_drv[bdf], timeout=0)
            saves.append(store.saves - s0)
            return {"prepare": t1 - t0, "release": t3 - t2, "cycle": (t1 - t0) + (t3 - t2),
                    "ledger_save": store.save_s - st0, "cpu_user": c1[0] - c0[0], "cpu_sys": c1[1] - c0[1]}
        self.rounds_of("nic1.engine", one)
        self.extra["engine_ledger_saves_per_cycle"] = saves[-1]
        # Where the time goes: the two read-side scans every request makes.
        group = eng.sysfs.iommu_group(addr)
        topo, users = [], []
        for _ in range(self.rounds):
            t = time.perf_counter()
            eng.topology()
            topo.append(time.perf_counter() - t)
            t = time.perf_counter()
            eng.sysfs.vfio_group_users(group)
            users.append(time.perf_counter() - t)
        self.extra["engine_profile_top"] = profile_cycles(eng, addr, owner, bdf, self.orig_drv[bdf])
        self.samples["engine.topology_scan"] = {"once": topo}
        self.samples["engine.vfio_group_users_scan"] = {"once": users}
        self.extra["proc_count"] = sum(1 for p in os.listdir("/proc") if p.isdigit())

    # ---- 3b. hostdevctl CLI, nic1
    def cli_nic1(self) -> None:
        bdf = self.devs["nic1"]
        state = os.path.join(self.state_root, "cli")

        def one() -> dict:
            p = hctl("--state-dir", state, "prepare", "--device", bdf, "--owner", "bench-cli")
            wait_driver(bdf, VFIO, timeout=0)
            r = hctl("--state-dir", state, "release", "--owner", "bench-cli")
            wait_driver(bdf, self.orig_drv[bdf], timeout=0)
            return {"prepare": p, "release": r, "cycle": p + r}
        self.rounds_of("nic1.cli", one)
        self.rounds_of("cli.startup", lambda: {"once": hctl("--version")})

    # ---- 4. multifunction pair nic2a (+ nic2b)
    def pair(self) -> None:
        a, b = self.devs["nic2a"], self.devs["nic2b"]

        def raw() -> dict:
            t0 = time.perf_counter()
            raw_to_vfio(a)
            raw_to_vfio(b)
            t1 = time.perf_counter()
            raw_to_host(b, self.orig_drv[b])
            raw_to_host(a, self.orig_drv[a])
            t2 = time.perf_counter()
            return {"prepare": t1 - t0, "release": t2 - t1, "cycle": t2 - t0}
        self.rounds_of("pair.raw", raw)

        eng, _ = make_engine(os.path.join(self.state_root, "pair"))
        owner = Owner(name="bench-pair")

        def engine() -> dict:
            try:
                t0 = time.perf_counter()
                eng.prepare([PciAddress.parse(a)], owner)
                t1 = time.perf_counter()
                wait_driver(a, VFIO, timeout=0)
                wait_driver(b, VFIO, timeout=0)  # the companion followed
            finally:
                t2 = time.perf_counter()
                eng.release(owner)
                t3 = time.perf_counter()
            wait_driver(a, self.orig_drv[a], timeout=0)
            wait_driver(b, self.orig_drv[b], timeout=0)
            return {"prepare": t1 - t0, "release": t3 - t2, "cycle": (t1 - t0) + (t3 - t2)}
        self.rounds_of("pair.engine", engine)

    # ---- 5. four independent groups: parallel vs sequential
    def groups4(self) -> None:
        heads = [self.devs[n] for n in GROUP_HEADS]
        members = {self.devs[n]: [self.devs[n]] + [self.devs[c] for c in COMPANIONS[n]] for n in GROUP_HEADS}
        eng, _ = make_engine(os.path.join(self.state_root, "groups"))
        owners = {h: Owner(name=f"bench-g{i}") for i, h in enumerate(heads)}

        def run_all(fn, parallel: bool) -> float:
            """fn(head) for every head; wall seconds from the common start to the last finish."""
            if not parallel:
                t0 = time.perf_counter()
                for h in heads:
                    fn(h)
                return time.perf_counter() - t0
            errors: list[BaseException] = []
            gate = threading.Barrier(len(heads) + 1)

            def worker(h):
                gate.wait()
                try:
                    fn(h)
                except BaseException as e:
                    errors.append(e)
            threads = [threading.Thread(target=worker, args=(h,)) for h in heads]
            for t in threads:
                t.start()
            gate.wait()
            t0 = time.perf_counter()
            for t in threads:
                t.join()
            dt = time.perf_counter() - t0
            if errors:
                raise errors[0]
            return dt

        def check(want_vfio: bool) -> None:
            for h in heads:
                for m in members[h]:
                    wait_driver(m, VFIO if want_vfio else self.orig_drv[m], timeout=0)

        def eng_prepare(h):
            eng.prepare([PciAddress.parse(h)], owners[h])

        def eng_release(h):
            eng.release(owners[h])

        def raw_prepare(h):
            for m in members[h]:
                raw_to_vfio(m)

        def raw_release(h):
            for m in reversed(members[h]):
                raw_to_host(m, self.orig_drv[m])

        def cycle(prep, rel, parallel: bool) -> tuple[float, float, float, float]:
            c0 = cpu()
            try:
                p = run_all(prep, parallel)
                check(True)
            finally:
                r = run_all(rel, parallel)
            c1 = cpu()
            check(False)
            return p, r, c1[0] - c0[0], c1[1] - c0[1]

        def rounds(prep, rel):
            turn = [0]

            def one() -> dict:
                # Alternate which mode goes first so neither always runs on a warmer cache.
                turn[0] += 1
                out = {}
                for parallel in ((False, True) if turn[0] % 2 else (True, False)):
                    p, r, u, k = cycle(prep, rel, parallel)
                    m = "par" if parallel else "seq"
                    out.update({f"prepare_{m}": p, f"release_{m}": r, f"cycle_{m}": p + r,
                                f"cpu_user_{m}": u, f"cpu_sys_{m}": k})
                return out
            return one

        self.rounds_of("groups4.engine", rounds(eng_prepare, eng_release))
        self.rounds_of("groups4.raw", rounds(raw_prepare, raw_release))
        if eng.ledger().claims:
            raise RuntimeError(f"claims left: {eng.ledger().claims}")

    def meta(self) -> dict:
        def sh(cmd):
            try:
                return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout.strip()
            except Exception as e:
                return f"? ({e})"
        fs = "?"
        with open("/proc/self/mounts") as f:
            best = ""
            for line in f:
                p = line.split()
                if self.state_root.startswith(p[1].rstrip("/") + "/") and len(p[1]) >= len(best):
                    best, fs = p[1], p[2]
        import hostdevd
        return {
            "kernel": platform.release(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "libvirt": sh(["virsh", "--version"]),
            "hostdevd": getattr(hostdevd, "__version__", "?"),
            "state_dir": self.state_root,
            "state_dir_fs": fs,
            "cmdline": open("/proc/cmdline").read().strip(),
            "devices": {n: self.devs[n] for n in WATCHED},
            "original": {b: list(v) for b, v in self.original.items()},
            "groups": {n: int(os.path.basename(os.readlink(f"{SYS}/{self.devs[n]}/iommu_group")))
                       for n in WATCHED},
            "rounds": self.rounds,
            "poll_s": POLL,
        }

    def run(self, only: set[str] | None) -> dict:
        steps = [("raw", self.raw_nic1), ("virsh", self.virsh_nic1), ("engine", self.engine_nic1),
                 ("cli", self.cli_nic1), ("pair", self.pair), ("groups4", self.groups4)]
        meta = self.meta()
        for name, fn in steps:
            if only and name not in only:
                continue
            self.phase(name, fn)
        return {"meta": meta, "samples": self.samples, "extra": self.extra, "errors": self.errors}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", required=True, help="JSON: lab name -> BDF (LabVM.topology())")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--only", help="comma-separated phases: raw,virsh,engine,cli,pair,groups4")
    ap.add_argument("--out", help="also write the JSON result here")
    ap.add_argument("--restore", action="store_true",
                    help="only restore: every watched device back to e1000e/e1000, override cleared")
    args = ap.parse_args()
    devs = json.loads(args.devices)
    # SIGTERM (the agent's `timeout`) must still run the restore in the finally below.
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))

    if args.restore:
        want = {"e1000e": "e1000e", "e1000": "e1000"}
        original = {}
        for n in WATCHED:
            bdf = devs[n]
            with open(f"{SYS}/{bdf}/vendor") as f1, open(f"{SYS}/{bdf}/device") as f2:
                vd = (f1.read().strip(), f2.read().strip())
            original[bdf] = (want["e1000" if vd == ("0x8086", "0x100e") else "e1000e"], None)
        problems = restore(original)
        print(json.dumps({"restored": not problems, "problems": problems}))
        return 1 if problems else 0

    bench = Bench(devs, args.rounds)
    result = None
    try:
        result = bench.run(set(args.only.split(",")) if args.only else None)
    finally:
        problems = restore(bench.original)
        shutil.rmtree(bench.state_root, ignore_errors=True)
        if result is not None:
            result["restore_problems"] = problems
        if problems:
            log(f"RESTORE PROBLEMS: {problems}")
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0 if not result["errors"] and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
