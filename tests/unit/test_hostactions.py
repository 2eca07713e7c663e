"""Per-device host actions (config ``[[host_actions]]``): units stopped and modules unloaded before a
group is bound, undone after release and on rollback, recorded in the ledger, never run for real.

The fake runner plays systemd (a dict of unit states) and modprobe (the simulated kernel's
module loader, which unbinds a module's devices when it goes and probes them when it comes back),
so a single-GPU host's "stop the display manager, unload nouveau" is exercised end to end.
"""
from __future__ import annotations

import errno

import pytest

from hostdevd.core.address import PciAddress as A
from hostdevd.core.config import parse_config
from hostdevd.core.engine import Engine
from hostdevd.core.errors import ConfigError, ExecutionFailed, HostdevError
from hostdevd.core.executor import RunResult
from hostdevd.core.ledger import Owner
from hostdevd.core.ledger_store import LedgerStore
from hostdevd.core.reconcile import reconcile
from hostdevd.core.sysfs import Sysfs

from .conftest import load_sim

VM1 = Owner(name="vm1", uuid="00000000-0000-0000-0000-000000000001")
VM2 = Owner(name="vm2", uuid="00000000-0000-0000-0000-000000000002")
GPU, AUDIO = "0000:01:00.0", "0000:01:00.1"     # desktop_gpu: GTX 1070 + HDMI audio, group 1 (nouveau)
IGPU = "0000:00:02.0"                           # desktop_gpu: the boot VGA (i915)
DM = "display-manager.service"

GPU_ACTIONS = """
[[host_actions]]
match = "10de:1b80"
stop_units = ["display-manager", "nvidia-persistenced.service"]
unload_modules = ["nouveau"]
timeout = 12
"""


class Crash(BaseException):
    """The daemon died here (the executor's rollback catches Exception only)."""


class FakeHost:
    """systemctl and modprobe, on a dict of unit states and the simulated kernel."""

    def __init__(self, sim, units: dict[str, bool] | None = None):
        self.sim = sim
        self.units = dict(units if units is not None else {DM: True, "nvidia-persistenced.service": False})
        self.calls: list[str] = []
        self.timeouts: list[float] = []
        self.fail: dict[str, str] = {}       # command line -> error output
        self.crash_after: str | None = None

    def __call__(self, argv: list[str], timeout: float) -> RunResult:
        cmd = " ".join(argv)
        self.calls.append(cmd)
        self.timeouts.append(timeout)
        if cmd in self.fail:
            return RunResult(1, self.fail[cmd])
        res = self._do(argv)
        if cmd == self.crash_after:
            raise Crash(cmd)
        return res

    def _do(self, argv: list[str]) -> RunResult:
        if argv[:2] == ["systemctl", "is-active"]:
            return RunResult(0 if self.units.get(argv[-1]) else 3, "")
        if argv[:2] == ["systemctl", "stop"]:
            self.units[argv[2]] = False
            return RunResult(0)
        if argv[:2] == ["systemctl", "start"]:
            self.units[argv[2]] = True
            return RunResult(0)
        if argv[:2] == ["modprobe", "-r"]:
            try:
                self.sim.unload_module(argv[2])
            except OSError as e:
                return RunResult(1, e.strerror)
            return RunResult(0)
        if argv[0] == "modprobe":
            self.sim.load_module(argv[1])
            return RunResult(0)
        raise AssertionError(f"unexpected command {argv}")

    @property
    def actions(self) -> list[str]:
        """The calls that change something (not the is-active questions)."""
        return [c for c in self.calls if "is-active" not in c]


def engine(sim, state_dir, host: FakeHost, config: str = GPU_ACTIONS) -> Engine:
    cfg = parse_config(config)
    cfg.state_dir = str(state_dir)
    cfg.release_wait_timeout = 0.3
    return Engine(cfg, Sysfs(sim, 2.0), LedgerStore(state_dir), modprobe=sim.load_module, runner=host)


@pytest.fixture
def sim():
    return load_sim("desktop_gpu")


@pytest.fixture
def host(sim):
    return FakeHost(sim)


@pytest.fixture
def eng(sim, host, tmp_path):
    return engine(sim, tmp_path / "state", host)


# --------------------------------------------------------------------------- config


def test_config_normalises_and_validates():
    cfg = parse_config(GPU_ACTIONS + '\n[[host_actions]]\nmatch = ["0000:03:00.0", "1002:*"]\n'
                       'unload_modules = ["amdgpu"]\n')
    first, second = cfg.host_actions
    assert first.stop_units == [DM, "nvidia-persistenced.service"] and first.timeout == 12
    assert second.patterns == ["0000:03:00.0", "1002:*"] and second.stop_units == [] and second.timeout == 30
    assert cfg.host_actions_for(A.parse(GPU), "10de", "1b80") == [first]
    assert cfg.host_actions_for(A.parse("0000:07:00.0"), "1002", "73bf") == [second]


