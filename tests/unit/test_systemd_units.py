"""deploy/systemd/: one unit per long-running `tally` command, reading its settings from the
environment file, and an example of that file that names only real settings."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest

from deploy.cli import _parser
from deploy.settings import Settings, load_settings

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
UNITS = ("tally-worker", "tally-sink", "tally-collector", "tally-dashboard", "tally-up")
TALLY = "/opt/tally/.venv/bin/tally"
STATE_DIR = "/var/lib/tally"
LATER = "ARRIVES WITH THE"
"""Said in the header of a unit whose command does not exist yet."""
SETTINGS = {f"TALLY_{f.name.upper()}" for f in fields(Settings)}
_NAME = re.compile(r"\bTALLY_[A-Z0-9_]+")


def _parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file, each a list of (key, value) in order (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path.name}:{number}: not key=value: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def _values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def _one(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    values = _values(unit, section, key)
    assert len(values) == 1, f"[{section}] {key}= set {len(values)} times, not once"
    return values[0]


def _subcommands() -> set[str]:
    parser = _parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    raise AssertionError("tally has no subcommands")


def _environment_file() -> tuple[dict[str, str], dict[str, str]]:
    """The example's assignments, and those commented out (``#TALLY_X=value``)."""
    active: dict[str, str] = {}
    commented: dict[str, str] = {}
    for raw in (SYSTEMD_DIR / "tally.env.example").read_text().splitlines():
        line = raw.strip()
        target = active
        if line.startswith("#"):
            line, target = line[1:], commented
        name, sep, value = line.partition("=")
        if sep and re.fullmatch(r"TALLY_[A-Z0-9_]+", name):
            assert name not in active and name not in commented, f"{name} set twice"
            target[name] = value
        else:
            assert target is commented or not line, f"not a comment nor KEY=VALUE: {raw!r}"
    return active, commented


@pytest.mark.parametrize("name", UNITS)
def test_each_unit_runs_its_tally_command_as_tally_with_the_environment_file(name: str) -> None:
    """Each unit runs `tally <its command>` from the documented virtualenv as the user
    `tally`, with its settings from /etc/tally/tally.env, is restarted on failure (but not for
    a refused configuration), stopped by SIGTERM with a deadline, and hardened."""
    unit = _parse_unit(SYSTEMD_DIR / f"{name}.service")
    command = name.removeprefix("tally-")
    assert _one(unit, "Service", "ExecStart") == f"{TALLY} {command}"
    assert _one(unit, "Service", "EnvironmentFile") == "/etc/tally/tally.env"
    assert _one(unit, "Service", "User") == "tally"
    assert _one(unit, "Service", "Restart") == "on-failure"
    assert _one(unit, "Service", "RestartPreventExitStatus") == "2"
    assert re.fullmatch(r"\d+s", _one(unit, "Service", "RestartSec"))
    assert _one(unit, "Service", "KillSignal") == "SIGTERM"
    assert _one(unit, "Service", "KillMode") == "mixed"
    assert re.fullmatch(r"\d+s", _one(unit, "Service", "TimeoutStopSec"))
    hardening = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
    }
    assert {key: _one(unit, "Service", key) for key in hardening} == hardening
    # The state folder is the one writable place: systemd's StateDirectory, handed to Tally.
    assert _one(unit, "Service", "StateDirectory") == "tally"
    assert f"TALLY_STATE_DIR={STATE_DIR}" in _values(unit, "Service", "Environment")
    assert _one(unit, "Service", "WorkingDirectory") == STATE_DIR
    assert _one(unit, "Install", "WantedBy") == "multi-user.target"


@pytest.mark.parametrize("name", UNITS)
def test_each_unit_runs_a_real_command_or_says_it_arrives_later(name: str) -> None:
    """The command of each unit is a `tally` subcommand; a unit written ahead of its command
    says so in its header, and stops saying so once the command exists."""
    path = SYSTEMD_DIR / f"{name}.service"
    command = name.removeprefix("tally-")
    header = path.read_text().split("[Unit]", 1)[0]
    if command in _subcommands():
        assert LATER not in header, f"`tally {command}` exists now: update {path.name}'s header"
    else:
        assert LATER in header, f"`tally {command}` does not exist and {path.name} says nothing"
    if command in ("worker", "sink"):
        assert command in _subcommands()


def test_units_and_the_environment_file_name_only_real_settings() -> None:
    """Every TALLY_* name in the example environment file (comments included) and in the
    units is a field of Settings, and the example's values, commented ones included, load."""
    texts = [(SYSTEMD_DIR / "tally.env.example").read_text()]
    texts += [(SYSTEMD_DIR / f"{name}.service").read_text() for name in UNITS]
    named = {match for text in texts for match in _NAME.findall(text)}
    assert named - SETTINGS == set()
    active, commented = _environment_file()
    assert {"TALLY_KAFKA_BOOTSTRAP", "TALLY_CLICKHOUSE_PASSWORD_FILE"} <= set(active)
    settings = load_settings(active)
    assert settings.clickhouse_backend == "server" and settings.kafka_bootstrap
    assert settings.hmac_key_file is not None, "every worker host needs the same key file"
    load_settings({**active, **commented})


def test_the_environment_file_holds_no_secret_and_no_state_folder() -> None:
    """Secrets come from files (root:tally, 0640), never the environment; the state folder is
    each unit's own (its StateDirectory), so the shared file does not set it."""
    active, commented = _environment_file()
    for name in ("TALLY_CLICKHOUSE_PASSWORD", "TALLY_HMAC_KEY", "TALLY_STATE_DIR"):
        assert name not in active and name not in commented


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    """`systemd-analyze verify` (no running systemd needed) finds nothing to say about the
    units; the virtualenv's `tally` is stood in for by an executable of the same name."""
    stand_in = tmp_path / "bin" / "tally"
    stand_in.parent.mkdir()
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    copies = []
    for name in UNITS:
        copy = tmp_path / f"{name}.service"
        copy.write_text((SYSTEMD_DIR / copy.name).read_text().replace(TALLY, str(stand_in)))
        copies.append(str(copy))
    verify = subprocess.run(
        ["systemd-analyze", "verify", *copies],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    said = [line for line in verify.stderr.splitlines() if "tally" in line]
    assert verify.returncode == 0 and not said, verify.stderr
