"""Claim and device states: enums, one table of legal moves each, and a guard on assignment.

Building a record and loading the ledger file are never checked; moving an existing
claim or device along a move the table does not have raises IllegalTransition naming
the object and both states. The file format is the one before the enums.
"""
from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from hostdevd.core.address import PciAddress
from hostdevd.core.errors import HostdevError, IllegalTransition, LedgerError
from hostdevd.core.ledger import (
    Claim,
    DeviceRecord,
    HostActionRecord,
    Ledger,
    Owner,
    SriovRecord,
    VfNetConfig,
)
from hostdevd.core.ledger_store import LedgerStore
from hostdevd.core.states import (
    CLAIM_TRANSITIONS,
    DEVICE_TRANSITIONS,
    ClaimState,
    DeviceState,
    HostActionState,
    SriovState,
    VfNetState,
    allowed,
    check_transition,
)

DATA = Path(__file__).resolve().parent / "data"
# Written by hostdevd before the states were enums (the Literal strings); see test_v1_ledger_*.
V1_LEDGER = DATA / "ledger-v1-2026-12.json"

ADDR = "0000:01:00.0"


def _device(state: str = "host") -> DeviceRecord:
    return DeviceRecord(address=ADDR, role="requested", state=state, original_driver="e1000e",
                        original_override=None)


def _claim(state: str = "claimed", device_state: str = "host") -> Claim:
    return Claim(group=12, owner=Owner(name="vm1", uuid="uuid-vm1"), state=state, devices=[_device(device_state)])


def _pairs(table):
    return [(old, new) for old, nexts in table.items() for new in sorted(nexts)]


def _illegal(enum, table):
    return [(old, new) for old, new in itertools.product(enum, enum) if old != new and new not in table[old]]


# --------------------------------------------------------------------------- the tables


def test_tables_cover_every_state_and_name_only_other_states():
    for enum, table in ((ClaimState, CLAIM_TRANSITIONS), (DeviceState, DEVICE_TRANSITIONS)):
        assert set(table) == set(enum)
        for old, nexts in table.items():
            assert nexts and old not in nexts and nexts <= set(enum), old


def test_the_tables_as_written_down():
    """The moves hostdevd makes today (executor, reconcile); a change here is a deliberate one."""
    claim = {f"{o}->{n}" for o, n in _pairs(CLAIM_TRANSITIONS)}
    device = {f"{o}->{n}" for o, n in _pairs(DEVICE_TRANSITIONS)}
    assert claim == {"claimed->active", "claimed->releasing", "claimed->failed",
                     "active->claimed", "active->releasing", "active->failed",
                     "releasing->failed",
                     "failed->releasing", "failed->active"}
    assert device == {"host->binding", "host->vfio",
                      "binding->vfio", "binding->restoring",
                      "vfio->restoring", "vfio->binding",
                      "restoring->host", "restoring->vfio"}


def test_values_are_the_strings_of_the_file_format():
    assert [s.value for s in ClaimState] == ["claimed", "active", "releasing", "failed"]
    assert [s.value for s in DeviceState] == ["host", "binding", "vfio", "restoring"]
    assert [s.value for s in VfNetState] == ["saved", "set", "libvirt"]
    assert [s.value for s in SriovState] == ["changing", "ready", "failed"]
    assert [s.value for s in HostActionState] == ["pending", "done"]


# --------------------------------------------------------------------------- legal moves


@pytest.mark.parametrize("old,new", _pairs(CLAIM_TRANSITIONS) + [(s, s) for s in ClaimState])
@pytest.mark.parametrize("how", ["assign", "move_to", "move_to_enum"])
def test_legal_claim_transition_passes(old, new, how):
    claim = _claim(old)
    if how == "assign":
        claim.state = str(new)           # as the executor writes it today: a plain string
    elif how == "move_to":
        claim.move_to(str(new))
    else:
        claim.move_to(new)
    assert claim.state == new and type(claim.state) is ClaimState
    assert allowed(ClaimState, old, new)


