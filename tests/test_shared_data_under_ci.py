"""A test that needs ../shared skips locally when it is missing, but FAILS under CI=true: on CI
the folder is always beside the clone, so a missing one is a broken path, not an absent one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
TARGET = "tests/test_expert_labels.py::test_parse_the_real_google_file"


def run(ci: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RARE_CXR_SHARED_DATA": "/nonexistent/shared", "CI": ci}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", TARGET],
        cwd=TESTS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_missing_shared_data_skips_locally_and_fails_under_ci():
    local = run("")
    assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout[-2000:]
    ci = run("true")
    assert ci.returncode != 0, ci.stdout[-2000:]
    assert "under CI=true this is an error, not a skip" in ci.stdout
