"""Shared fixtures: a simulated kernel loaded from tests/topologies/, and an Engine on it."""
from __future__ import annotations

from pathlib import Path

import pytest

from hostdevd.core.config import Config, parse_config
from hostdevd.core.engine import Engine
from hostdevd.core.ledger_store import LedgerStore
from hostdevd.core.sysfs import Sysfs
from hostdevd.sim.simkernel import SimKernel

TOPOLOGIES = Path(__file__).resolve().parents[1] / "topologies"


def load_sim(name: str) -> SimKernel:
    return SimKernel.from_file(TOPOLOGIES / f"{name}.json")


def make_engine(sim: SimKernel, state_dir, config_text: str = "", write_timeout: float = 2.0,
                netlink=None) -> Engine:
    """``netlink``: a hostdevd.sim.fakenetlink.FakeNetlink for VF MAC/VLAN (none: VFs move without them)."""
    cfg: Config = parse_config(config_text)
    cfg.state_dir = str(state_dir)
    cfg.release_wait_timeout = 0.3
    return Engine(cfg, Sysfs(sim, write_timeout=write_timeout), LedgerStore(state_dir),
                  modprobe=sim.load_module, netlink=netlink)


@pytest.fixture
def lab_sim() -> SimKernel:
    return load_sim("lab")


@pytest.fixture
def lab_engine(lab_sim, tmp_path) -> Engine:
    return make_engine(lab_sim, tmp_path / "state")


@pytest.fixture
def state(tmp_path):
    """hostdevctl arguments for a config whose state and runtime dirs are in tmp_path."""
    cfg = tmp_path / "hostdevd.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path / "run"}"\n')
    return ["--config", str(cfg)]
