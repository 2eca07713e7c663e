"""StrictModes for hostdevd's own files, as sshd's StrictModes does for ~/.ssh.

Whoever can change the config (``/etc/hostdevd/hostdevd.toml``) or the ledger decides which
devices hostdevd takes from the host and which drivers it gives them back to. So the daemon
refuses to start when one of them, or its directory, is group- or world-writable, or owned
by someone else than root: one line naming the path, its mode and owner, and the fix
(``chmod go-w PATH``, ``chown root PATH``). Not running as root (tests, a demo with
``--sim``), the files must belong to the current user (or root) instead. A path that does not
exist is not checked (a fresh install, no config file).
"""
from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from .errors import InsecureFile
from .ledger import LEDGER_FILE


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def problem(path: str | os.PathLike, euid: int | None = None) -> InsecureFile | None:
    """What is wrong with one path (None: nothing, or it does not exist)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return InsecureFile(f"refusing to start: cannot check {path}: {e.strerror}", "fix: check the path")
    euid = os.geteuid() if euid is None else euid
    writable = [who for who, bit in (("group", stat.S_IWGRP), ("world", stat.S_IWOTH)) if st.st_mode & bit]
    bad_owner = st.st_uid not in (0, euid)
    if not writable and not bad_owner:
        return None
    fixes = []
    if bad_owner:
        fixes.append(f"chown {'root' if euid == 0 else _user(euid)} {path}")
    if writable:
        fixes.append(f"chmod go-w {path}")
    what = []
    if writable:
        what.append(f"{'- and '.join(writable)}-writable")
    if bad_owner:
        what.append(f"owned by {_user(st.st_uid)}, not {'root' if euid == 0 else 'root or ' + _user(euid)}")
    return InsecureFile(f"refusing to start: {path} is {' and '.join(what)} "
                        f"(mode {stat.S_IMODE(st.st_mode):04o}, owner {_user(st.st_uid)})",
                        "anyone who can change it decides what hostdevd binds; fix: `" + " && ".join(fixes) + "`")


def paths_to_check(config_path: str | os.PathLike | None, state_dir: str | os.PathLike) -> list[Path]:
    """The config file and its directory (when there is a file), the state dir, the ledger and its
    previous generation."""
    out = []
    if config_path is not None and Path(config_path).exists():
        cfg = Path(config_path).absolute()
        out += [cfg, cfg.parent]
    state = Path(state_dir)
    return out + [state, state / LEDGER_FILE, state / f"{LEDGER_FILE}.bak"]


def check_files(config_path: str | os.PathLike | None, state_dir: str | os.PathLike,
                euid: int | None = None) -> None:
    """Raise InsecureFile for the first path others could change."""
    for path in paths_to_check(config_path, state_dir):
        err = problem(path, euid)
        if err is not None:
            raise err
