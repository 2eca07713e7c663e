"""Ledger: versioned model, atomic replace, clear errors, serialised read-modify-write."""
import json
import threading

import pytest

from hostdevd.core.errors import InvalidAddress, LedgerError
from hostdevd.core.ledger import Claim, DeviceRecord, Ledger, Owner
from hostdevd.core.ledger_store import LedgerStore


def _claim(group, name="vm1", addr="0000:01:00.0"):
    return Claim(group=group, owner=Owner(name=name, uuid=f"uuid-{name}"), devices=[
        DeviceRecord(address=addr, role="requested", original_driver="e1000e", original_override="e1000e")])


def test_missing_file_is_empty_ledger(tmp_path):
    assert LedgerStore(tmp_path / "s").load().claims == {}


def test_roundtrip_keeps_original_driver_and_override(tmp_path):
    store = LedgerStore(tmp_path)
    with store.transaction() as led:
        led.put(_claim(12))
    again = store.load()
    rec = again.claim_for_group(12).device("01:00.0")
    assert rec.original_driver == "e1000e" and rec.original_override == "e1000e"
    assert json.loads((tmp_path / "ledger.json").read_text())["version"] == 1
    assert oct((tmp_path / "ledger.json").stat().st_mode & 0o777) == "0o600"


def test_failed_transaction_does_not_save(tmp_path):
    store = LedgerStore(tmp_path)
    with pytest.raises(RuntimeError):
        with store.transaction() as led:
            led.put(_claim(3))
            raise RuntimeError("boom")
    assert store.load().claims == {}


def test_no_temp_files_left_and_backup_kept(tmp_path):
    store = LedgerStore(tmp_path)
    for g in range(3):
        with store.transaction() as led:
            led.put(_claim(g, addr=f"0000:0{g}:00.0"))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ledger.json", "ledger.json.bak", "ledger.lock"]
    assert len(Ledger.model_validate_json((tmp_path / "ledger.json.bak").read_text()).claims) == 2


@pytest.mark.parametrize("content,needle", [
    ("{not json", "not valid JSON"),
    ('{"version": 99, "claims": {}}', "version 99"),
    ('{"version": 1, "claims": {"1": {"group": 1}}}', "invalid at claims.1"),
])
def test_corrupt_ledger_is_a_clear_error(tmp_path, content, needle):
    (tmp_path / "ledger.json").write_text(content)
    with pytest.raises(LedgerError, match=needle):
        LedgerStore(tmp_path).load()


def test_bad_address_in_record_rejected():
    with pytest.raises(InvalidAddress):
        DeviceRecord(address="../../etc", role="requested", original_driver=None, original_override=None)


def test_concurrent_transactions_serialise(tmp_path):
    store = LedgerStore(tmp_path)
    errors = []

    def worker(i):
        try:
            for j in range(10):
                with store.transaction() as led:
                    led.put(_claim(i * 100 + j, name=f"vm{i}", addr=f"0000:{i:02x}:{j:02x}.0"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert len(store.load().claims) == 80


def test_owner_identity():
    a = Owner(name="vm", uuid="u1")
    assert a.same(Owner(name="renamed", uuid="u1"))
    assert not a.same(Owner(name="vm", uuid="u2"))
    assert a.same(Owner(name="vm"))  # by name when one side has no uuid
