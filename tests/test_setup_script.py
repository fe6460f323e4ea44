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


def _fake_tools(folder: Path) -> Path:
    """A .venv whose python and dvc only log their arguments, and a `java`, so the script runs in a second
    and installs nothing: what it asks pip to do is in .venv/calls.log."""
    bin_dir = folder / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "dvc"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{folder}/.venv/calls.log"\n')
        (bin_dir / name).chmod(0o755)
    tools = folder / "tools"
    tools.mkdir()
    (tools / "java").write_text("#!/bin/sh\n")  # present: the script installs no Java
    (tools / "java").chmod(0o755)
    return tools


def test_going_back_to_earlier_requirements_installs_them_again(tmp_path):
    """The install stamp is named by the requirements' hash. After pins A, then B, then A again (a `git
    checkout` of an older commit), A's stamp was still there: the script skipped pip and said "set-up done"
    over B's packages."""
    (tmp_path / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    tools = _fake_tools(tmp_path)
    log = tmp_path / ".venv" / "calls.log"
    installs = []
    for pins in ("pillow==13.0.0\n", "pillow==12.0.0\n", "pillow==13.0.0\n"):
        (tmp_path / "requirements.txt").write_text(pins)
        log.write_text("")
        result = subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, capture_output=True, text=True,
                                env={"PATH": f"{tools}:/usr/bin:/bin", "PYTHON": "python3", "HOME": str(tmp_path)},
                                timeout=60)
        assert result.returncode == 0 and "set-up done" in result.stdout, result.stderr
        installs.append("python -m pip install --quiet --disable-pip-version-check -r requirements.txt"
                        in log.read_text())
    assert installs == [True, True, True]


def _scratch_copy(folder: Path) -> None:
    (folder / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts" / "setup.sh", folder / "scripts" / "setup.sh")
    shutil.copy2(ROOT / "pyproject.toml", folder / "pyproject.toml")
    (folder / "requirements.txt").write_text("./no-such-folder\n")  # pip stops at once, after the venv step


def _python_of_version(path: Path, version: str) -> Path:
    """A stand-in interpreter that is `version` (it only answers the script's version check) and logs its calls."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\necho "$*" >> "{path}.log"\n'
                    f'case "$*" in *version_info*) [ "{version}" = 3.11 ] ;; *) exit 0 ;; esac\n')
    path.chmod(0o755)
    return path


def test_a_python_override_of_another_version_is_refused(tmp_path):
    """PYTHON=... was used unchecked: a 3.12 venv, on which `pip install -e .` (requires-python ==3.11.*) fails."""
    _scratch_copy(tmp_path)
    other = _python_of_version(tmp_path / "bin" / "python3.12", "3.12")
    result = subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "PYTHON": str(other), "HOME": str(tmp_path)})
    assert result.returncode == 2 and f"PYTHON={other} is not Python 3.11" in result.stderr, result.stderr
    assert "-m venv" not in (tmp_path / "bin" / "python3.12.log").read_text()


def test_a_venv_of_another_python_is_made_anew(tmp_path):
    """A venv from an earlier run with PYTHON=python3.12 has pip, so it was kept on every later run, with 3.11."""
    _scratch_copy(tmp_path)
    _python_of_version(tmp_path / ".venv" / "bin" / "python", "3.12")
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                   env={"PATH": "/usr/bin:/bin", "PYTHON": base_python, "HOME": str(tmp_path)})
    version = subprocess.run([tmp_path / ".venv/bin/python", "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True)
    assert version.stdout.strip() == "(3, 11)", (version.stdout, version.stderr)
