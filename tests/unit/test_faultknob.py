"""The lab's fault knob (doors/faultknob.py): crash once, pause, off by default."""
from __future__ import annotations

import pytest

from hostdevd.doors import faultknob


class Exited(Exception):
    pass


def _exit(code: int) -> None:
    raise Exited(code)


class Paused(Exception):
    pass


def _sleep(seconds: float) -> None:
    raise Paused(seconds)


def test_off_without_the_environment():
    assert faultknob.from_environment({}) is None


def test_crash_is_one_shot_and_only_at_its_boundary(tmp_path):
    f = tmp_path / "fault"
    f.write_text("crash bind:0000:04:00.1\n")
    hook = faultknob.from_environment({"HOSTDEVD_FAULT_FILE": str(f)}, exit_now=_exit)
    hook("bind:0000:04:00.0")                       # another boundary: nothing happens
    with pytest.raises(Exited) as e:
        hook("bind:0000:04:00.1")
    assert e.value.args == (137,)
    assert not f.exists()                           # a restarted daemon recovers undisturbed
    hook("bind:0000:04:00.1")


def test_pause_records_where_it_stopped(tmp_path):
    f = tmp_path / "fault"
    f.write_text("pause restore:0000:04:00.1\nbogus x\n")
    hook = faultknob.from_environment({"HOSTDEVD_FAULT_FILE": str(f)}, exit_now=_exit, sleep=_sleep)
    with pytest.raises(Paused):
        hook("restore:0000:04:00.1")
    assert (tmp_path / "fault.paused").read_text() == "restore:0000:04:00.1\n"


def test_missing_file_means_no_fault(tmp_path):
    hook = faultknob.from_environment({"HOSTDEVD_FAULT_FILE": str(tmp_path / "none")}, exit_now=_exit)
    hook("claim:3")


def test_parse_ignores_what_it_does_not_know():
    assert faultknob.parse("crash a\npause b\nexplode c\n\nonly\n") == {"a": "crash", "b": "pause"}
