"""The package's floors: the core talks to nothing outside, each outside library has one door,
and every exception class lives in core/errors.py (wire.py's excepted: the hook imports it alone)."""
from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import hostdevd
from hostdevd.core import errors

PACKAGE = Path(hostdevd.__file__).resolve().parent
OUTSIDE = ("libvirt", "systemd", "pyudev", "pyroute2")


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module name, at module level?) for every import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name.split(".")[0], id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module.split(".")[0], id(node) in top))
    return out


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_core_imports_no_outside_library():
    names = [f"hostdevd.core.{m.name}" for m in pkgutil.iter_modules([str(PACKAGE / "core")])]
    # -I ignores PYTHONPATH: put this checkout's package first (a worktree beside an installed one).
    code = (f"import sys, importlib\nsys.path.insert(0, {str(PACKAGE.parent)!r})\n"
            f"for n in {names!r}: importlib.import_module(n)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {OUTSIDE!r}))")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_each_outside_library_has_one_door():
    doors = {"pyroute2": {"adapters/netlink.py"}, "pyudev": {"adapters/udev.py"}}
    for lib, allowed in doors.items():
        users = {p.relative_to(PACKAGE).as_posix() for p in _sources() if any(m == lib for m, _ in _imports(p))}
        assert users == allowed, lib


def test_core_and_sim_never_import_outside_libraries_at_module_level():
    for p in _sources():
        rel = p.relative_to(PACKAGE).as_posix()
        if rel.startswith(("core/", "sim/")):
            assert not [m for m, top in _imports(p) if top and m in OUTSIDE], rel


def test_exception_classes_live_in_errors():
    allowed = {"core/errors.py", "doors/wire.py", "sim/simkernel.py"}   # simkernel: a private control-flow signal
    for p in _sources():
        rel = p.relative_to(PACKAGE).as_posix()
        if rel in allowed:
            continue
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b).split(".")[-1] for b in node.bases}
                assert not bases & ({"Exception", "BaseException"} | set(vars(errors))), f"{rel}: {node.name}"


def test_moved_exceptions_keep_their_codes():
    expected = {
        "BadRequest": ("BAD_REQUEST", 2), "UnknownOp": ("UNKNOWN_OP", 2),
        "UnsupportedVersion": ("UNSUPPORTED_VERSION", 2), "TooLarge": ("TOO_LARGE", 2),
        "RequestTimeout": ("TIMEOUT", 2), "PermissionDenied": ("PERMISSION_DENIED", 1), "Busy": ("BUSY", 1),
        "InternalError": ("INTERNAL", 1), "LibvirtFailure": ("LIBVIRT", 1),
        "LibvirtUnavailable": ("LIBVIRT_UNAVAILABLE", 1), "NetlinkError": ("NETLINK", 1),
        "SriovTimeout": ("SRIOV_TIMEOUT", 1),
    }
    for name, (code, status) in expected.items():
        cls = getattr(errors, name)
        assert issubclass(cls, errors.HostdevError) and (cls.code, cls.exit_status) == (code, status), name
    assert issubclass(errors.LibvirtUnavailable, errors.LibvirtFailure)
    assert issubclass(errors.SriovTimeout, errors.ExecutionFailed)
    assert errors.NetlinkError("x", err=11).errno == 11


def _package_imports(path: Path) -> set[str]:
    """The hostdevd floors (core, adapters, doors, sim) a file imports, relative or absolute."""
    rel = path.relative_to(PACKAGE).parts
    here = rel[0] if len(rel) == 2 else None
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and here is not None:
                out.add(here)
            elif node.level in (1, 2):
                mod = (node.module or "").split(".")[0]
                out |= {mod} if mod else {a.name for a in node.names}
            elif node.module and node.module.startswith("hostdevd."):
                out.add(node.module.split(".")[1])
    return out & {"core", "adapters", "doors", "sim"}


def test_floors_import_only_downwards():
    """core imports no other floor; adapters only core; sim only core; the doors anything but sim
    (the daemon's `run --sim` demo is the one door onto the simulated kernel)."""
    allowed = {"core": {"core"}, "adapters": {"core", "adapters"}, "sim": {"core", "sim"},
               "doors": {"core", "adapters", "doors"}}
    for p in _sources():
        rel = p.relative_to(PACKAGE).as_posix()
        floor = rel.split("/")[0]
        if floor not in allowed:
            continue
        extra = _package_imports(p) - allowed[floor]
        if rel == "doors/daemon_main.py":
            extra -= {"sim"}
        assert not extra, f"{rel} imports {sorted(extra)}"


def test_only_the_executor_writes_the_ledger():
    """Ledger transactions and saves appear only in the executor's modules and the ledger itself."""
    writers = set()
    for p in _sources():
        text = p.read_text(encoding="utf-8")
        if ".transaction()" in text or "store.save(" in text or "self.save(" in text:
            writers.add(p.relative_to(PACKAGE).as_posix())
    executor = {"core/executor.py", "core/executor_base.py", "core/executor_host.py", "core/executor_sriov.py",
                "core/executor_records.py",
                "core/executor_vfnet.py"}
    assert writers - executor == {"core/ledger_store.py"}, sorted(writers - executor)
    assert "core/executor.py" in writers
