"""scripts/setup.sh, run again after a failure: it must pick up where it stopped, not stop there for good.

Run in a scratch copy holding only the script and requirements that fail at once, so nothing is installed."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_venv_left_without_pip_is_completed_on_the_next_run(tmp_path):
    """`python3.11 -m venv` on Debian without python3.11-venv stops at ensurepip after writing .venv/bin/python
    (and so does a Ctrl-C there). After `apt-get install python3.11-venv`, as the script's own error asks, the
    next run saw .venv/bin/python, skipped the venv, and failed on every run after with 'No module named pip'."""
    (tmp_path / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    # A requirement pip refuses at once: the run stops at its first install, after the venv step under test.
    (tmp_path / "requirements.txt").write_text("./no-such-folder\n")
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(tmp_path / ".venv")], check=True)
    result = subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, env={"PATH": "/usr/bin:/bin",
                            "PYTHON": base_python, "HOME": str(tmp_path)}, capture_output=True, text=True,
                            timeout=300)
    assert "No module named pip" not in result.stderr, result.stderr
    assert "no-such-folder" in result.stderr and result.returncode != 0, result.stderr  # got as far as pip
    pip = subprocess.run([tmp_path / ".venv/bin/python", "-m", "pip", "--version"], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
