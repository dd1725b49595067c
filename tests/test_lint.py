"""`ruff check` with the project's configuration (pyproject.toml: pyflakes and import order) passes."""
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is not installed: it is pinned in requirements.txt"
    out = subprocess.run([ruff, "check", "flexolmo_core", "tasks", "flows", "benchmarks", "tests"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
