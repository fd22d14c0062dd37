"""The code stays within pyproject.toml's lint rules (pyflakes, statement errors, 110 columns)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    folders = [name for name in ("src", "tests", "benchmarks", "experiments", "scripts")
               if (ROOT / name).is_dir()]
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *folders],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
