#!/usr/bin/env python3
"""Soak a running nested L2 in one L1 and report whether L1's kernel stalled.

Why: under TCG, an L1 that runs a *live* nested L2 (KVM on emulated SVM) has hit RCU stalls and
soft lockups (lost timer wake-ups on a halted vCPU), which kill the guest agent and every lab
test after it. This boots one L1 with the given knobs, keeps an L2 running for --minutes while
hot-plugging nic1 in and out of it (what the hot-plug lab tests do), optionally with busy loops
on the host, and prints one JSON line: iterations, agent latency, stall lines from the serial log.

    tests/lab/soak_l2.py --minutes 8 --load 1
    L1_APPEND="idle=poll" tests/lab/soak_l2.py --minutes 8 --load 1
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import labvm
from test_lab_hotplug import L2_XML, SERIAL, hostdev_xml

STALL = re.compile(r"rcu: INFO|soft lockup|hung_task|timer wakeup didn't happen|BUG:")


def _burn(stop_at: float) -> None:
    while time.time() < stop_at:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=8)
    ap.add_argument("--load", type=int, default=0, help="busy-loop processes on the host")
    ap.add_argument("--smp", type=int, default=2)
    args = ap.parse_args()
    vm = labvm.LabVM(smp=args.smp)
    out = {"L1_APPEND": os.environ.get("L1_APPEND", ""), "L1_ACCEL": os.environ.get("L1_ACCEL", ""),
           "smp": args.smp, "load": args.load, "minutes": args.minutes}
    burners = []
    try:
        out["boot_s"] = round(vm.boot(), 1)
        # kvm_amd loads late in L1's boot and libvirtd caches "no KVM" until it restarts; without
        # this the L2 silently runs under TCG inside L1 and nested SVM is never exercised
        vm.run("for i in $(seq 60); do [ -c /dev/kvm ] && break; sleep 1; done; systemctl restart libvirtd",
               timeout=120)
        vt = vm.labsh("virt_type", timeout=60).stdout.strip()
        out["l2_virt_type"] = vt
        if vt != "kvm":
            raise RuntimeError(f"L2 would run as type {vt!r}, not kvm: nested SVM is not what is soaked")
        nic = vm.topology()["nic1"]  # alone in its group: libvirt can attach it without hostdevd
        vm.write_text("/root/l2hot.xml", L2_XML.format(vt=vt, serial=SERIAL))
        vm.write_text("/root/hd.xml", hostdev_xml(nic))
        t0 = time.monotonic()
        vm.run("virsh -q define /root/l2hot.xml && virsh -q start l2hot", timeout=300)
        vm.run(f"for i in $(seq 300); do grep -q L2-READY {SERIAL} 2>/dev/null && exit 0; sleep 1; done; exit 1",
               timeout=330)
        out["l2_boot_s"] = round(time.monotonic() - t0, 1)
        stop_at = time.time() + args.minutes * 60
        burners = [multiprocessing.Process(target=_burn, args=(stop_at,), daemon=True) for _ in range(args.load)]
        for b in burners:
            b.start()
        lat, cycles, errors = [], 0, []
        while time.time() < stop_at:
            t = time.monotonic()
            vm.run("true", timeout=120)
            lat.append(time.monotonic() - t)
            r = vm.run("virsh -q attach-device l2hot /root/hd.xml --live && sleep 3 && "
                       "virsh -q detach-device l2hot /root/hd.xml --live && "
                       "for i in $(seq 30); do virsh dumpxml l2hot | grep -q \"<hostdev\" || exit 0; sleep 1; done; "
                       "exit 1",
                       timeout=300, check=False)
            if r.rc != 0:
                errors.append(str(r)[-300:])
                if len(errors) > 3:
                    break
            cycles += 1
        lat.sort()
        out.update(cycles=cycles, errors=errors, agent_ms_p50=round(lat[len(lat) // 2] * 1000),
                   agent_ms_max=round(lat[-1] * 1000))
    except Exception as e:
        out["exception"] = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        for b in burners:
            b.terminate()
        stalls = [ln for ln in vm.serial_log.read_text(errors="replace").splitlines() if STALL.search(ln)]
        out["stalls"] = len(stalls)
        out["first_stall"] = stalls[0][:160] if stalls else None
        out["serial_log"] = str(vm.serial_log)
        vm.stop(force=True)
    print(json.dumps(out))
    return 1 if out["stalls"] or "exception" in out else 0


if __name__ == "__main__":
    sys.exit(main())
