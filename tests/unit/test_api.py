"""Socket API: round trips, hostile input, peer credentials, concurrency (one owner per group)."""
from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostdevd.core.errors import HostdevError
from hostdevd.doors import api
from hostdevd.doors.api import Peer, call
from hostdevd.doors.wire import MAX_MESSAGE, DaemonNotRunning, LineReader
from hostdevd.sim.simkernel import SimKernel

from .daemon_support import domain_xml, running_daemon, short_dir, singleton_groups_spec, uuid_for

VM1 = {"name": "vm1", "uuid": uuid_for(1)}
PAIR = "0000:04:00.0"        # lab group 15, with companion 0000:04:00.1


@pytest.fixture
def daemon():
    with running_daemon("lab") as ctx:
        yield ctx


def raw(sock_path: str, data: bytes, timeout: float = 5.0, shut: bool = True) -> list[dict]:
    """Send raw bytes, return every reply line until the server closes."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(sock_path)
    try:
        try:
            s.sendall(data)
            if shut:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass                       # the server may close first (oversize): read what it said
        reader = LineReader(s, MAX_MESSAGE + 10)
        out = []
        while True:
            try:
                line = reader.read(timeout)
            except (TimeoutError, ConnectionResetError):
                break
            if line is None:
                break
            out.append(json.loads(line))
        return out
    finally:
        s.close()


# --------------------------------------------------------------------------- round trips


def test_socket_is_0600_and_ping_answers(daemon):
    d, _, path = daemon
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    reply = call(path, {"op": "ping"})
    assert reply == {"v": 1, "ok": True, "version": reply["version"], "pid": os.getpid()}


def test_prepare_status_plan_release_round_trip(daemon):
    d, sim, path = daemon
    xml = domain_xml("vm1", VM1["uuid"], PAIR)
    plan = call(path, {"op": "plan", "owner": {"name": "vm1"}, "xml": xml})
    assert plan["ok"] and plan["plan"]["ok"] and plan["plan"]["groups"][0]["companions"] == ["0000:04:00.1"]
    assert sim.driver(PAIR) == "e1000e"           # plan changes nothing

    r = call(path, {"op": "prepare", "domain": {"name": "vm1"}, "xml": xml})
    assert r["ok"] and r["groups"] == [15] and r["owner"]["uuid"] == VM1["uuid"]
    assert sim.driver(PAIR) == sim.driver("0000:04:00.1") == "vfio-pci"

    st_ = call(path, {"op": "status"})
    assert st_["ok"] and st_["daemon"]["libvirt"]["state"] == "not used"
    assert [c["group"] for c in st_["claims"]] == [15] and st_["claims"][0]["owner"]["name"] == "vm1"
    assert st_["reservations"] == []

    again = call(path, {"op": "prepare", "domain": {"name": "vm1"}, "xml": xml})
    assert again["ok"], "prepare is idempotent for the same owner"

    rplan = call(path, {"op": "plan", "owner": {"name": "vm1"}, "action": "release"})
    assert [s["action"] for s in rplan["plan"]["steps"]] == ["restore", "restore", "drop"]

    rel = call(path, {"op": "release", "domain": {"name": "vm1"}, "xml": xml})
    assert rel["ok"] and rel["groups"] == [15]
    assert sim.driver(PAIR) == sim.driver("0000:04:00.1") == "e1000e"
    assert call(path, {"op": "release", "domain": VM1})["ok"], "release is idempotent"
    assert call(path, {"op": "status"})["claims"] == []


def test_prepare_by_addresses_and_partial_release(daemon):
    d, sim, path = daemon
    r = call(path, {"op": "prepare", "domain": VM1, "addresses": ["01:00.0", "0000:02:00.0"]})
    assert r["ok"] and r["groups"] == [12, 13]
    rel = call(path, {"op": "release", "domain": VM1, "addresses": ["0000:02:00.0"]})
    assert rel["ok"] and rel["groups"] == [13]
    assert sim.driver("0000:01:00.0") == "vfio-pci" and sim.driver("0000:02:00.0") == "nvme"


def test_refusal_names_the_holder(daemon):
    d, sim, path = daemon
    assert call(path, {"op": "prepare", "domain": VM1, "addresses": [PAIR]})["ok"]
    r = call(path, {"op": "prepare", "domain": {"name": "vm2"}, "addresses": ["0000:04:00.1"]})
    assert not r["ok"] and r["error"]["code"] == "REFUSED"
    assert "held by domain vm1" in r["error"]["message"]
    assert r["error"]["holders"] == [{"group": 15, "owner": {"name": "vm1", "uuid": VM1["uuid"], "kind": "domain"}}]


def test_uuid_forms_name_the_same_owner(daemon):
    d, sim, path = daemon
    upper = VM1["uuid"].upper().replace("-", "")
    assert call(path, {"op": "prepare", "domain": {"name": "vm1", "uuid": upper}, "addresses": [PAIR]})["ok"]
    assert d.engine.ledger().claim_for_group(15).owner.uuid == VM1["uuid"]
    assert call(path, {"op": "release", "domain": VM1})["groups"] == [15]


def test_domain_without_hostdev_is_a_no_op(daemon):
    d, sim, path = daemon
    xml = domain_xml("plain", None, extra="<interface type='network'><source network='default'/></interface>")
    r = call(path, {"op": "prepare", "domain": {"name": "plain"}, "xml": xml})
    assert r["ok"] and r["groups"] == [] and r["networks"][0]["network"] == "default"


def test_host_critical_refused_with_reason(daemon):
    d, sim, path = daemon
    r = call(path, {"op": "prepare", "domain": VM1, "addresses": ["0000:00:10.0"]})
    assert r["error"]["code"] == "REFUSED" and "host-critical" in r["error"]["message"]


def test_thousands_of_missing_devices_get_one_short_refusal(daemon):
    """A domain naming 2,000 devices that do not exist: one refusal counting them, a small reply, fast."""
    d, sim, path = daemon
    before = sim.state()
    addrs = [f"0000:{0xa0 + i // 256:02x}:{(i // 8) % 32:02x}.{i % 8}" for i in range(2000)]
    xml = domain_xml("vm1", VM1["uuid"], *addrs)
    for request, count in (({"op": "prepare", "domain": VM1, "xml": xml}, "2,000"),
                           ({"op": "plan", "owner": VM1, "xml": xml}, "2,000"),
                           ({"op": "prepare", "domain": VM1, "addresses": addrs[:256]}, "256")):  # the list's limit
        t0 = time.monotonic()
        r = call(path, request, timeout=30)
        assert time.monotonic() - t0 < 5, request["op"]
        refusals = r["error"]["refusals"] if request["op"] == "prepare" else r["plan"]["refusals"]
        assert refusals == [{"device": "-", "hint": "`hostdevctl groups` lists the devices and their addresses",
                             "reason": f"{count} requested devices do not exist on this host: 0000:a0:00.0, "
                                       "0000:a0:00.1, 0000:a0:00.2, \u2026", "code": "UNKNOWN_DEVICE"}]
        assert len(json.dumps(refusals)) < 300 and len(json.dumps(r)) < 1000, r
    assert sim.state() == before and call(path, {"op": "ping"})["ok"]


def test_attach_and_detach_need_libvirt(daemon):
    """Without libvirt nothing is bound (a prepared device no guest uses is released by the next
    reconciliation anyway) and nothing is released (the guest may still use it)."""
    d, sim, path = daemon
    frag = "<hostdev mode='subsystem' type='pci'><source><address bus='0x01' slot='0' function='0'/></source></hostdev>"
    r = call(path, {"op": "attach", "domain": VM1, "xml": frag})
    assert r["error"]["code"] == "LIBVIRT_UNAVAILABLE" and "needs libvirt" in r["error"]["message"]
    assert sim.driver("0000:01:00.0") == "e1000e" and d.engine.ledger().claims == {}
    assert call(path, {"op": "prepare", "domain": VM1, "addresses": ["0000:01:00.0"]})["ok"]
    r = call(path, {"op": "detach", "domain": VM1, "xml": frag})
    assert r["error"]["code"] == "LIBVIRT_UNAVAILABLE"
    assert sim.driver("0000:01:00.0") == "vfio-pci" and list(d.engine.ledger().claims) == ["12"]


# --------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize("line,code,needle", [
    (b"\x00\xff\xfe garbage", "BAD_REQUEST", "not UTF-8"),
    (b"hello world", "BAD_REQUEST", "not valid JSON"),
    (b"[1, 2]", "BAD_REQUEST", "JSON list"),
    (b'{"op": "status"}', "BAD_REQUEST", "no protocol version"),
    (b'{"v": 2, "op": "status"}', "UNSUPPORTED_VERSION", "version 2"),
    (b'{"v": true, "op": "status"}', "UNSUPPORTED_VERSION", "True"),
    (b'{"v": 1}', "BAD_REQUEST", "no op"),
    (b'{"v": 1, "op": "format_disk"}', "UNKNOWN_OP", "format_disk"),
    (b'{"v": 1, "op": "prepare", "xml": "<domain/>"}', "BAD_REQUEST", "missing field domain"),
    (b'{"v": 1, "op": "prepare", "domain": {"name": "a"}}', "BAD_REQUEST", "exactly one of xml or addresses"),
    (b'{"v": 1, "op": "status", "sudo": 1}', "BAD_REQUEST", "unknown field sudo"),
    (b'{"v": 1, "op": "prepare", "domain": {"name": ""}, "addresses": []}', "BAD_REQUEST", "domain.name"),
    (b'{"v": 1, "op": "prepare", "domain": {"name": "a", "uuid": "../../etc"}, "addresses": []}',
     "BAD_REQUEST", "domain.uuid"),
    (b'{"v": 1, "op": "prepare", "domain": {"name": "a"}, "addresses": ["../../x"]}', "INVALID_ADDRESS", "../../x"),
    (b'{"v": 1, "op": "prepare", "domain": {"name": "a"}, "xml": "<!DOCTYPE d [<!ENTITY x \\"y\\">]><domain/>"}',
     "INVALID_XML", "DOCTYPE"),
    (b'{"v": 1, "op": "prepare", "domain": {"name": "a"}, "xml": "<domain><name>b</name></domain>"}',
     "BAD_REQUEST", "does not match"),
    (b'[' * 100000 + b']' * 100000, "BAD_REQUEST", "not valid JSON"),
])
def test_bad_requests_get_one_line_error_and_connection_stays_usable(daemon, line, code, needle):
    d, sim, path = daemon
    replies = raw(path, line + b"\n" + b'{"v": 1, "op": "ping"}\n')
    assert len(replies) == 2
    err = replies[0]["error"]
    assert replies[0]["ok"] is False and err["code"] == code, err
    assert needle in err["message"] or needle in (err.get("hint") or ""), err
    assert "\n" not in err["message"]
    assert replies[1]["ok"] is True
    assert sim.driver(PAIR) == "e1000e"


def test_oversize_message_is_refused_and_connection_closed(daemon):
    d, sim, path = daemon
    replies = raw(path, b'{"v": 1, "op": "ping", "pad": "' + b"x" * (MAX_MESSAGE + 100), shut=False)
    assert len(replies) == 1 and replies[0]["error"]["code"] == "TOO_LARGE"
    assert call(path, {"op": "ping"})["ok"], "server still up"


def test_message_of_exactly_the_limit_is_read(daemon):
    d, sim, path = daemon
    head = b'{"v": 1, "op": "ping", "p": "'
    body = head + b"x" * (MAX_MESSAGE - len(head) - 3) + b'"}'
    assert len(body) + 1 == MAX_MESSAGE
    replies = raw(path, body + b"\n")
    assert replies[0]["error"]["code"] == "BAD_REQUEST" and "unknown field p" in replies[0]["error"]["message"]


def test_slow_client_times_out_with_a_reply():
    with running_daemon("lab", read_timeout=0.3) as (d, sim, path):
        t0 = time.monotonic()
        replies = raw(path, b'{"v": 1, "op": ', shut=False, timeout=3)
        assert replies[0]["error"]["code"] == "TIMEOUT" and time.monotonic() - t0 < 2
        # an idle connection without a partial request is closed silently
        assert raw(path, b"", shut=False, timeout=3) == []
        assert call(path, {"op": "ping"})["ok"]


def test_non_root_peer_is_refused(daemon, monkeypatch):
    d, sim, path = daemon
    monkeypatch.setattr(api, "peer_credentials", lambda s: Peer(pid=4242, uid=1000, gid=1000))
    r = call(path, {"op": "prepare", "domain": VM1, "addresses": [PAIR]})
    assert r["ok"] is False and r["error"]["code"] == "PERMISSION_DENIED"
    assert "root only" in r["error"]["message"] and "1000" in r["error"]["message"]
    assert sim.driver(PAIR) == "e1000e"
    monkeypatch.undo()
    assert call(path, {"op": "ping"})["ok"]


def test_own_uid_is_allowed_by_default(daemon):
    d, sim, path = daemon
    assert d.server.allowed_uids == {0, os.getuid()}


def test_stale_socket_is_replaced_and_live_one_refused():
    with running_daemon("lab") as (d, sim, path):
        with running_daemon("lab", start=False) as (d2, _, _):
            d2.server.path = path
            with pytest.raises(HostdevError, match="already listening"):
                d2.server.start()
        assert call(path, {"op": "ping"})["ok"], "the refused second server did not remove the live socket"
    base = short_dir()
    stale = str(base / "hostdevd.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()                        # bound, never listening: what a killed daemon leaves
    with running_daemon("lab", start=False) as (d3, _, _):
        d3.server.path = stale
        d3.start()
        try:
            assert call(stale, {"op": "ping"})["ok"]
        finally:
            d3.stop(1)


def test_call_reports_missing_daemon():
    with pytest.raises(DaemonNotRunning, match="not running"):
        call(str(short_dir() / "nope.sock"), {"op": "ping"}, timeout=1)


def test_handler_bug_is_an_internal_error_not_a_crash(daemon, monkeypatch):
    d, sim, path = daemon
    monkeypatch.setattr(type(d), "op_ping", lambda self, req, peer: 1 / 0)
    r = call(path, {"op": "ping"})
    assert r["error"]["code"] == "INTERNAL" and "division by zero" in r["error"]["message"]
    monkeypatch.undo()
    assert call(path, {"op": "ping"})["ok"]


# --------------------------------------------------------------------------- fuzz


@pytest.fixture(scope="module")
def fuzz_daemon():
    with running_daemon("lab", read_timeout=0.5) as ctx:
        yield ctx


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(max_size=2048),
    st.text(max_size=512).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                 lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(
                     ["v", "op", "domain", "xml", "addresses", "name", "uuid", "owner", "origin"]), c, max_size=5),
                 max_leaves=12).map(lambda o: json.dumps(o).encode()),
))
def test_fuzz_server_stays_up(fuzz_daemon, data):
    d, sim, path = fuzz_daemon
    before = sim.state()
    for reply in raw(path, data, timeout=3):
        assert isinstance(reply["ok"], bool) and reply["v"] == 1
        if not reply["ok"]:
            assert set(reply["error"]) >= {"code", "message", "hint"}
    assert call(path, {"op": "ping"})["ok"]
    assert sim.state() == before


# --------------------------------------------------------------------------- concurrency


def test_64_concurrent_prepares_for_16_groups_one_owner_each():
    sim = SimKernel.from_spec(singleton_groups_spec(16))
    addrs = [f"0000:00:{i + 1:02x}.0" for i in range(16)]
    with running_daemon(sim) as (d, sim, path):
        barrier = threading.Barrier(64)
        replies: dict[int, dict] = {}

        def client(i: int) -> None:
            barrier.wait()
            replies[i] = call(path, {"op": "prepare", "domain": {"name": f"vm{i}", "uuid": uuid_for(i)},
                                     "addresses": [addrs[i % 16]]}, timeout=60)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        elapsed = time.monotonic() - t0
        assert len(replies) == 64
        claims = {c["group"]: c["owner"]["name"] for c in call(path, {"op": "status"})["claims"]}
        assert sorted(claims) == list(range(100, 116))
        for g in range(16):
            contenders = [i for i in range(64) if i % 16 == g]
            winners = [i for i in contenders if replies[i]["ok"]]
            assert len(winners) == 1, (g, [replies[i] for i in contenders])
            holder = f"vm{winners[0]}"
            assert claims[100 + g] == holder
            for i in contenders:
                if i != winners[0]:
                    err = replies[i]["error"]
                    assert err["code"] == "REFUSED", err
                    assert f"held by domain {holder} " in err["message"], err
        assert all(sim.driver(a) == "vfio-pci" for a in addrs)
        print(f"\n64 concurrent prepares over 16 groups: {elapsed * 1000:.0f} ms")
