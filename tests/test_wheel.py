"""The built wheel ships grammar/ and recipes/: install it in a fresh venv and compile there."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    (whl,) = out.glob("soapdsl-*.whl")
    return whl


def test_wheel_contains_grammar_and_recipes(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "soapdsl/_data/grammar/soap.lark" in names
    shipped = {p.name for p in (ROOT / "recipes").glob("*.soap")}
    assert shipped <= {Path(n).name for n in names if n.startswith("soapdsl/_data/recipes/")}
    assert "soapdsl/py.typed" in names


def test_wheel_ships_the_dataset_and_the_race(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"soapdsl/data/kjv.txt.xz", "soapdsl/data/README.md", "soapdsl/race/runner.py"} <= names


def test_wheel_installs_and_compiles_in_a_fresh_venv(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    # the fresh venv borrows this environment's third-party packages (torch, lark, ...)
    # through a .pth line appended after its own site-packages, so the wheel's soapdsl wins
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "zz_outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    probe = subprocess.run(
        [
            py,
            "-c",
            "import soapdsl, soapdsl.resources as r; print(soapdsl.__file__); print(r.data_dir('recipes'))",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert probe.returncode == 0, probe.stderr
    module_file, recipes_dir = probe.stdout.split()
    assert module_file.startswith(str(env_dir)) and "_data" in recipes_dir
    cli = subprocess.run(
        [env_dir / "bin" / "soapdsl", "compile", "adamw", "--shapes", "w=8x4"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert cli.returncode == 0, cli.stderr
    assert "recipe adamw  (recipes/adamw.soap)" in cli.stdout
    assert "2.00 bytes per parameter byte" in cli.stdout