@pytest.mark.parametrize("old,new", _pairs(DEVICE_TRANSITIONS) + [(s, s) for s in DeviceState])
@pytest.mark.parametrize("how", ["assign", "move_to", "setattr"])
def test_legal_device_transition_passes(old, new, how):
    claim = _claim("claimed", old)
    rec = claim.device(ADDR)
    if how == "assign":
        rec.state = str(new)
    elif how == "move_to":
        rec.move_to(new)
    else:
        setattr(rec, "state", str(new))  # executor._set_state  # noqa: B010
    assert claim.devices[0].state == new and type(rec.state) is DeviceState


def test_the_moves_of_a_whole_life_pass():
    """prepare, borrow, give back, release, a failed release released again."""
    claim = _claim("claimed", "host")
    rec = claim.devices[0]
    for s in ("binding", "vfio"):
        rec.state = s
    claim.state = "active"
    claim.owner, claim.state = Owner(name="vm2"), "claimed"   # executor._claim: borrowing a reserved group
    claim.state = "active"                                    # executor._to_reservation
    claim.state = "releasing"
    rec.state = "restoring"
    claim.state = "failed"
    claim.state = "releasing"                                 # released again
    rec.state = "restoring"
    rec.state = "host"
    assert (claim.state, rec.state) == ("releasing", "host")


# --------------------------------------------------------------------------- illegal moves


@pytest.mark.parametrize("old,new", _illegal(ClaimState, CLAIM_TRANSITIONS))
def test_illegal_claim_transition_raises_naming_both_states(old, new):
    claim = _claim(old)
    with pytest.raises(IllegalTransition) as exc:
        claim.state = str(new)
    e = exc.value
    assert e.message == f"claim of group 12: illegal state change from {old} to {new}"
    assert (e.what, e.old, e.new) == ("claim of group 12", old, new)
    assert claim.state == old, "a refused move leaves the state as it was"
    with pytest.raises(IllegalTransition):
        claim.move_to(new)


@pytest.mark.parametrize("old,new", _illegal(DeviceState, DEVICE_TRANSITIONS))
def test_illegal_device_transition_raises_naming_both_states(old, new):
    rec = _device(old)
    with pytest.raises(IllegalTransition, match=f"^device {ADDR}: illegal state change from {old} to {new}"):
        rec.state = new
    assert rec.state == old
    with pytest.raises(IllegalTransition, match=f"from {old} to {new}"):
        rec.move_to(str(new))


@pytest.mark.parametrize("kind,old,new", [
    (ClaimState, "releasing", "active"),     # a release half done is never "in use" again
    (ClaimState, "releasing", "claimed"),
    (ClaimState, "failed", "claimed"),
    (ClaimState, "claimed", "claimed"),       # (legal: same state) -- checked below not to raise
    (DeviceState, "vfio", "host"),            # skipping "restoring" would lose the intent record
    (DeviceState, "host", "restoring"),
    (DeviceState, "binding", "host"),
    (DeviceState, "restoring", "binding"),
])
def test_check_transition_error_is_one_line_with_a_stable_code(kind, old, new):
    if old == new:
        check_transition(kind, old, new, "x")
        return
    with pytest.raises(IllegalTransition) as exc:
        check_transition(kind, old, new, "device 0000:02:00.0")
    e = exc.value
    assert isinstance(e, HostdevError) and e.code == "ILLEGAL_TRANSITION"
    assert "\n" not in str(e) and "device 0000:02:00.0" in str(e) and f"from {old} to {new}" in str(e)
    assert e.to_dict()["code"] == "ILLEGAL_TRANSITION" and e.hint.startswith(f"from {old} it may go to ")


def test_not_a_state_is_still_pydantics_error_and_changes_nothing():
    claim = _claim("active", "vfio")
    with pytest.raises(ValidationError, match="Input should be 'claimed', 'active', 'releasing' or 'failed'"):
        claim.state = "gone"
    with pytest.raises(ValidationError, match="Input should be 'host', 'binding', 'vfio' or 'restoring'"):
        claim.devices[0].state = "bound"
    assert (claim.state, claim.devices[0].state) == ("active", "vfio")
    with pytest.raises(ValueError):
        check_transition(ClaimState, "active", "gone", "claim of group 12")


