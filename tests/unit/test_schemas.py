"""The checked-in JSON Schemas match the pydantic models (regenerate: python -m hostdevd.schemagen)."""
from pathlib import Path

import pytest

from hostdevd.schemagen import SCHEMAS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_is_current(name):
    checked_in = (ROOT / "schemas" / name).read_text(encoding="utf-8")
    assert checked_in == SCHEMAS[name](), f"schemas/{name} is stale: run `python -m hostdevd.schemagen`"
