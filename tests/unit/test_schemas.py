"""The checked-in JSON Schemas match the pydantic models (regenerate: python -m hostdevd.schemagen).
Compared as JSON values: pydantic 2.10 (Debian 13) writes a float bound 0 as ``0``, 2.12 as ``0.0``."""
import json
from pathlib import Path

import pytest

from hostdevd.schemagen import SCHEMAS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_is_current(name):
    checked_in = (ROOT / "schemas" / name).read_text(encoding="utf-8")
    assert json.loads(checked_in) == json.loads(SCHEMAS[name]()), \
        f"schemas/{name} is stale: run `python -m hostdevd.schemagen`"