@pytest.mark.parametrize("text, key", [
    ('match = "nonsense"', "host_actions[0].match[0]"),
    ('match = []', "host_actions[0].match"),
    ('match = "10de:*"\nstop_units = ["-x"]', "host_actions[0].stop_units[0]"),
    ('match = "10de:*"\nstop_units = ["libvirtd"]', "host_actions[0].stop_units[0]"),
    ('match = "10de:*"\nunload_modules = ["vfio-pci"]', "host_actions[0].unload_modules[0]"),
    ('match = "10de:*"\nunload_modules = ["a b"]', "host_actions[0].unload_modules[0]"),
    ('match = "10de:*"\ntimeout = 0', "host_actions[0].timeout"),
    ('match = "10de:*"\nstart_units = ["x"]', "host_actions[0].start_units"),
    ('stop_units = ["x"]', "host_actions[0].match"),
])
def test_config_mistakes_name_the_key(text, key):
    with pytest.raises(ConfigError) as e:
        parse_config("[[host_actions]]\n" + text + "\n")
    assert f": {key}: " in e.value.message


# --------------------------------------------------------------------------- planner


def test_plan_stops_and_unloads_before_binding_and_undoes_after_release(eng, sim, host):
    plan = eng.plan_prepare([A.parse(GPU)], VM1)
    assert [(s.action, s.name or s.address) for s in plan.steps] == [
        ("claim", None), ("stop_unit", DM), ("stop_unit", "nvidia-persistenced.service"),
        ("unload_module", "nouveau"), ("skip", A.parse("0000:00:01.0")), ("bind", A.parse(GPU)),
        ("bind", A.parse(AUDIO)), ("activate", None)]
    assert plan.steps[1].timeout == 12 and plan.to_json()["steps"][1]["name"] == DM
    assert host.calls == [], "planning runs nothing"
    eng.prepare([A.parse(GPU)], VM1)
    rplan = eng.plan_release(VM1)
    assert [(s.action, s.name or s.address) for s in rplan.steps] == [
        ("load_module", "nouveau"), ("restore", A.parse(AUDIO)), ("restore", A.parse(GPU)), ("start_unit", DM),
        ("drop", None)]


def test_no_actions_for_other_devices_or_devices_already_on_vfio(eng, sim):
    assert not [s for s in eng.plan_prepare([A.parse("0000:02:00.0")], VM1).steps if s.name]   # NVMe
    sim.load_module("vfio-pci")
    for addr in (GPU, AUDIO):                                                    # bound by hand
        sim.write(f"bus/pci/devices/{addr}/driver_override", "vfio-pci")
        sim.write(f"bus/pci/drivers/{sim.driver(addr)}/unbind", addr)
        sim.write("bus/pci/drivers_probe", addr)
    assert sim.driver(GPU) == "vfio-pci"
    assert not [s for s in eng.plan_prepare([A.parse(GPU)], VM1).steps if s.name]


def test_each_action_once_per_plan(sim, host, tmp_path):
    cfg = GPU_ACTIONS + '\n[[host_actions]]\nmatch = "*:*"\n'.replace('"*:*"', f'"{AUDIO}"') + \
        'stop_units = ["display-manager.service"]\nunload_modules = ["snd_hda_intel", "nouveau"]\n'
    eng = engine(sim, tmp_path / "s", host, cfg)
    names = [s.name for s in eng.plan_prepare([A.parse(GPU)], VM1).steps if s.name]
    assert names == [DM, "nvidia-persistenced.service", "nouveau", "snd_hda_intel"]


def test_boot_vga_needs_explicit_policy_and_warns_without_actions(sim, host, tmp_path):
    eng = engine(sim, tmp_path / "a", host, "")
    plan = eng.plan_prepare([A.parse(IGPU)], VM1)
    assert not plan.ok and "boot VGA" in plan.refusal_message()
    eng = engine(sim, tmp_path / "b", host, f'[policy]\nallow_host_critical = ["{IGPU}"]\n')
    plan = eng.plan_prepare([A.parse(IGPU)], VM1)
    assert plan.ok and any("boot VGA" in w and "host_actions" in w for w in plan.warnings)
    eng = engine(sim, tmp_path / "c", host, f'[policy]\nallow_host_critical = ["{IGPU}"]\n'
                 f'[[host_actions]]\nmatch = "{IGPU}"\nstop_units = ["gdm"]\nunload_modules = ["i915"]\n')
    plan = eng.plan_prepare([A.parse(IGPU)], VM1)
    assert plan.ok and not plan.warnings
    assert [s.name for s in plan.steps if s.name] == ["gdm.service", "i915"]