def test_other_fields_and_unguarded_states_assign_freely():
    rec = _device("vfio")
    rec.bound_by_us, rec.role = True, "companion"
    rec.vf_netconfig = VfNetConfig(pf_netdev="enp3s0f0", vf_index=1)
    for s in ("set", "saved", "libvirt", "saved"):
        rec.vf_netconfig.state = s
    assert type(rec.vf_netconfig.state) is VfNetState
    sr = SriovRecord(pf="0000:03:00.0", numvfs=2, autoprobe=False)
    for s in ("ready", "changing", "failed", "ready"):
        sr.state = s
    ha = HostActionRecord(kind="unit", name="x.service")
    ha.state = "done"
    ha.state = "pending"
    assert (sr.state, ha.state) == ("ready", "pending")


# --------------------------------------------------------------------------- loading is never refused


@pytest.mark.parametrize("claim_state,device_state", list(itertools.product(ClaimState, DeviceState)))
def test_loading_any_state_is_never_refused(tmp_path, claim_state, device_state):
    data = {"version": 1, "claims": {"12": json.loads(_claim(claim_state, device_state).model_dump_json())}}
    (tmp_path / "ledger.json").write_text(json.dumps(data))
    for led in (LedgerStore(tmp_path).load(), Ledger.model_validate(data),
                Ledger.model_validate_json(json.dumps(data))):
        claim = led.claim_for_group(12)
        assert (claim.state, claim.devices[0].state) == (claim_state, device_state)
        assert type(claim.state) is ClaimState and type(claim.devices[0].state) is DeviceState
        copy = claim.model_copy(deep=True)
        assert copy.state == claim_state


def test_a_state_that_is_not_one_is_still_a_ledger_error(tmp_path):
    data = {"version": 1, "claims": {"12": json.loads(_claim().model_dump_json())}}
    data["claims"]["12"]["state"] = "borrowed"
    (tmp_path / "ledger.json").write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="invalid at claims.12.state: Input should be 'claimed', 'active'"):
        LedgerStore(tmp_path).load()


# --------------------------------------------------------------------------- same behaviour as strings


def test_states_compare_print_and_serialise_as_the_old_strings():
    claim = _claim("active", "binding")
    states = {d.state for d in claim.devices}
    assert claim.state == "active" and claim.state in ("active", "releasing") and claim.state != "failed"
    assert states & {"binding", "restoring"} == {"binding"} and "binding" in states
    assert f"{claim.state} {claim.devices[0].state}" == "active binding" and str(claim.state) == "active"
    assert "%s" % claim.state == "active", "as logging formats it"  # noqa: UP031
    assert format(claim.state, ">7") == " active"
    # messages that print a list of states (reconcile's drift note) read as before
    assert f"{sorted(states | {DeviceState.VFIO})}" == "['binding', 'vfio']"
    assert repr(ClaimState.FAILED) == "'failed'"
    assert json.loads(json.dumps(claim.model_dump())) == json.loads(claim.model_dump_json())
    assert json.loads(json.dumps(claim.model_dump()))["state"] == "active"
    assert claim.model_dump(mode="json")["devices"][0]["state"] == "binding"
    assert {"active": 1}[claim.state] == 1


# --------------------------------------------------------------------------- a ledger written before the enums


