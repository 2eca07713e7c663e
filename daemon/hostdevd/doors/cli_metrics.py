"""hostdevctl metrics: the Prometheus families, printed or written for node_exporter's textfile collector.

With the daemon running, its families (live counters included) come over the socket; without it
(or with --no-daemon) the state families are computed here from sysfs and the ledger, as
`groups` does, and the counters are absent (``hostdevd_daemon_running`` 0 says so).
"""
from __future__ import annotations

import json
import sys

from ..core.opstate import OpState, op_state
from .cli_common import EXIT_OK, Context, Out, ask_daemon, daemon_socket


def _local_state(ctx: Context) -> OpState:
    return op_state(ctx.engine.topology(with_critical=False), ctx.ledger())


def cmd_metrics(ctx: Context, out: Out) -> int:
    # prometheus_client only for this command: every other one starts without it.
    from .metrics import Metrics, generate_latest, registry_from_text, write_textfile

    source, registry = "local", None
    sock = daemon_socket(ctx)
    if sock:
        reply = ask_daemon(sock, {"op": "metrics"}, timeout=30)
        if reply.get("ok"):
            source, registry = "daemon", registry_from_text(reply.get("text", ""))
        else:                          # a daemon older than the op: say so, count here
            err = reply.get("error", {})
            print(f"hostdevctl: the daemon gave no metrics ({err.get('message', 'error')}); computed here "
                  "without its counters", file=sys.stderr)
    if registry is None:
        registry = Metrics(lambda: _local_state(ctx), live=False).registry
    path = write_textfile(ctx.args.textfile, registry) if ctx.args.textfile else None
    if ctx.args.json:
        out(json.dumps({"ok": True, "source": source, "textfile": path,
                        **({} if path else {"text": generate_latest(registry).decode()})}, indent=2))
    elif path is None:
        out(generate_latest(registry).decode().rstrip("\n"))
    return EXIT_OK
