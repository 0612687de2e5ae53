"""PRIVACY.md, the data inventory, is generated from the schemas' declarations and is never
stale; every field a client may send has a declared fate."""

from pathlib import Path

from deploy.privacy_inventory import _check_declarations, render_inventory
from schemas.enriched import ENRICHED_COLUMNS
from schemas.events import Envelope
from schemas.inventory import ENVELOPE_FATES, Fate

ROOT = Path(__file__).resolve().parents[2]


def test_privacy_md_is_the_generated_inventory():
    assert (ROOT / "PRIVACY.md").read_text() == render_inventory(), (
        "PRIVACY.md is stale: run `python -m deploy.privacy_inventory > PRIVACY.md`"
    )


def test_every_envelope_field_has_a_declared_fate():
    assert list(ENVELOPE_FATES) == list(Envelope.model_fields)
    _check_declarations()


def test_what_the_inventory_says_is_dropped_has_no_column_anywhere():
    """A field pseudonymized or coarsened into other columns (ids, user agent, IP, referrer)
    has no column of its own in any table."""
    raw = {
        name
        for name, fate in ENVELOPE_FATES.items()
        if Fate.AS_SENT not in fate.fates.values() and name not in fate.columns
    }
    assert {"user_id", "session_id", "ip", "user_agent", "referrer"} <= raw
    for event_type, columns in ENRICHED_COLUMNS.items():
        assert not raw & {name for name, _ in columns}, event_type


def test_the_readme_links_the_inventory_and_the_statement_inside_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert "(PRIVACY.md)" in readme and "(PRIVACY-STATEMENT.md)" in readme
    assert "../shared" not in readme
