"""Logging: journald gets the structured fields; stderr gets them as KEY=value."""
from __future__ import annotations

import io
import logging
import os

import pytest

from hostdevd.adapters import journal
from hostdevd.core.ledger import Owner
from hostdevd.core.logfields import MSG, log_action

OWNER = Owner(name="vm1", uuid="00000000-0000-0000-0000-000000000001")


def emit(handler: logging.Handler) -> None:
    logger = logging.getLogger("hostdevd.test-journal")
    logger.propagate = False
    logger.handlers = [handler]
    logger.setLevel(logging.DEBUG)
    log_action(logger, logging.WARNING, "bind", "bound %s to vfio-pci", "0000:01:00.0", address="0000:01:00.0",
               group=12, owner=OWNER, action="bind", result="ok")


def test_stderr_formatter_appends_fields():
    stream = io.StringIO()
    emit(journal.make_handler(use_journal=False, stream=stream))
    line = stream.getvalue().strip()
    assert "WARNING hostdevd.test-journal: bound 0000:01:00.0 to vfio-pci" in line
    for field in (f"MESSAGE_ID={MSG['bind']}", "HOSTDEV_ADDRESS=0000:01:00.0", "IOMMU_GROUP=12",
                  "DOMAIN_NAME=vm1", f"DOMAIN_UUID={OWNER.uuid}", "ACTION=bind", "RESULT=ok"):
        assert field in line


def test_stderr_formatter_quotes_values_with_spaces():
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    rec.journal = {"DOMAIN_NAME": "my vm", "lower": "dropped", "RESULT": None}
    assert journal.FieldsFormatter(timestamps=False).format(rec) == "INFO x: m DOMAIN_NAME='my vm'"


def test_journal_handler_sends_fields_as_fields():
    pytest.importorskip("systemd.journal")
    sent = []
    handler = journal._journal_handler_class()(SYSLOG_IDENTIFIER="hostdevd",
                                               sender_function=lambda msg, **kw: sent.append((msg, kw)))
    handler.setFormatter(logging.Formatter("%(message)s"))
    emit(handler)
    msg, fields = sent[0]
    assert msg == "bound 0000:01:00.0 to vfio-pci"
    assert fields["MESSAGE_ID"] == MSG["bind"] and fields["IOMMU_GROUP"] == "12"
    assert fields["DOMAIN_UUID"] == OWNER.uuid and fields["HOSTDEV_ADDRESS"] == "0000:01:00.0"
    assert fields["PRIORITY"] == "4" and fields["SYSLOG_IDENTIFIER"] == "hostdevd"
    assert all(k.isupper() for k in fields), "journald drops lower-case field names"


def test_setup_uses_stderr_without_journald(monkeypatch):
    monkeypatch.setattr(journal, "JOURNAL_SOCKET", "/nonexistent/socket")
    handler = journal.setup_logging("DEBUG", stream=io.StringIO())
    try:
        assert isinstance(handler.formatter, journal.FieldsFormatter)
        assert logging.getLogger().level == logging.DEBUG
        again = journal.setup_logging("INFO", stream=io.StringIO())
        assert sum(getattr(h, "_hostdevd", False) for h in logging.getLogger().handlers) == 1
    finally:
        logging.getLogger().removeHandler(again)
        logging.getLogger().setLevel(logging.WARNING)


def test_setup_uses_journald_when_its_socket_exists_and_stderr_is_the_units_stream(monkeypatch, tmp_path):
    pytest.importorskip("systemd.journal")
    sock = tmp_path / "socket"
    sock.touch()
    monkeypatch.setattr(journal, "JOURNAL_SOCKET", str(sock))
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    handler = journal.make_handler()
    assert type(handler).__name__ == "HostdevdJournalHandler"


def test_started_by_hand_on_a_systemd_host_it_logs_to_stderr(monkeypatch, tmp_path):
    """journald is there, but stderr is a terminal (or a test's pipe), not the unit's stream."""
    sock = tmp_path / "socket"
    sock.touch()
    monkeypatch.setattr(journal, "JOURNAL_SOCKET", str(sock))
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert isinstance(journal.make_handler(), logging.StreamHandler)
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")                   # another process's stream
    assert isinstance(journal.make_handler(), logging.StreamHandler)
