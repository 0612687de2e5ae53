"""The layout is the architecture: stages speak schemas and never import each other."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = {
    "schemas": {"schemas"},
    "producers": {"producers", "schemas"},
    "streams": {"streams", "schemas"},
    "sinks": {"sinks", "schemas"},
    "deploy": {"deploy", "schemas", "producers", "streams", "sinks"},
}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_follow_the_data_flow(package):
    """A package imports only what its stage may: schemas imports nothing of ours."""
    for path in (ROOT / package).rglob("*.py"):
        bad = _imported_packages(path) - ALLOWED[package]
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_settings_alone_read_tally_variables():
    """Outside deploy/ nothing reads the environment; inside it, TALLY_* variables are read
    only by deploy/settings.py (other deploy modules hand the environment to children)."""
    for package in ALLOWED:
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            if package != "deploy":
                assert "os.environ" not in text and "getenv" not in text, path.name
            elif path.name != "settings.py":
                assert 'environ["TALLY_' not in text and 'environ.get("TALLY_' not in text


def test_only_one_module_creates_the_faust_app():
    """faust.App( appears in streams/app.py alone."""
    makers = [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and "faust.App(" in
              p.read_text() and "tests" not in p.parts]  # fmt: skip
    assert makers == [ROOT / "streams" / "app.py"]


def test_the_worker_and_the_collector_do_not_load_the_embedded_engine():
    """chdb maps about 250 MB on import: only a process that opens embedded ClickHouse may
    load it, not the stream worker or the collector (which import deploy.wiring)."""
    code = (
        "import sys, deploy.cli, deploy.wiring, streams.app, producers.collector.app\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'chdb'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=60)  # fmt: skip
    assert out.stdout.strip() == "[]"