# --------------------------------------------------------------------------- executor


def test_single_gpu_prepare_and_release(eng, sim, host):
    before = sim.state()
    eng.prepare([A.parse(GPU)], VM1)
    assert host.actions == [f"systemctl stop {DM}", "modprobe -r nouveau"]
    assert "systemctl stop nvidia-persistenced.service" not in host.calls, "inactive units are left alone"
    assert set(host.timeouts) == {12}
    assert sim.driver(GPU) == sim.driver(AUDIO) == "vfio-pci" and host.units[DM] is False
    claim = eng.ledger().claim_for_group(1)
    assert [(a.kind, a.name, a.state, a.timeout) for a in claim.host_actions] == [
        ("unit", DM, "done", 12), ("module", "nouveau", "done", 12)]
    assert claim.device(GPU).original_driver == "nouveau", "recorded before the module went"
    host.calls.clear()
    eng.release(VM1)
    assert host.actions == ["modprobe nouveau", f"systemctl start {DM}"]
    assert host.units[DM] is True and eng.ledger().claims == {}
    assert sim.state() == before


def test_stop_failure_rolls_back(eng, sim, host):
    before = sim.state()
    host.fail[f"systemctl stop {DM}"] = "Job for display-manager.service canceled."
    with pytest.raises(ExecutionFailed) as e:
        eng.prepare([A.parse(GPU)], VM1)
    assert "canceled" in e.value.message
    assert host.actions == [f"systemctl stop {DM}", f"systemctl start {DM}"]
    assert eng.ledger().claims == {} and sim.state() == before


def test_unload_failure_starts_the_unit_again(eng, sim, host):
    before = sim.state()
    host.fail["modprobe -r nouveau"] = "modprobe: FATAL: Module nouveau is in use."
    with pytest.raises(ExecutionFailed) as e:
        eng.prepare([A.parse(GPU)], VM1)
    assert "in use" in e.value.message
    assert host.actions == [f"systemctl stop {DM}", "modprobe -r nouveau", "modprobe nouveau",
                            f"systemctl start {DM}"]
    assert host.units[DM] and eng.ledger().claims == {} and sim.state() == before


