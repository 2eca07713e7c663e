"""timedcall: sysfs writes on reused helper threads, with a timeout, never queued behind a hung one."""
from __future__ import annotations

import threading
import time

from hostdevd.core.address import PciAddress
from hostdevd.core.sysfs import Sysfs
from hostdevd.core.timedcall import TimedCaller

from .conftest import load_sim


def test_sequential_calls_reuse_one_thread():
    tc = TimedCaller()
    seen = set()
    for _ in range(200):
        assert tc.call(lambda: seen.add(threading.current_thread().name), 5)
    assert tc.started == 1 and len(seen) == 1


def test_a_hung_call_times_out_and_later_calls_use_another_helper():
    tc = TimedCaller()
    gate, ran = threading.Event(), []
    assert tc.call(gate.wait, 0.05) is False                 # stuck "in the kernel"
    assert tc.call(lambda: ran.append(threading.current_thread().name), 5)
    assert tc.started == 2 and ran == ["timed-call-2"]
    gate.set()                                               # the stuck write returns at last...
    for _ in range(100):
        if tc.idle == 2:
            break
        threading.Event().wait(0.01)
    assert tc.idle == 2                                      # ...and its helper is reusable again
    assert tc.call(lambda: None, 5) and tc.started == 2


def test_concurrent_callers_never_wait_for_each_other():
    tc = TimedCaller(keep=2)
    gates = [threading.Event() for _ in range(3)]
    results = []
    threads = [threading.Thread(target=lambda g=g: results.append(tc.call(g.wait, 5))) for g in gates]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while tc.started < 3 and time.monotonic() < deadline:   # all three in flight: none can reuse
        time.sleep(0.01)
    for g in gates:
        g.set()
    for t in threads:
        t.join(5)
    assert results == [True, True, True] and tc.started == 3
    assert tc.idle == 2                                      # the third helper's thread ended


def test_an_exception_inside_the_call_still_releases_the_caller():
    tc = TimedCaller()

    def boom():
        raise RuntimeError("not caught by the caller's function")
    assert tc.call(boom, 5) is True
    assert tc.call(lambda: None, 5) and tc.started == 1


def test_sysfs_writes_do_not_start_a_thread_each(tmp_path):
    """The daemon's RSS crept with one thread per write; 300 writes now use one helper."""
    sysfs = Sysfs(load_sim("lab"), write_timeout=2.0)
    addr = PciAddress.parse("0000:01:00.0")          # the lab's nic1
    for _i in range(150):
        sysfs.set_driver_override(addr, "vfio-pci")
        sysfs.set_driver_override(addr, None)
    assert sysfs._writers.started == 1
