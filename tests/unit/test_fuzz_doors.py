"""Hostile input at the doors the other fuzz tests do not reach (issue 12, item 6): the libvirt
hook (any argv, any stdin, any reply from the daemon or none) and the config file (any TOML-ish
text). Each gets a clear one-line answer and never a traceback.

Examples per run: HOSTDEVD_FUZZ_EXAMPLES (default 300) each; the README's reliability section
counts them with the other doors' (test_api.py, test_domxml.py, test_listing.py).
"""
from __future__ import annotations

import io
import os
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostdevd.core.config import Config, parse_config
from hostdevd.core.errors import ConfigError
from hostdevd.doors import hook
from hostdevd.doors.wire import DaemonNotRunning, WireError

EXAMPLES = int(os.environ.get("HOSTDEVD_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

HOSTDEV = ("<domain><devices><hostdev mode='subsystem' type='pci'><source><address domain='0x0000' "
           "bus='0x04' slot='0x00' function='0x0'/></source></hostdev></devices></domain>")
OPS = st.sampled_from(["prepare", "start", "release", "migrate", "restore", "reconnect", "stopped", "", "x" * 300])
SUBOPS = st.sampled_from(["begin", "end", "-", "", "\x00"])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=40),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
                    max_leaves=12)
LATIN1 = lambda b: b.decode("latin-1")  # noqa: E731 - any bytes as text
REPLIES = st.one_of(
    JSON.map(lambda v: ("value", v)),
    st.fixed_dictionaries({"ok": st.booleans(), "error": JSON}).map(lambda v: ("value", v)),
    st.just(("raise", DaemonNotRunning("no socket"))),
    st.text(max_size=80).map(lambda m: ("raise", WireError(m, None))),
)


@FUZZ
@given(domain=st.text(max_size=60), op=OPS, subop=SUBOPS, extra=st.lists(st.text(max_size=10), max_size=3),
       xml=st.one_of(st.just(HOSTDEV), st.text(max_size=400), st.binary(max_size=400).map(LATIN1)),
       reply=REPLIES)
def test_hook_answers_in_one_line_whatever_it_is_given(domain, op, subop, extra, xml, reply):
    kind, value = reply

    def fake_call(sock, request, timeout):
        if kind == "raise":
            raise value
        return value

    out, err = io.StringIO(), io.StringIO()
    with mock.patch.object(hook, "call", fake_call):
        rc = hook.main([domain, op, subop, *extra], socket_path="/nonexistent", stdin=io.StringIO(xml),
                       stdout=out, stderr=err)
    assert rc in (0, 1)
    lines = err.getvalue().splitlines()
    if op in ("prepare", "start") and subop == "begin":
        assert len(lines) <= 1, lines        # the one line libvirt shows the operator
    assert all(line.startswith("hostdevd") for line in lines), lines
    if op in ("migrate", "restore"):
        assert out.getvalue() == xml         # the XML filter hands libvirt its XML back, unchanged
    if rc == 1:
        assert op in ("prepare", "start") and lines, "a refused start says why"


KEYS = ["state_dir", "libvirt_uri", "reserve", "write_timeout", "policy", "sriov", "host_actions", "pf",
        "numvfs", "critical", "allow_host_critical", "bogus", "[policy]", "[[sriov]]", "[[host_actions]]"]
TOMLISH = st.lists(st.one_of(st.sampled_from(KEYS), st.sampled_from([" = ", "\n", '"', "[", "]", ",", "1", "-5",
                                                                    "true", "0000:04:00.0", "'", "#", "{", "}"]),
                             st.text(max_size=6)), max_size=40).map("".join)


@FUZZ
@given(text=TOMLISH)
def test_config_is_a_config_or_one_line_error(text):
    try:
        cfg = parse_config(text, "/etc/hostdevd/hostdevd.toml")
    except ConfigError as e:
        assert e.message.startswith("/etc/hostdevd/hostdevd.toml"), e.message
        assert "\n" not in e.message and (e.hint is None or "\n" not in e.hint), e.message
        return
    assert isinstance(cfg, Config)