class FailBind:
    """Backend proxy: writing the GPU's audio function's driver_override fails."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def write(self, rel, data):
        if rel == f"bus/pci/devices/{AUDIO}/driver_override" and data.strip() == "vfio-pci":
            raise OSError(errno.EIO, "injected failure")
        return self.inner.write(rel, data)


def test_bind_failure_loads_modules_before_restoring_devices(eng, sim, host):
    before = sim.state()
    eng.sysfs = eng.executor.sysfs = Sysfs(FailBind(sim), 2.0)
    with pytest.raises(HostdevError):
        eng.prepare([A.parse(GPU)], VM1)
    # the GPU went back to nouveau: only possible because nouveau was loaded first
    assert host.actions[-2:] == ["modprobe nouveau", f"systemctl start {DM}"]
    assert eng.ledger().claims == {} and sim.state() == before


def test_unit_start_failure_at_release_keeps_a_failed_claim_then_retry(eng, sim, host):
    eng.prepare([A.parse(GPU)], VM1)
    host.fail[f"systemctl start {DM}"] = "Job failed"
    with pytest.raises(ExecutionFailed) as e:
        eng.release(VM1)
    assert DM in e.value.message
    assert sim.driver(GPU) == "nouveau", "the devices went back all the same"
    claim = eng.ledger().claim_for_group(1)
    assert claim.state == "failed" and [a.name for a in claim.host_actions] == [DM]
    del host.fail[f"systemctl start {DM}"]
    eng.release(VM1)                        # the operator retries
    assert eng.ledger().claims == {} and host.units[DM]


def test_unit_shared_by_two_groups_starts_with_the_last_release(sim, host, tmp_path):
    cfg = (f'[policy]\nallow_host_critical = ["{IGPU}"]\n'
           f'[[host_actions]]\nmatch = ["10de:1b80", "{IGPU}"]\nstop_units = ["{DM}"]\n')
    eng = engine(sim, tmp_path / "s", host, cfg)
    eng.prepare([A.parse(GPU)], VM1)
    eng.prepare([A.parse(IGPU)], VM2)                               # DM already stopped for group 1
    assert [a.name for a in eng.ledger().claim_for_group(2).host_actions] == [DM]
    assert host.actions == [f"systemctl stop {DM}"]
    eng.release(VM1)
    assert host.units[DM] is False, "group 5 still needs the display manager stopped"
    eng.release(VM2)
    assert host.units[DM] is True and host.actions == [f"systemctl stop {DM}", f"systemctl start {DM}"]


def test_boundaries_include_the_host_actions(sim, host, tmp_path):
    eng = engine(sim, tmp_path / "s", host)
    names: list[str] = []
    eng.executor.on_step = names.append
    eng.prepare([A.parse(GPU)], VM1)
    assert names == ["claim:1", f"stop_unit:{DM}", "stop_unit:nvidia-persistenced.service",
                     "unload_module:nouveau", f"bind:{GPU}", f"bind:{AUDIO}", "activate:1"]
    names.clear()
    eng.release(VM1)
    assert names == ["release:1", "load_module:nouveau", f"restore:{AUDIO}", f"restore:{GPU}",
                     f"start_unit:{DM}", "drop:1"]


@pytest.mark.parametrize("boundary", ["claim:1", f"stop_unit:{DM}", "unload_module:nouveau", f"bind:{GPU}",
                                      f"bind:{AUDIO}", "activate:1"])
def test_crash_during_prepare_recovers_the_host(sim, host, tmp_path, boundary):
    before = sim.state()
    eng = engine(sim, tmp_path / "s", host)

    def on_step(name):
        if name == boundary:
            raise Crash(name)
    eng.executor.on_step = on_step
    with pytest.raises(Crash):
        eng.prepare([A.parse(GPU)], VM1)
    fresh = engine(sim, tmp_path / "s", host)              # the restarted daemon
    report = reconcile(fresh, None)
    assert report.errors == [] and fresh.ledger().claims == {}
    assert sim.state() == before and host.units[DM] is True


@pytest.mark.parametrize("command", [f"systemctl stop {DM}", "modprobe -r nouveau"])
def test_crash_right_after_a_host_command_recovers(sim, host, tmp_path, command):
    """The command ran, its 'done' mark never reached the ledger: the 'pending' record is undone."""
    before = sim.state()
    host.crash_after = command
    eng = engine(sim, tmp_path / "s", host)
    with pytest.raises(Crash):
        eng.prepare([A.parse(GPU)], VM1)
    assert [a.state for a in eng.ledger().claim_for_group(1).host_actions][-1] == "pending"
    host.crash_after = None
    report = reconcile(engine(sim, tmp_path / "s", host), None)
    assert report.errors == [] and sim.state() == before and host.units[DM] is True


def test_crash_during_release_after_module_load_is_finished(sim, host, tmp_path):
    before = sim.state()
    eng = engine(sim, tmp_path / "s", host)
    eng.prepare([A.parse(GPU)], VM1)

    def on_step(name):
        if name == f"restore:{AUDIO}":
            raise Crash(name)
    eng.executor.on_step = on_step
    with pytest.raises(Crash):
        eng.release(VM1)
    assert [a.name for a in eng.ledger().claim_for_group(1).host_actions] == [DM], "nouveau is back already"
    report = reconcile(engine(sim, tmp_path / "s", host), None)
    assert [f["action"] for f in report.finished] == ["finished half release"]
    assert sim.state() == before and host.units[DM] is True


def test_runner_timeout_is_a_step_failure(sim, tmp_path):
    def hung(argv, timeout):
        if argv[:2] == ["systemctl", "is-active"]:
            return RunResult(0)
        if argv[:2] == ["systemctl", "stop"]:
            raise ExecutionFailed(f"`{' '.join(argv)}` did not finish within {timeout:g} s")
        return RunResult(0)
    eng = engine(sim, tmp_path / "s", hung)
    before = sim.state()
    with pytest.raises(ExecutionFailed) as e:
        eng.prepare([A.parse(GPU)], VM1)
    assert "within 12 s" in e.value.message and sim.state() == before and eng.ledger().claims == {}


def test_default_runner_reports_timeouts_and_missing_programs():
    from hostdevd.core.executor import default_runner
    assert default_runner(["true"], 5).rc == 0
    assert default_runner(["sh", "-c", "echo oops >&2; exit 3"], 5) == RunResult(3, "oops")
    with pytest.raises(ExecutionFailed, match="within 0.2 s"):
        default_runner(["sleep", "5"], 0.2)
    with pytest.raises(ExecutionFailed, match="cannot run"):
        default_runner(["/nonexistent/hostdevd-test"], 5)


def test_status_lists_the_host_actions_to_undo(eng, sim, host, tmp_path):
    from hostdevd.doors.cli import main as cli_main

    eng.prepare([A.parse(GPU)], VM1)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_dir = "{eng.config.state_dir}"\nruntime_dir = "{tmp_path / "run"}"\n')
    lines: list[str] = []
    assert cli_main(["--config", str(cfg), "status"], sysfs=Sysfs(sim, 2.0), out=lines.append) == 0
    assert lines[-1] == f"group 1: host actions undone at release: stopped {DM}, unloaded nouveau"
