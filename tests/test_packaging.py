"""A release is one step away: the sdist and the wheel build from a clean copy of the tree, the wheel
(built from the sdist, so the sdist is complete too) holds every tracked file of the package, and once
installed into a fresh virtualenv its `caprl` entry point answers `--help` and `caprl models`.

The fresh virtualenv installs the wheel alone (`--no-deps`) and borrows the dependencies already
installed here through a .pth file naming this environment's site-packages, so nothing is downloaded;
that folder's own .pth files (the editable install of this tree among them) are not processed, so the
`caprl_cli` imported there is the wheel's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT


def tracked_files() -> list[str]:
    try:
        listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [name for name in listed.stdout.decode().split("\0") if name and (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and wheel of a clean copy of the tracked tree."""
    tree = tmp_path_factory.mktemp("tree")
    for name in tracked_files():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(tree)],
        capture_output=True, text=True, timeout=600,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return out


def test_sdist_and_wheel_are_built_and_the_wheel_holds_the_whole_package(dist: Path) -> None:
    assert len(list(dist.glob("caprl_cli-*.tar.gz"))) == 1
    wheel = next(dist.glob("caprl_cli-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
        assert "caprl = caprl_cli.cli:main" in archive.read(entry_points).decode()
    package = {name for name in tracked_files() if name.startswith("caprl_cli/")}
    assert package - names == set()


def test_the_installed_wheel_answers_help_and_models(dist: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next(dist.glob("caprl_cli-*.whl"))
    installed = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    where = subprocess.run([python, "-c", "import caprl_cli; print(caprl_cli.__file__)"], capture_output=True,
                           text=True, env=env, cwd=tmp_path, check=True)
    assert Path(where.stdout.strip()).is_relative_to(site)
    caprl = str(venv / "bin" / "caprl")
    helped = subprocess.run([caprl, "--help"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert helped.returncode == 0, helped.stderr
    assert all(command in helped.stdout for command in ("caption", "status", "merge", "models", "doctor"))
    listed = subprocess.run([caprl, "models"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "internlm/CapRL-3B" in listed.stdout
