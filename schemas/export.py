"""Write the JSON Schema files that SDK authors in other languages build against.

Run ``python -m schemas.export``; tests/unit/test_schema_contract.py (events) and
tests/unit/test_batches.py (the batch envelope, in ``jsonschema/batch/``) fail when the
committed files differ from the declarations.
"""

import json
from pathlib import Path
from typing import Any

from schemas.batch import BATCH_MODELS
from schemas.events import EVENT_MODELS

JSONSCHEMA_DIR = Path(__file__).parent / "jsonschema"
BATCH_JSONSCHEMA_DIR = JSONSCHEMA_DIR / "batch"
"""Kept out of JSONSCHEMA_DIR, which holds exactly one file per event declaration."""


def render_json_schemas() -> dict[str, str]:
    """File name -> JSON text, one file per (event type, version)."""
    files: dict[str, str] = {}
    for (event_type, version), model in sorted(EVENT_MODELS.items()):
        schema: dict[str, Any] = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"tally/{event_type}/v{version}.json",
            **model.model_json_schema(),
        }
        files[f"{event_type}.v{version}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return files


def render_batch_json_schemas() -> dict[str, str]:
    """File name -> JSON text, one file per batch envelope version."""
    files: dict[str, str] = {}
    for version, model in sorted(BATCH_MODELS.items()):
        schema: dict[str, Any] = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"tally/batch/v{version}.json",
            **model.model_json_schema(),
        }
        files[f"batch.v{version}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return files


def main() -> None:
    for folder, files in (
        (JSONSCHEMA_DIR, render_json_schemas()),
        (BATCH_JSONSCHEMA_DIR, render_batch_json_schemas()),
    ):
        folder.mkdir(exist_ok=True)
        for name, text in files.items():
            (folder / name).write_text(text)


if __name__ == "__main__":
    main()