def test_v1_ledger_from_before_the_enums_loads_with_enum_states(tmp_path):
    shutil.copy(V1_LEDGER, tmp_path / "ledger.json")
    led = LedgerStore(tmp_path).load()
    states = {g: (c.state, [d.state for d in c.devices]) for g, c in led.claims.items()}
    assert states == {
        "12": ("active", ["vfio", "vfio"]),            # requested + companion, host actions done
        "15": ("active", ["vfio"]),                    # the reservation
        "20": ("claimed", ["binding", "host"]),        # crash mid-prepare
        "30": ("active", ["vfio"]),                    # a VF with its saved MAC/VLAN
        "40": ("failed", ["restoring"]),
        "41": ("releasing", ["host"]),
    }
    for c in led.claims.values():
        assert type(c.state) is ClaimState
        assert all(type(d.state) is DeviceState for d in c.devices)
        assert all(type(a.state) is HostActionState for a in c.host_actions)
    c12 = led.claim_for_group(12)
    assert [d.role for d in c12.devices] == ["requested", "companion"]
    assert [(a.kind, a.name, a.state) for a in c12.host_actions] == [
        ("unit", "display-manager.service", "done"), ("module", "nvidia_drm", "done")]
    assert led.claim_for_group(15).reserved and led.claim_for_group(15).owner.kind == "reservation"
    assert led.claim_for_group(20).host_actions[0].state == HostActionState.PENDING
    cfg = led.claim_for_group(30).device("0000:03:10.0").vf_netconfig
    assert cfg.state is VfNetState.SET and (cfg.requested_mac, cfg.requested_vlan) == ("52:54:00:12:34:56", 100)
    assert led.sriov["0000:03:00.0"].state is SriovState.READY and led.sriov["0000:04:00.0"].state == "failed"
    assert "0000:03:10.0" in led.sriov["0000:03:00.0"].vfs


# Fields added after the fixture was written (boot identity): absent from an old file, null
# when it is written again until the claim is next prepared.
LATER_FIELDS = {"claim": ("boot_id",), "device": ("vendor_device", "subsystem", "vfio_driver")}


def _without_later_fields(data: dict) -> dict:
    for claim in data["claims"].values():
        for key in LATER_FIELDS["claim"]:
            assert claim.pop(key, None) is None
        for rec in claim["devices"]:
            for key in LATER_FIELDS["device"]:
                assert rec.pop(key, None) is None
    return data


def test_v1_ledger_dumps_again_to_the_same_json(tmp_path):
    raw = V1_LEDGER.read_text()
    led = Ledger.model_validate_json(raw)
    assert _without_later_fields(json.loads(led.model_dump_json())) == json.loads(raw)
    assert json.loads(json.dumps(_without_later_fields(led.model_dump()))) == json.loads(raw)
    # and through the store: saved, read back, the same values (only "updated" is new)
    store = LedgerStore(tmp_path)
    store.save(led)
    again = _without_later_fields(json.loads((tmp_path / "ledger.json").read_text()))
    again.pop("updated")
    want = json.loads(raw)
    want.pop("updated")
    assert again == want


def test_v1_ledger_claims_move_on_from_where_they_stood():
    """The crashed prepare can still be rolled back or completed; the failed claim released again."""
    led = Ledger.model_validate_json(V1_LEDGER.read_text())
    half = led.claim_for_group(20)
    half.device("0000:02:00.0").state = "vfio"
    half.state = "active"
    failed = led.claim_for_group(40)
    failed.state = "releasing"
    failed.devices[0].state = "host"
    with pytest.raises(IllegalTransition, match="claim of group 41: illegal state change from releasing to active"):
        led.claim_for_group(41).state = "active"


# --------------------------------------------------------------------------- the rarer moves, made by the real code

PAIR, PAIR_B = "0000:04:00.0", "0000:04:00.1"      # lab group 15, both on e1000e
NIC = "0000:01:00.0"                                 # lab group 12, alone
VM1 = Owner(name="vm1", uuid="00000000-0000-0000-0000-000000000001")


class Crash(BaseException):
    """The daemon died here."""


def _spy_moves(monkeypatch) -> list[str]:
    """Every guarded move the code makes, as "claim old->new" / "device old->new"."""
    import hostdevd.core.ledger as ledger_mod

    moves: list[str] = []
    real = ledger_mod.check_transition

    def spy(kind, old, new, what):
        real(kind, old, new, what)
        if kind(old) != kind(new):
            moves.append(f"{what.split()[0]} {old}->{new}")

    monkeypatch.setattr(ledger_mod, "check_transition", spy)
    return moves


