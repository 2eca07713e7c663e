"""hostdevctl: status, dry-run plans, host checks, and prepare/release by hand.

Exit codes: 0 ok, 1 refused or problem found, 2 usage error. Every command
takes --json. Read-only commands work without the daemon.

This module holds the parser and main(); the commands live by topic in
cli_inspect (groups, status, check), cli_claims (plan, prepare, release),
cli_hotplug (attach, detach, check-migrate), cli_sriov (vfs), cli_export (export) and cli_metrics
(metrics), and share
cli_common (Context, output helpers, daemon routing).
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from .. import __version__
from ..core.errors import HostdevError, UsageError

if TYPE_CHECKING:
    import argparse

    from ..core.sysfs import Sysfs
    from ..core.vfnet import NetlinkBackend

Out = Callable[[str], None]

# Each command's module is imported only when that command runs (issue 13): `--version` and
# `--help` import none of them, `groups` not the XML, hot-plug or SR-IOV code.
_COMMANDS = {
    "cmd_groups": "cli_inspect", "cmd_check": "cli_inspect", "cmd_status": "cli_inspect",
    "cmd_plan": "cli_claims", "cmd_prepare": "cli_claims", "cmd_release": "cli_claims",
    "cmd_attach": "cli_hotplug", "cmd_detach": "cli_hotplug", "cmd_check_migrate": "cli_hotplug",
    "cmd_export": "cli_export", "cmd_vfs": "cli_sriov", "cmd_vfs_set": "cli_sriov",
    "cmd_metrics": "cli_metrics",
}


def _command(name: str) -> Callable[..., int]:
    return getattr(importlib.import_module(f".{_COMMANDS[name]}", __package__), name)


def _parser_class() -> type[argparse.ArgumentParser]:
    import argparse

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:  # argparse exits 2 as well; keep one line
            raise UsageError(f"{self.prog}: {message}", f"see `{self.prog} --help`")
    return _Parser


def build_parser() -> argparse.ArgumentParser:
    _Parser = _parser_class()
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    p = _Parser(prog="hostdevctl", description=__doc__.splitlines()[0], parents=[common])
    p.add_argument("--version", action="version", version=f"hostdevctl {__version__}")
    p.add_argument("--config", help="config file (default /etc/hostdevd/hostdevd.toml)")
    p.add_argument("--state-dir", help="ledger directory (default from config: /var/lib/hostdevd)")
    p.add_argument("--sysfs-root", help="sysfs mount point (default /sys; for tests and the lab)")
    p.add_argument("--no-daemon", action="store_true",
                   help="prepare/release in this process even when the daemon runs")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def source_opts(sp: argparse.ArgumentParser) -> None:
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--listing", metavar="FILE", help="an IOMMU-group listing (forum post style) instead of sysfs")
        g.add_argument("--snapshot", metavar="FILE", help="a JSON snapshot from `groups --save`")

    def request_opts(sp: argparse.ArgumentParser, owner: bool = True) -> None:
        sp.add_argument("xml", nargs="?", help="domain XML file (or - for stdin)")
        sp.add_argument("--device", action="append", metavar="BDF", help="PCI address; repeatable")
        if owner:
            sp.add_argument("--owner", metavar="NAME", help="owning domain name")
            sp.add_argument("--uuid", metavar="UUID", help="owning domain UUID")

    sp = sub.add_parser("groups", parents=[common], help="IOMMU groups, devices, drivers and owners")
    source_opts(sp)
    sp.add_argument("--save", metavar="FILE", help="also write a JSON snapshot")
    sp.set_defaults(func="cmd_groups")

    sp = sub.add_parser("plan", parents=[common], help="dry run: what prepare (or --release) would do")
    request_opts(sp)
    source_opts(sp)
    sp.add_argument("--release", action="store_true", help="plan a release instead")
    sp.set_defaults(func="cmd_plan")

    sp = sub.add_parser("check", parents=[common], help="validate the host for passthrough")
    sp.set_defaults(func="cmd_check")

    sp = sub.add_parser("prepare", parents=[common], help="claim groups and bind them to vfio-pci")
    request_opts(sp)
    sp.set_defaults(func="cmd_prepare")

    sp = sub.add_parser("release", parents=[common], help="release claims and restore recorded drivers")
    request_opts(sp)
    sp.set_defaults(func="cmd_release")

    for name, what in (("attach", "prepare the device's group, then hot-plug it into a running domain"),
                       ("detach", "hot-unplug a device, wait for the guest to let go, then release its group "
                                  "when nothing else of the domain uses it")):
        sp = sub.add_parser(name, parents=[common], help=what + " (needs the daemon)")
        sp.add_argument("domain", help="domain name")
        sp.add_argument("xml", nargs="?", help="device XML file (<hostdev> or <interface type='hostdev'>)")
        sp.add_argument("--device", action="append", metavar="BDF", help="PCI address; repeatable")
        sp.add_argument("--live", action="store_true",
                        help="the running domain (neither --live nor --config: the domain's current state)")
        # dest differs from the global --config (the config file) that precedes the command
        sp.add_argument("--config", dest="persist", action="store_true", help="the persistent definition")
        if name == "detach":
            sp.add_argument("--timeout", type=float, metavar="SECONDS",
                            help="how long to wait for the guest to let go (default: detach_timeout, 30)")
        sp.set_defaults(func="cmd_attach" if name == "attach" else "cmd_detach")

    sp = sub.add_parser("check-migrate", parents=[common],
                        help="which assigned devices block a live migration, and which can be hot-unplugged first")
    sp.add_argument("domain", help="domain name")
    sp.add_argument("--xml", metavar="FILE", help="judge this domain XML (virsh dumpxml) instead of asking libvirt")
    sp.set_defaults(func="cmd_check_migrate")

    sp = sub.add_parser("export", parents=[common], help="passthrough config for OpenStack Nova ([pci] device_spec "
                        "and alias) or KubeVirt (permittedHostDevices): whole IOMMU groups only")
    sp.add_argument("target", choices=["nova", "kubevirt"])
    source_opts(sp)
    sp.add_argument("--resource-domain", metavar="DOMAIN",
                    help="kubevirt: the domain of every resourceName (default: the vendor's, e.g. intel.com)")
    sp.set_defaults(func="cmd_export")

    sp = sub.add_parser("status", parents=[common], help="the ledger: claims, owners, recorded drivers")
    sp.set_defaults(func="cmd_status")

    sp = sub.add_parser("metrics", parents=[common], help="Prometheus metrics: the daemon's (counters included), "
                        "or the host's state computed here without it")
    sp.add_argument("--textfile", metavar="DIR", help="write DIR/hostdevd.prom atomically for node_exporter's "
                    "textfile collector instead of printing")
    sp.set_defaults(func="cmd_metrics")

    sp = sub.add_parser("vfs", parents=[common], help="SR-IOV PFs and their VFs: group, driver, owner, MAC, VLAN")
    sp.set_defaults(func="cmd_vfs")
    vsub = sp.add_subparsers(dest="vfs_command", parser_class=_Parser)
    vs = vsub.add_parser("set", parents=[common], help="set a PF's VF count (through 0); refused while any VF "
                         "is assigned (through the daemon when it runs)")
    vs.add_argument("pf", help="the PF: PCI address or network interface name")
    vs.add_argument("numvfs", type=int, help="number of VFs (0 removes them)")
    g = vs.add_mutually_exclusive_group()
    g.add_argument("--autoprobe", dest="autoprobe", action="store_true", default=None,
                   help="new VFs are probed by host drivers")
    g.add_argument("--no-autoprobe", dest="autoprobe", action="store_false",
                   help="new VFs stay driverless until a domain gets one")
    vs.add_argument("--wait-timeout", type=float, metavar="S", help="seconds to wait for the VFs (udev)")
    vs.set_defaults(func="cmd_vfs_set")
    return p


def main(argv: list[str] | None = None, sysfs: Sysfs | None = None,
         out: Out = print, netlink: NetlinkBackend | None = None) -> int:
    if (argv if argv is not None else sys.argv[1:]) == ["--version"]:
        out(f"hostdevctl {__version__}")             # what argparse's version action prints, without argparse
        return 0
    try:
        args = build_parser().parse_args(argv)      # --help ends here: nothing more imported
        import logging
        logging.basicConfig(level=logging.WARNING, format="hostdevctl: %(message)s")
        from .cli_common import Context, forget_stdin
        forget_stdin()
        return _command(args.func)(Context(args, sysfs, netlink), out)
    except HostdevError as e:
        as_json = "--json" in (argv if argv is not None else sys.argv[1:])
        if as_json and not isinstance(e, UsageError):
            import json
            out(json.dumps({"ok": False, "error": e.to_dict()}))
        print(f"hostdevctl: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
