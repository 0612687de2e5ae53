"""Erasure of one user's event-level rows, by the user's pseudonyms (the caller computes them
under every live key; raw ids never reach the sink).

The pseudonyms are recorded in ``tally_erasures`` first, so the writer refuses their rows
from then on: a replay of the topics or a backfill never brings them back. Rollups hold no
ids and stay. Deletion is a mutation (``ALTER TABLE ... DELETE``), which runs in the
background on both 18.16 and 26.9; this waits for it.
"""

import time
from datetime import UTC, datetime

from schemas.enriched import table_name
from sinks.backends import ClickHouseBackend
from sinks.migrations import ERASURES_TABLE, STORED_TYPES

_PSEUDONYM_CHARS = frozenset("0123456789abcdef")


def _listed(pseudonyms: list[str]) -> str:
    for pseudonym in pseudonyms:
        if len(pseudonym) != 64 or not set(pseudonym) <= _PSEUDONYM_CHARS:
            raise ValueError("a pseudonym is 64 lowercase hex digits")
    return ", ".join(f"'{pseudonym}'" for pseudonym in pseudonyms)


def erase_pseudonyms(
    backend: ClickHouseBackend, pseudonyms: list[str], timeout_s: float = 300.0
) -> dict[str, int]:
    """Remember the pseudonyms as erased and delete their rows; rows deleted per table."""
    if not pseudonyms:
        return {}
    listed = _listed(pseudonyms)
    now = datetime.now(UTC)
    backend.insert(ERASURES_TABLE, ["user_pseudonym", "erased_at"], [(p, now) for p in pseudonyms])
    deleted: dict[str, int] = {}
    for event_type in STORED_TYPES:
        table = table_name(event_type)
        [(count,)] = backend.query(
            f"SELECT count() FROM {table} WHERE user_pseudonym IN ({listed})"
        )
        deleted[table] = int(count)
        if count:
            backend.execute(f"ALTER TABLE {table} DELETE WHERE user_pseudonym IN ({listed})")
    _wait_for_mutations(backend, time.monotonic() + timeout_s)
    return deleted


def _wait_for_mutations(backend: ClickHouseBackend, deadline: float) -> None:
    while backend.query(
        "SELECT count() FROM system.mutations WHERE database = currentDatabase() AND is_done = 0"
    )[0][0]:
        if time.monotonic() > deadline:
            raise TimeoutError("the deletions are still running; they finish in the background")
        time.sleep(0.1)  # polling ClickHouse's mutation state against the deadline
