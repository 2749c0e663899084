"""benchmarks/ab_step.py runs end to end: two worker processes, one on a git revision's soapdsl
(slow: each worker imports torch; needs the git repository)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs the git repository")
def test_ab_step_times_both_sides() -> None:
    cmd = [sys.executable, "-m", "benchmarks.ab_step", "HEAD", "--recipe", "adamw", "--rounds", "2", "--steps", "1"]
    out = subprocess.run(
        cmd + ["--warmup", "1", "--subset", "all", "--width", "16"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "adamw on the all set, width 16, cpu" in out.stdout
    assert "this checkout: soapdsl from " + str(REPO / "soapdsl" / "__init__.py") in out.stdout
    assert "HEAD: soapdsl from " in out.stdout and "soapdsl-ab-" in out.stdout  # the extracted tree
    assert "| this checkout |" in out.stdout and "| HEAD |" in out.stdout
    assert "this checkout / HEAD: median of the per-round ratios" in out.stdout


def test_ab_step_rejects_a_set_without_a_value() -> None:
    cmd = [sys.executable, "-m", "benchmarks.ab_step", "HEAD", "--set", "ns_form"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "--set 'ns_form': expected KEY=VALUE" in out.stderr
    assert "Traceback" not in out.stderr


def test_ab_step_rejects_a_width_below_one() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.ab_step", "HEAD", "--width", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "--width 0: must be at least 1" in out.stderr
