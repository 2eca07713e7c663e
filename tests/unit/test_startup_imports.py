"""Start-up pays only for what a command uses (issue 13): `hostdevctl --version` imports none of
hostdevd's models, `groups` and the other read-only commands none of the XML parser or the daemon's
outside libraries, the hook nothing but the standard library. Each check runs in a fresh
interpreter and reads sys.modules there; no time is measured."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import hostdevd

PKG_PARENT = str(Path(hostdevd.__file__).resolve().parents[1])
TOPOLOGIES = Path(__file__).resolve().parents[1] / "topologies"
HEAVY = ("lxml", "libvirt", "pyroute2", "pyudev", "systemd")


def loaded_after(code: str) -> set[str]:
    """Top-level and hostdevd modules a fresh interpreter holds after ``code``."""
    script = (f"import sys\nsys.path.insert(0, {PKG_PARENT!r})\n{code}\n"
              "_seen = sorted(sys.modules)\nimport json\nprint('MODULES=' + json.dumps(_seen))\n")
    out = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=120)
    line = next((x for x in out.stdout.splitlines() if x.startswith("MODULES=")), None)
    assert line is not None, out.stdout + out.stderr
    names = json.loads(line[len("MODULES="):])
    return {n.split(".")[0] for n in names} | {n for n in names if n.startswith("hostdevd.")}


def test_version_imports_no_model_and_no_outside_library():
    mods = loaded_after("from hostdevd.doors.cli import main\n"
                        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass")
    assert not mods & {*HEAVY, "pydantic", "pydantic_core", "json", "logging", "argparse"}
    assert not {m for m in mods if m.startswith("hostdevd.core.") and m != "hostdevd.core.errors"}


@pytest.mark.parametrize("argv", [["groups"], ["status"], ["groups", "--json"]])
def test_read_only_commands_import_no_xml_parser_and_no_daemon_library(tmp_path, argv):
    # Under a moved sysfs root (an empty one: no devices), as the lab and tests run it.
    (tmp_path / "sys").mkdir()
    mods = loaded_after("from hostdevd.doors.cli import main\n"
                        f"main(['--state-dir', {str(tmp_path / 'state')!r}, '--sysfs-root', "
                        f"{str(tmp_path / 'sys')!r}] + {argv!r}, out=lambda s: None)")
    assert "hostdevd.doors.cli_inspect" in mods          # the command did run
    assert not mods & set(HEAVY), sorted(mods & set(HEAVY))
    assert "hostdevd.core.domxml" not in mods


def test_real_host_engine_defers_pyudev_and_pyroute2():
    # On /sys the Engine gets the udev waiter and the netlink backend; neither imports its
    # library until a VF is waited for or configured.
    mods = loaded_after("from hostdevd.core.config import Config\n"
                        "from hostdevd.doors.wiring import host_engine\n"
                        "host_engine(Config())")
    assert not mods & {"pyudev", "pyroute2", "lxml", "libvirt"}, sorted(mods & set(HEAVY))


def test_hook_import_path_is_standard_library_only():
    mods = loaded_after("from hostdevd.doors.hook import main")
    assert not mods & {*HEAVY, "pydantic", "pydantic_core"}
    assert {m for m in mods if m.startswith("hostdevd.")} <= {"hostdevd.doors", "hostdevd.doors.hook",
                                                                "hostdevd.doors.wire"}


def test_the_checks_can_fail():
    # The same check on a path that does import lxml: the tests above would see it.
    assert "lxml" in loaded_after("import hostdevd.core.domxml")


def test_hook_imports_neither_json_nor_socket_nor_re():
    # The C halves (_json, _socket) do the hook's work; json, socket, typing and enum would pull
    # in re and enum, about half of the hook's own start-up.
    mods = loaded_after("from hostdevd.doors.hook import main")
    assert not mods & {"json", "socket", "re", "typing", "enum"}, sorted(mods & {"json", "socket", "re", "typing"})


@pytest.mark.parametrize("value", [
    {"v": 1, "op": "prepare",
     "xml": "<domain type='kvm'>\n\t<name>a\"b\\c</name>\u00e9\u2603\U0001f600\x00\x1f</domain>",
     "addresses": ["0000:01:00.0"], "n": -3, "f": 2.5, "big": 10 ** 20, "t": True, "no": False, "none": None,
     "nested": {"a": [1, [2, {"b": []}], {}], "": ""}},
    [], "", 0, 1e-7,
])
def test_the_hooks_json_is_json(value):
    from hostdevd.doors import wire
    text = wire._dumps(value)
    assert text == json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    assert wire._loads(text) == json.loads(text) == value
    assert wire._loads(f" \n{json.dumps(value, indent=2)}\n ") == value


@pytest.mark.parametrize("bad", ["", "{", '{"a": 1} x', "[1,]", "{'a': 1}", "nul", '"\x01"'])
def test_the_hooks_json_refuses_what_json_refuses(bad):
    from hostdevd.doors import wire
    with pytest.raises(ValueError):
        json.loads(bad)
    with pytest.raises(ValueError):
        wire._loads(bad)


def test_the_hooks_json_refuses_what_json_cannot_write():
    from hostdevd.doors import wire
    for bad in ({1: "x"}, {"x": object()}, {"x": float("nan")}):
        with pytest.raises((TypeError, ValueError)):
            wire._dumps(bad)
