""".ci/run, the CI entry point: the tests it starts see the environment that makes CI strict.

Run in a scratch copy whose set-up, ruff and pytest only record what they were given, so nothing is
installed or tested twice."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_run_gives_the_tests_ci_true_and_the_real_data_beside_the_clone(tmp_path):
    """Tests fail instead of skipping on a missing tool only under CI=true (test_plots_offline's Chromium,
    test_pipeline's Java for METEOR); .ci/run did not set it, so in CI those checks were skipped."""
    clone = tmp_path / "clone"
    (clone / ".ci").mkdir(parents=True)
    shutil.copy2(ROOT / ".ci" / "run", clone / ".ci" / "run")
    (clone / "scripts").mkdir()
    (clone / "scripts" / "setup.sh").write_text("exit 0\n")
    tools = clone / "tools"
    tools.mkdir()
    (tools / "ruff").write_text("#!/bin/sh\nexit 0\n")
    (tools / "pytest").write_text(f'#!/bin/sh\necho "CI=$CI FLICKR8K_DIR=$FLICKR8K_DIR" > "{tmp_path}/seen"\n')
    for tool in ("ruff", "pytest"):
        (tools / tool).chmod(0o755)
    (clone / ".venv" / "bin").mkdir(parents=True)
    (clone / ".venv" / "bin" / "activate").write_text(f'PATH="{tools}:$PATH"\n')
    env = {key: value for key, value in os.environ.items() if key not in ("CI", "FLICKR8K_DIR")}
    result = subprocess.run(["bash", ".ci/run"], cwd=clone, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "seen").read_text().split() == ["CI=true", f"FLICKR8K_DIR={tmp_path}/shared/flickr8k"]
