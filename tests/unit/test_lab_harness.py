"""The lab harness's L1 stall watcher (tests/lab/labvm.py), without booting anything.

When L1's kernel reports a stall, its guest agent is as good as dead. The watcher must cut the
agent connection (so the command in flight fails at once) and refuse every later command with
the stall line, so the lab fails fast and run-tests.sh can tell an emulator stall from a bug.
"""
from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lab"))
import labvm

# lines copied from L1 serial logs of the kernel failures seen in the lab
REAL_STALLS = [
    "[  219.337580] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:",
    "[  219.341316] rcu: rcu_preempt kthread timer wakeup didn't happen for 5254 jiffies! g39849 f0x0",
    "[  300.981544] watchdog: BUG: soft lockup - CPU#0 stuck for 45s! [libvirtd:1652]",
    "[  276.689539] rcu: rcu_preempt kthread starved for 5252 jiffies! g78505 f0x2 RCU_GP_WAIT_FQS(5)",
    # 2026-11-25, L1's KVM vCPU thread while an L2 booted
    "[  258.626468] BUG: TASK stack guard page was hit at 00000000da203579 (stack is 00000000f5deb585..)",
    "[  258.642040] Kernel panic - not syncing: corrupted stack end detected inside scheduler",
]
HEALTHY = [
    "[    0.573752] rcu: Preemptible hierarchical RCU implementation.",
    "[    0.603366] rcu: srcu_init: Setting srcu_struct sizes based on contention.",
    "[  231.566224] pcieport 0000:00:05.0: Data Link Layer Link Active not set in 1000 msec",
]


@pytest.mark.parametrize("line", REAL_STALLS)
def test_stall_lines_are_recognised(line):
    assert labvm.STALL_RE.search(line)


@pytest.mark.parametrize("line", HEALTHY)
def test_boot_chatter_is_not_a_stall(line):
    assert not labvm.STALL_RE.search(line)


class FakeAgent:
    def __init__(self):
        self.sock, self.peer = socket.socketpair()

    def close(self):
        self.sock.close()


def test_watcher_cuts_the_agent_and_refuses_later_commands(tmp_path, monkeypatch):
    monkeypatch.setenv("HOSTDEVD_LAB_DIR", str(tmp_path))
    vm = labvm.LabVM(name="unit")
    vm.run_dir.mkdir(parents=True)
    vm.serial_log.write_text("\n".join(HEALTHY) + "\n")
    vm.running, agent = True, FakeAgent()
    vm._conn = agent
    t = threading.Thread(target=vm._watch_stalls, kwargs={"interval": 0.02}, daemon=True)
    t.start()
    time.sleep(0.1)
    assert vm.stalled == [] and t.is_alive()           # healthy log: nothing happens
    with vm.serial_log.open("a") as f:
        f.write(REAL_STALLS[0] + "\n" + REAL_STALLS[1] + "\n")
    t.join(2)
    assert not t.is_alive() and vm.stalled == REAL_STALLS[:2]
    # the connection in flight is shut down: a blocked recv returns EOF at once
    agent.sock.settimeout(1)
    assert agent.sock.recv(1) == b""
    with pytest.raises(labvm.LabError, match="its kernel stalled .*detected stalls"):
        vm._agent()
    vm.running = False


def test_watcher_stops_with_the_vm(tmp_path, monkeypatch):
    monkeypatch.setenv("HOSTDEVD_LAB_DIR", str(tmp_path))
    vm = labvm.LabVM(name="unit2")
    vm.running = True
    t = threading.Thread(target=vm._watch_stalls, kwargs={"interval": 0.02}, daemon=True)
    t.start()
    vm.running = False
    t.join(2)
    assert not t.is_alive() and vm.stalled == []


def test_stall_line_is_cut_to_the_kernel_message(tmp_path, monkeypatch):
    # seen in the lab: the kernel's console line lands behind a shell prompt with escapes
    monkeypatch.setenv("HOSTDEVD_LAB_DIR", str(tmp_path))
    vm = labvm.LabVM(name="unit3")
    vm.run_dir.mkdir(parents=True)
    vm.serial_log.write_text("\x1b[?2004hroot@l1:~# " + REAL_STALLS[2] + "\r\n")
    assert vm.stalls() == [REAL_STALLS[2]]
