"""Write the JSON Schemas of the ledger, the config and the inventory (`groups --json`) into schemas/.

    python -m hostdevd.schemagen [DIR]     (default: ./schemas)

tests/unit/test_schemas.py fails when the checked-in files are stale.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .core.config import config_json_schema
from .core.inventory import inventory_json_schema
from .core.ledger import ledger_json_schema

SCHEMAS = {
    "ledger.schema.json": ledger_json_schema,
    "config.schema.json": config_json_schema,
    "inventory.schema.json": inventory_json_schema,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "schemas")
    out.mkdir(parents=True, exist_ok=True)
    for name, fn in SCHEMAS.items():
        (out / name).write_text(fn(), encoding="utf-8")
        print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