def test_device_already_on_vfio_at_its_bind_step_goes_binding_to_vfio(tmp_path, monkeypatch):
    """executor._bind_step: someone bound it to vfio-pci after the claim recorded it (binding,
    written ahead); the activation records it on vfio, to be given back to the driver it had."""
    from .conftest import load_sim, make_engine
    from .daemon_support import vfio_bind_by_hand

    sim = load_sim("lab")
    eng = make_engine(sim, tmp_path / "state")
    moves = _spy_moves(monkeypatch)
    eng.executor.on_step = lambda name: vfio_bind_by_hand(eng, PAIR_B) if name == f"bind:{PAIR_B}" else None
    eng.prepare([PciAddress.parse(PAIR)], VM1)
    assert "device binding->vfio" in moves
    claim = eng.ledger().claim_for_group(15)
    assert claim.state == "active" and claim.device(PAIR_B).state == "vfio"
    assert claim.device(PAIR_B).original_driver == "e1000e"


def test_incomplete_rollback_fails_the_claim_and_releasing_it_again_works(tmp_path, monkeypatch):
    """executor._rollback: claimed -> failed; a failed claim released again: failed -> releasing."""
    from .conftest import load_sim, make_engine

    sim = load_sim("lab")
    eng = make_engine(sim, tmp_path / "state")
    moves = _spy_moves(monkeypatch)
    sim.fail_writes("drivers_probe", count=2)    # the bind's probe, then the rollback's
    with pytest.raises(HostdevError, match="rollback incomplete"):
        eng.prepare([PciAddress.parse(NIC)], VM1)
    claim = eng.ledger().claim_for_group(12)
    assert claim.state == "failed" and claim.device(NIC).state == "restoring"
    # host->binding: the claim's own record, written ahead with the claim in one save
    assert moves == ["device host->binding", "device binding->restoring", "claim claimed->failed"]
    eng.release(VM1)
    assert eng.ledger().claims == {} and sim.driver(NIC) == "e1000e"
    assert moves[3:] == ["claim failed->releasing"]      # the device's return is the drop's outcome


def test_reconcile_completing_a_prepare_whose_rollback_had_begun(tmp_path, monkeypatch):
    """reconcile: a device recorded "restoring" but still on vfio-pci, the domain running with
    the group: restoring -> vfio, claimed -> active."""
    from hostdevd.core.reconcile import RunningDomain, reconcile

    from .conftest import load_sim, make_engine

    sim = load_sim("lab")
    eng = make_engine(sim, tmp_path / "state")

    def on_step(name):
        if name == "activate:15":
            raise RuntimeError("the last step failed")   # -> rollback, PAIR_B first

    real_override = eng.executor.sysfs.set_driver_override

    def override(addr, value):
        if str(addr) == PAIR_B and value != "vfio-pci":
            raise Crash("died while putting it back")    # recorded "restoring", still on vfio-pci
        return real_override(addr, value)

    eng.executor.on_step = on_step
    monkeypatch.setattr(eng.executor.sysfs, "set_driver_override", override)
    with pytest.raises(Crash):
        eng.prepare([PciAddress.parse(PAIR)], VM1)
    claim = eng.ledger().claim_for_group(15)
    assert claim.state == "claimed" and claim.device(PAIR_B).state == "restoring"
    assert sim.driver(PAIR) == sim.driver(PAIR_B) == "vfio-pci"

    fresh = make_engine(sim, eng.config.state_dir)
    moves = _spy_moves(monkeypatch)
    report = reconcile(fresh, [RunningDomain(VM1.name, VM1.uuid, [PciAddress.parse(PAIR)])])
    assert [f["action"] for f in report.finished] == ["completed half prepare"]
    # PAIR_B's rollback had saved "restoring"; PAIR was still "binding" (written ahead, bound)
    assert moves == ["device binding->vfio", "device restoring->vfio", "claim claimed->active"]
    fresh.release(VM1)
    assert sim.driver(PAIR) == sim.driver(PAIR_B) == "e1000e"
