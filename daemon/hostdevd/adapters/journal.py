"""Logging for the daemon: journald with structured fields, or stderr with key=value.

:func:`hostdevd.logfields.log_action` puts journald fields (``MESSAGE_ID``,
``HOSTDEV_ADDRESS``, ``IOMMU_GROUP``, ``DOMAIN_UUID``, ``DOMAIN_NAME``,
``ACTION``, ``RESULT``) on ``record.journal``. Under journald they become
real journal fields (``journalctl MESSAGE_ID=... IOMMU_GROUP=12``, and
``journalctl -x`` shows the catalog text); elsewhere they are appended to the
line as ``KEY=value`` so nothing is lost in a terminal or a test log.
"""
from __future__ import annotations

import logging
import os
import sys

JOURNAL_SOCKET = "/run/systemd/journal/socket"
FIELDS = ("MESSAGE_ID", "HOSTDEV_ADDRESS", "IOMMU_GROUP", "DOMAIN_UUID", "DOMAIN_NAME", "ACTION", "RESULT")
SYSLOG_IDENTIFIER = "hostdevd"


def journal_fields(record: logging.LogRecord) -> dict[str, str]:
    """The record's journald fields, upper-case names only, values as strings."""
    fields = getattr(record, "journal", None) or {}
    return {k: str(v) for k, v in fields.items() if isinstance(k, str) and k.isupper() and v is not None}


class FieldsFormatter(logging.Formatter):
    """``<time> <level> <logger>: <message> KEY=value ...`` for stderr."""

    def __init__(self, timestamps: bool = True):
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if timestamps else \
            "%(levelname)s %(name)s: %(message)s"
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = journal_fields(record)
        if fields:
            line += " " + " ".join(f"{k}={_quote(v)}" for k, v in fields.items())
        return line


def _quote(value: str) -> str:
    return value if value and not any(c.isspace() or c in "\"'" for c in value) else repr(value)


def _journal_handler_class():
    import systemd.journal as journal

    class HostdevdJournalHandler(journal.JournalHandler):
        """JournalHandler that sends ``record.journal`` as fields, and only well-formed fields.

        The stock handler sends every attribute of the record (``msg``, ``args``,
        ``journal`` as a Python repr, ...); journald drops the lower-case ones, so
        the fields hostdevd cares about would be lost.
        """

        def emit(self, record: logging.LogRecord) -> None:
            try:
                msg = self.format(record)
                fields = dict(self._extra)
                fields.update(journal_fields(record))
                if record.exc_text:
                    fields["EXCEPTION_TEXT"] = record.exc_text
                message_id = fields.pop("MESSAGE_ID", None)
                self.send(msg, MESSAGE_ID=message_id, PRIORITY=format(self.map_priority(record.levelno)),
                          LOGGER=record.name, THREAD_NAME=record.threadName, CODE_FILE=record.pathname,
                          CODE_LINE=record.lineno, CODE_FUNC=record.funcName, **fields)
            except Exception:
                self.handleError(record)

    return HostdevdJournalHandler


def journald_available() -> bool:
    return os.path.exists(JOURNAL_SOCKET)


def stderr_is_journal() -> bool:
    """systemd's test (systemd.exec(5), JOURNAL_STREAM): stderr is the unit's journal stream. A
    daemon started by hand on a systemd host keeps logging to the terminal."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def make_handler(use_journal: bool | None = None, stream=None) -> logging.Handler:
    """journald's native protocol (structured fields) when journald is there, stderr is the unit's
    journal stream and systemd-python is installed; else stderr."""
    if use_journal is None:
        use_journal = stream is None and journald_available() and stderr_is_journal()
    if use_journal:
        try:
            handler = _journal_handler_class()(SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER)
            handler.setFormatter(logging.Formatter("%(message)s"))
            return handler
        except ImportError:
            pass
    handler = logging.StreamHandler(stream or sys.stderr)
    # Under systemd without journald-side fields, the journal adds its own timestamps.
    handler.setFormatter(FieldsFormatter(timestamps="INVOCATION_ID" not in os.environ))
    return handler


def setup_logging(level: int | str = logging.INFO, use_journal: bool | None = None, stream=None) -> logging.Handler:
    """Install one handler on the root logger (replacing earlier ones from this function)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_hostdevd", False):
            root.removeHandler(h)
    handler = make_handler(use_journal, stream)
    handler._hostdevd = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    return handler
