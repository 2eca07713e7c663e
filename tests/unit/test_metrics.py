"""Prometheus metrics (doors/metrics.py, core/telemetry.py, core/opstate.py) on the simulated kernel:
counts move with prepare and release, refusals count their reason, the textfile is atomic and
parses, labels are bounded, config mistakes are one line, and the daemon serves HTTP."""
from __future__ import annotations

import json
import os
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hostdevd.core.address import PciAddress as A
from hostdevd.core.config import parse_config
from hostdevd.core.errors import REFUSAL_CODES, ConfigError, ExecutionFailed, Reason, Refused
from hostdevd.core.ledger import Owner
from hostdevd.core.opstate import MAX_LABEL, op_state
from hostdevd.core.sysfs import Sysfs
from hostdevd.core.telemetry import NullRecorder, Telemetry
from hostdevd.doors import wire
from hostdevd.doors.cli import main
from hostdevd.doors.metrics import TEXTFILE, Metrics, MetricsServer, parse_listen
from hostdevd.sim.simkernel import SimKernel

from .conftest import load_sim, make_engine
from .daemon_support import domain_xml, running_daemon
from .test_preflight import GPU, spec

WEB1 = Owner(name="web1", uuid="00000000-0000-0000-0000-0000000000a1")
DB1 = Owner(name="db1", uuid="00000000-0000-0000-0000-0000000000d1")
NIC, NIC_FN1, BRIDGE = "0000:04:00.0", "0000:04:00.1", "0000:05:00.0"   # lab: group 15 is the e1000e pair


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(text: str, name: str, **labels: str) -> float:
    """One sample's value; KeyError when the exposition lacks it."""
    return samples(text)[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def metered(tmp_path):
    """An engine on the lab sim with the daemon's recorder installed; yields (engine, metrics, sim)."""
    sim = load_sim("lab")
    eng = make_engine(sim, tmp_path / "state")
    m = Metrics(lambda: op_state(eng.topology(with_critical=False), eng.ledger()))
    assert m.recorder is not None
    eng.telemetry.install(m.recorder)
    return eng, m, sim


def test_prepare_and_release_move_the_counts(metered):
    eng, m, sim = metered
    before = m.text()
    assert val(before, "hostdevd_operations_total", operation="prepare", result="ok") == 0
    assert val(before, "hostdevd_claims", state="active") == 0
    vfio_before = val(before, "hostdevd_devices", driver_kind="vfio")
    host_before = val(before, "hostdevd_devices", driver_kind="host")

    eng.prepare([A.parse(NIC)], WEB1)
    t = m.text()
    assert val(t, "hostdevd_operations_total", operation="prepare", result="ok") == 1
    assert val(t, "hostdevd_operations_total", operation="bind", result="ok") == 2       # the companion too
    assert val(t, "hostdevd_operation_duration_seconds_count", operation="prepare", result="ok") == 1
    assert val(t, "hostdevd_claims", state="active") == 1
    assert val(t, "hostdevd_claimed_devices") == 2
    assert val(t, "hostdevd_devices", driver_kind="vfio") == vfio_before + 2
    assert val(t, "hostdevd_devices", driver_kind="host") == host_before - 2
    assert val(t, "hostdevd_iommu_groups", driver_kind="vfio") >= 1
    assert val(t, "hostdevd_group_owner", group="15", owner="web1", owner_kind="domain") == 1
    assert val(t, "hostdevd_ledger_save_duration_seconds_count") == 2     # the claim (written ahead), the activation
    assert val(t, "hostdevd_drift_devices") == 0
    assert val(t, "hostdevd_daemon_running") == 0

    eng.release(WEB1)
    t = m.text()
    assert val(t, "hostdevd_operations_total", operation="release", result="ok") == 1
    assert val(t, "hostdevd_operations_total", operation="unbind", result="ok") == 2
    assert val(t, "hostdevd_claims", state="active") == 0
    assert val(t, "hostdevd_devices", driver_kind="vfio") == vfio_before
    assert ("hostdevd_group_owner", (("group", "15"), ("owner", "web1"), ("owner_kind", "domain"))) not in samples(t)
    assert sim.driver(NIC) == "e1000e"


def test_a_refusal_counts_its_reason_code(metered):
    eng, m, _ = metered
    eng.prepare([A.parse(NIC)], WEB1)
    with pytest.raises(Refused):
        eng.prepare([A.parse(NIC_FN1)], DB1)                 # group 15 is web1's
    with pytest.raises(Refused):
        eng.prepare([A.parse(BRIDGE)], DB1)                  # bridges are never bound
    t = m.text()
    assert val(t, "hostdevd_refusals_total", reason="GROUP_HELD") == 1
    assert val(t, "hostdevd_refusals_total", reason="BRIDGE") == 1
    assert val(t, "hostdevd_refusals_total", reason="HOST_CRITICAL") == 0
    assert val(t, "hostdevd_operations_total", operation="prepare", result="refused") == 2
    # every reason code exists from the start, at 0 or more
    assert {dict(k[1])["reason"] for k in samples(t) if k[0] == "hostdevd_refusals_total"} == set(REFUSAL_CODES)


def test_pre_flight_refusals_count_their_code_and_warnings_are_not_refusals(tmp_path):
    sim = SimKernel(spec(reset_method=[]))                     # the GPU also has no reset method: a warning
    sim.add_process(1020, "Xorg", fds=["/dev/dri/card1"])
    eng = make_engine(sim, tmp_path / "state")
    m = Metrics(lambda: op_state(eng.topology(with_critical=False), eng.ledger()))
    assert m.recorder is not None
    eng.telemetry.install(m.recorder)
    with pytest.raises(Refused) as e:
        eng.prepare([GPU], WEB1)
    assert e.value.codes == [Reason.DEVICE_IN_USE]
    t = m.text()
    assert val(t, "hostdevd_refusals_total", reason="DEVICE_IN_USE") == 1
    assert val(t, "hostdevd_operations_total", operation="prepare", result="refused") == 1
    assert sum(v for (name, _), v in samples(t).items() if name == "hostdevd_refusals_total") == 1
    assert "NO_RESET_METHOD" not in t                          # warnings are no refusal reason


def test_a_refusal_counts_once_under_the_innermost_operation():
    seen: list[tuple[str, list[str]]] = []

    class Rec(NullRecorder):
        def refused(self, op, reasons):
            seen.append((op, list(reasons)))

    tel = Telemetry(Rec())
    with pytest.raises(Refused), tel.timed("attach"), tel.timed("prepare"):
        raise Refused("no", refusals=[{"code": c} for c in (Reason.GROUP_HELD, Reason.GROUP_HELD, Reason.BRIDGE)])
    assert seen == [("prepare", ["GROUP_HELD", "BRIDGE"])]


def test_errors_count_their_stable_code_never_their_message(metered):
    eng, m, _ = metered

    def crash(name: str) -> None:
        if name.startswith("bind:"):
            raise OSError("disk on fire " * 20)

    eng.executor.on_step = crash
    with pytest.raises(ExecutionFailed):
        eng.prepare([A.parse(NIC)], WEB1)
    t = m.text()
    assert val(t, "hostdevd_operations_total", operation="prepare", result="error") == 1
    assert val(t, "hostdevd_operation_errors_total", operation="prepare", code="EXECUTION_FAILED") == 1
    assert val(t, "hostdevd_operation_errors_total", operation="bind", code="INTERNAL") == 1
    assert "disk on fire" not in t


def _labels_bounded(text: str) -> None:
    for (_name, labels), _ in samples(text).items():
        for key, value in labels:
            assert len(value) <= MAX_LABEL, (key, value)
            if key not in ("le", "python", "version"):
                assert " " not in value, (key, value)        # never message text


def test_labels_are_bounded(metered):
    eng, m, _ = metered
    long = Owner(name="d" * 200)
    eng.prepare([A.parse(NIC)], long)
    with pytest.raises(Refused):
        eng.prepare([A.parse(NIC_FN1)], DB1)
    t = m.text()
    _labels_bounded(t)
    owners = [dict(k[1])["owner"] for k in samples(t) if k[0] == "hostdevd_group_owner"]
    assert owners == ["d" * (MAX_LABEL - 1) + "\u2026"]


def test_sriov_vfs_per_pf(tmp_path):
    sim = load_sim("sriov_pf")
    eng = make_engine(sim, tmp_path)
    m = Metrics(lambda: op_state(eng.topology(with_critical=False), eng.ledger()))
    assert m.recorder is not None
    eng.telemetry.install(m.recorder)
    pf = "0000:03:00.0"
    vfs = eng.set_vfs(pf, 4, autoprobe=False).vfs
    eng.prepare([A.parse(vfs[1])], WEB1)
    t = m.text()
    assert val(t, "hostdevd_operations_total", operation="set_vfs", result="ok") == 1
    assert val(t, "hostdevd_sriov_numvfs", pf=pf) == 4
    assert val(t, "hostdevd_sriov_totalvfs", pf=pf) >= 4
    assert val(t, "hostdevd_sriov_vfs_assigned", pf=pf) == 1


def test_drift_without_the_daemon_is_judged_from_sysfs(metered):
    eng, m, sim = metered
    eng.prepare([A.parse(NIC)], WEB1)
    a = A.parse(NIC_FN1)
    eng.sysfs.set_driver_override(a, None)        # someone gives the companion back behind hostdevd's back
    eng.sysfs.unbind(a)
    eng.sysfs.drivers_probe(a)
    assert sim.driver(NIC_FN1) == "e1000e"
    assert val(m.text(), "hostdevd_drift_devices") == 1


# --------------------------------------------------------------------------- hostdevctl metrics


def _cli(argv, sim):
    lines: list[str] = []
    rc = main(argv, sysfs=Sysfs(sim, 2.0), out=lines.append)
    return rc, "\n".join(lines)


def test_cli_prints_the_state_without_the_daemon(state):
    sim = load_sim("lab")
    assert _cli(state + ["prepare", "--device", NIC, "--owner", "web1"], sim)[0] == 0
    rc, out = _cli(state + ["metrics"], sim)
    assert rc == 0
    assert val(out, "hostdevd_daemon_running") == 0 and val(out, "hostdevd_claims", state="active") == 1
    assert val(out, "hostdevd_group_owner", group="15", owner="web1", owner_kind="domain") == 1
    assert val(out, "hostdevd_build_info", version=_version(), python=_python()) == 1
    assert "hostdevd_operations_total" not in out        # counters live in the daemon only
    rc, out = _cli(state + ["metrics", "--json"], sim)
    data = json.loads(out)
    assert data["source"] == "local" and val(data["text"], "hostdevd_claimed_devices") == 2


def _version() -> str:
    import hostdevd
    return hostdevd.__version__


def _python() -> str:
    import platform
    return platform.python_version()


def test_textfile_is_written_atomically_and_parses(state, tmp_path, monkeypatch):
    sim = load_sim("lab")
    d = tmp_path / "textfile"
    d.mkdir()
    renames: list[tuple[str, str]] = []
    real_rename = os.rename

    def rename(src, dst):
        assert not os.path.exists(dst) or os.path.getsize(dst) > 0
        assert os.path.getsize(src) > 0                     # the whole text is there before it shows
        renames.append((str(src), str(dst)))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    for _ in range(2):                                      # the second replaces the first
        rc, out = _cli(state + ["metrics", "--textfile", str(d)], sim)
        assert rc == 0 and out == ""
    path = d / TEXTFILE
    assert [dst for _, dst in renames] == [str(path)] * 2
    assert all(os.path.dirname(src) == str(d) and not src.endswith(".prom") for src, _ in renames)
    assert sorted(os.listdir(d)) == [TEXTFILE]               # no temp file left
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    text = path.read_text()
    assert val(text, "hostdevd_state_ok") == 1 and val(text, "hostdevd_daemon_running") == 0
    _labels_bounded(text)


def test_textfile_needs_an_existing_directory(state, tmp_path, capsys):
    rc, _ = _cli(state + ["metrics", "--textfile", str(tmp_path / "nope")], load_sim("lab"))
    assert rc == 2 and "no such directory" in capsys.readouterr().err


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("value", ["9477", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "a b:1", "[zz]:1",
                                   ":9477", "127.0.0.1:port", "http://127.0.0.1:9477"])
def test_listen_mistakes_are_one_line(value):
    with pytest.raises(ConfigError) as e:
        parse_config(f'[metrics]\nlisten = "{value}"\n')
    msg = str(e.value)
    assert "\n" not in msg and "metrics.listen" in msg and "HOST:PORT" in msg


@pytest.mark.parametrize("value,host,port", [("127.0.0.1:9477", "127.0.0.1", 9477), ("[::1]:9477", "::1", 9477),
                                             ("localhost:9100", "localhost", 9100), ("0.0.0.0:1", "0.0.0.0", 1)])
def test_listen_accepts_any_address(value, host, port):
    assert parse_config(f'[metrics]\nlisten = "{value}"\n').metrics.listen == value
    assert parse_listen(value) == (host, port)


def test_metrics_are_off_by_default():
    assert parse_config("").metrics.listen == ""
    with pytest.raises(ConfigError, match="metrics.port: unknown key"):
        parse_config("[metrics]\nport = 9477\n")


# --------------------------------------------------------------------------- HTTP and the daemon


def _get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read().decode()


def test_http_endpoint_serves_on_an_ephemeral_port(metered):
    _, m, _ = metered
    server = MetricsServer(m.registry, "127.0.0.1", 0)
    try:
        assert server.port > 0 and server.alive
        status, ctype, body = _get(f"http://127.0.0.1:{server.port}/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        assert val(body, "hostdevd_state_ok") == 1
    finally:
        server.stop()
    assert not server.alive


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_daemon_serves_http_counts_hooks_and_answers_hostdevctl(tmp_path):
    port = _free_port()
    with running_daemon("lab", config_text=f'[metrics]\nlisten = "127.0.0.1:{port}"\n') as (daemon, sim, sock):
        status = wire.call(sock, {"op": "status"}, timeout=10)
        assert status["metrics"] == {"listen": f"127.0.0.1:{port}", "port": port, "error": None}
        xml = domain_xml("vm1", None, NIC)
        r = wire.call(sock, {"op": "prepare", "domain": {"name": "vm1"}, "xml": xml, "origin": "hook"}, timeout=30)
        assert r["ok"], r
        r = wire.call(sock, {"op": "prepare", "domain": {"name": "vm2"}, "xml": domain_xml("vm2", None, NIC_FN1),
                             "origin": "hook"}, timeout=30)
        assert not r["ok"] and r["error"]["code"] == "REFUSED"
        _, _, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert val(body, "hostdevd_daemon_running") == 1 and val(body, "hostdevd_udev_watching") == 0
        assert val(body, "hostdevd_ledger_read_only") == 0
        assert "hostdevd_libvirt_connected" not in body                # run without libvirt: absent
        assert val(body, "hostdevd_hook_request_duration_seconds_count", op="prepare", result="ok") == 1
        assert val(body, "hostdevd_hook_request_duration_seconds_count", op="prepare", result="refused") == 1
        assert val(body, "hostdevd_api_requests_total", op="status", origin="api", result="ok") == 1
        assert val(body, "hostdevd_refusals_total", reason="GROUP_HELD") == 1
        assert val(body, "hostdevd_operations_total", operation="reconcile", result="ok") >= 1   # at start
        assert val(body, "hostdevd_last_reconcile_timestamp_seconds") > 0
        assert val(body, "hostdevd_group_owner", group="15", owner="vm1", owner_kind="domain") == 1
        assert val(body, "process_open_fds") > 0
        _labels_bounded(body)

        # hostdevctl metrics gets the daemon's families, counters included, and writes them as a textfile
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'state_dir = "{daemon.engine.config.state_dir}"\n'
                       f'runtime_dir = "{daemon.engine.config.runtime_dir}"\n')
        rc, out = _cli(["--config", str(cfg), "metrics"], sim)
        assert rc == 0 and val(out, "hostdevd_daemon_running") == 1
        assert val(out, "hostdevd_operations_total", operation="prepare", result="ok") == 1
        d = tmp_path / "tf"
        d.mkdir()
        rc, _ = _cli(["--config", str(cfg), "metrics", "--textfile", str(d)], sim)
        text = (d / TEXTFILE).read_text()
        assert rc == 0 and val(text, "hostdevd_refusals_total", reason="GROUP_HELD") == 1
        assert val(text, "hostdevd_operations_total", operation="prepare", result="ok") == 1
        rc, out = _cli(["--config", str(cfg), "--no-daemon", "metrics"], sim)
        assert rc == 0 and val(out, "hostdevd_daemon_running") == 0
    with pytest.raises(OSError):
        _get(f"http://127.0.0.1:{port}/metrics")               # stopped with the daemon


def test_daemon_runs_on_when_the_metrics_port_is_taken():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with running_daemon("lab", config_text=f'[metrics]\nlisten = "127.0.0.1:{port}"\n') as (daemon, _, sock):
            status = wire.call(sock, {"op": "status"}, timeout=10)
            assert status["ok"] and status["metrics"]["port"] is None
            assert status["metrics"]["error"].startswith(f"cannot listen on 127.0.0.1:{port}")
            assert "\n" not in status["metrics"]["error"]
            assert wire.call(sock, {"op": "metrics"}, timeout=10)["text"].startswith("# HELP")


def test_without_listen_the_daemon_opens_no_port():
    with running_daemon("lab") as (daemon, _, sock):
        assert daemon.metrics_server is None
        assert wire.call(sock, {"op": "status"}, timeout=10)["metrics"] == {"listen": None, "port": None,
                                                                             "error": None}


def test_libvirt_connection_state_follows_the_daemon():
    from .test_service import FakeAdapter

    with running_daemon("lab", adapter=FakeAdapter()) as (daemon, _, sock):
        assert daemon.wait_idle()
        text = lambda: wire.call(sock, {"op": "metrics"}, timeout=10)["text"]  # noqa: E731
        assert val(text(), "hostdevd_libvirt_connected") == 1
        assert val(text(), "hostdevd_operations_total", operation="reconcile", result="ok") >= 2  # start, connect
        daemon.on_libvirt_disconnected("test")
        assert val(text(), "hostdevd_libvirt_connected") == 0
