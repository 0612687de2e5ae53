"""The key ring: rotation puts a new active key in front, destruction removes a key for good,
nothing prints a secret, and a running worker's lookups follow the ring without a restart."""

import logging
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.keys import KeyRingError, destroy_key, make_key_ring, read_key_ring, rotate_key
from deploy.settings import SettingsError, load_settings
from deploy.wiring import CurrentLookups
from schemas.consent import Consent

TALLY = Path(sys.executable).parent / "tally"


def _secrets(path: Path) -> set[str]:
    return {k.key.secret.hex() for k in read_key_ring(path)}


def test_rotation_puts_a_new_private_key_in_front_and_keeps_the_old(tmp_path: Path) -> None:
    ring = tmp_path / "secrets" / "hmac.key"
    make_key_ring(ring)
    (first,) = read_key_ring(ring)
    new = rotate_key(ring)
    keys = read_key_ring(ring)
    assert [k.key.key_id for k in keys] == ["k2", "k1"] and new.key.key_id == "k2"
    assert keys[1] == first and len(new.key.secret) == 32
    assert new.key.secret != first.key.secret and new.created_s is not None
    assert stat.S_IMODE(ring.stat().st_mode) == 0o600
    assert new.key.secret.hex() not in repr(new)


def test_destroying_a_key_removes_it_for_good_but_never_the_last(tmp_path: Path) -> None:
    ring = tmp_path / "hmac.key"
    make_key_ring(ring)
    rotate_key(ring)
    old_secret = read_key_ring(ring)[1].key.secret.hex()
    destroy_key(ring, "k1")
    assert [k.key.key_id for k in read_key_ring(ring)] == ["k2"]
    assert old_secret not in ring.read_text()
    with pytest.raises(KeyRingError, match="only key"):
        destroy_key(ring, "k2")
    with pytest.raises(KeyRingError, match="no key 'k9'"):
        destroy_key(ring, "k9")
    assert stat.S_IMODE(ring.stat().st_mode) == 0o600


def test_a_bad_ring_fails_with_one_line_naming_the_setting_not_the_secret(tmp_path: Path) -> None:
    ring = tmp_path / "hmac.key"
    settings = load_settings({"TALLY_HMAC_KEY_FILE": str(ring)})
    with pytest.raises(SettingsError, match="TALLY_HMAC_KEY_FILE: no key ring"):
        settings.hmac_keys()
    for text in ("k1:abcd\n", "k1\n", f"k1:{'11' * 32}\nk1:{'22' * 32}\n", "\n"):
        ring.write_text(text)
        with pytest.raises(SettingsError) as caught:
            settings.hmac_keys()
        assert str(caught.value).startswith("TALLY_HMAC_KEY_FILE: ") and "11" * 16 not in str(
            caught.value
        )


def test_tally_keys_list_rotate_destroy_never_print_a_secret(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "TALLY_STATE_DIR": str(tmp_path)}

    def keys(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(TALLY), "keys", *args], env=env, capture_output=True,
                              text=True, timeout=60, check=False)  # fmt: skip

    listed = keys("list")
    assert listed.returncode == 0 and "k1" in listed.stdout and "active" in listed.stdout
    assert keys("rotate").returncode == 0
    listed = keys("list")
    assert listed.stdout.index("k2") < listed.stdout.index("k1")
    destroyed = keys("destroy", "k1")
    assert destroyed.returncode == 0 and "destroyed key k1" in destroyed.stdout
    refused = keys("destroy", "k2")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    printed = "".join(r.stdout + r.stderr for r in (listed, destroyed, refused))
    ring = tmp_path / "secrets" / "hmac.key"
    assert not any(secret[:16] in printed for secret in _secrets(ring))


def test_a_running_worker_follows_rotation_and_destruction_without_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The lookups the worker asks for each batch switch to the new key once the ring file
    changes (checked once an interval), and keep the last good key if the ring breaks."""
    ring = tmp_path / "hmac.key"
    make_key_ring(ring)
    now = [0.0]
    current = CurrentLookups(
        load_settings({"TALLY_HMAC_KEY_FILE": str(ring)}), check_interval_s=5.0,
        clock=lambda: now[0],
    )  # fmt: skip
    before = current()
    assert before.key_id == "k1"
    pseudonym = before.pseudonymize_id("user-1", Consent.FULL, "2026-11-29")
    rotate_key(ring)
    now[0] = 1.0
    assert current().key_id == "k1", "looked again before the interval"
    now[0] = 6.0
    after = current()
    assert after.key_id == "k2"
    assert after.pseudonymize_id("user-1", Consent.FULL, "2026-11-29") not in ("", pseudonym)
    ring.write_text("garbage\n")
    now[0] = 12.0
    with caplog.at_level(logging.WARNING, logger="deploy.wiring"):
        assert current().key_id == "k2"
    assert "key ring not reloaded" in caplog.text and "garbage" not in caplog.text


def test_rotation_keeps_a_group_readable_ring_readable_by_its_group(tmp_path: Path) -> None:
    """A ring installed root:tally 0640 for the worker stays 0640 after a rotation."""
    ring = tmp_path / "hmac.key"
    make_key_ring(ring)
    ring.chmod(0o640)
    rotate_key(ring)
    assert stat.S_IMODE(ring.stat().st_mode) == 0o640
    ring.chmod(0o644)  # too wide: what is rewritten is never readable by others
    rotate_key(ring)
    assert stat.S_IMODE(ring.stat().st_mode) == 0o640
