"""`tally erase --user ID` as a user runs it, on embedded ClickHouse: it records the user's
pseudonym under every live key of the ring, deletes their rows, and never prints, logs or
stores the raw id."""

import os
import subprocess
import sys
from pathlib import Path

from deploy.settings import load_settings
from schemas.consent import Consent
from schemas.enriched import table_name
from sinks.backends import EmbeddedClickHouse
from sinks.migrations import ERASURES_TABLE, apply_migrations
from sinks.writer import ClickHouseWriter
from streams.pseudonymize import Pseudonymizer
from tests.integration.test_rollups import NOW, workload, write

RAW_ID = "zq7-raw-user-id-MARK"


def _tally(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env["TALLY_STATE_DIR"] = str(state_dir)
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


def test_tally_erase_deletes_by_the_rings_pseudonyms_and_never_shows_the_raw_id(tmp_path: Path):
    state_dir = tmp_path / "state"
    assert _tally(state_dir, "keys", "list").returncode == 0  # makes the ring
    assert _tally(state_dir, "keys", "rotate").returncode == 0  # a ring of two live keys
    settings = load_settings({"TALLY_STATE_DIR": str(state_dir)})
    keys = settings.hmac_keys()
    assert len(keys) == 2
    pseudonyms = {Pseudonymizer(k).pseudonymize_id(RAW_ID, Consent.FULL, "") for k in keys}
    with EmbeddedClickHouse(state_dir / "clickhouse", settings.clickhouse_database) as backend:
        apply_migrations(backend)
        writer = ClickHouseWriter(backend)
        records = workload(["someone-else"], NOW)
        for n, pseudonym in enumerate(sorted(pseudonyms)):  # the user under each key
            for record in workload([f"x{n}"], NOW):
                records.append(record | {"user_pseudonym": pseudonym})
        write(writer, records)
    erased = _tally(state_dir, "erase", "--user", RAW_ID)
    assert erased.returncode == 0, erased.stderr
    assert f"{table_name('login')}: 4 rows deleted" in erased.stdout
    assert "under 2 live keys" in erased.stdout
    assert RAW_ID not in erased.stdout + erased.stderr
    with EmbeddedClickHouse(state_dir / "clickhouse", settings.clickhouse_database) as backend:
        stored = {row[0] for row in backend.query(f"SELECT user_pseudonym FROM {ERASURES_TABLE}")}
        assert stored == pseudonyms
        [(left,)] = backend.query(f"SELECT count() FROM {table_name('login')}")
        assert left == 2  # someone else's
    for log in state_dir.rglob("*.log"):
        assert RAW_ID not in log.read_text(errors="replace"), log
