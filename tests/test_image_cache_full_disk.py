"""The image cache on a really full disk: an error naming the folder and the bytes, never SIGBUS.

A small tmpfs is mounted in a private mount namespace (`unshare`), so the disk is genuinely full:
no write is faked. A control in the same namespace writes into a sparse memory map the way the
cache did before, and the kernel kills it with SIGBUS -- proof that the filesystem exercises the
failure the cache must survive.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MOUNT_SIZE = 1024 * 1024  # 1 MiB of disk for a cache of 80 images of 128 px (1.3 MB)
N_IMAGES, SIZE = 80, 128


def _unshare() -> list[str]:
    """A command prefix that runs in a new mount namespace (as root, or in a user namespace)."""
    tool = shutil.which("unshare")
    if tool is None:
        pytest.skip("unshare (util-linux) is needed to mount a small tmpfs for a real full disk")
    prefix = [tool, "--mount"]
    if os.geteuid() != 0:
        prefix = [tool, "--user", "--map-root-user", "--mount"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a mount namespace here: {probe.stderr.decode()[-200:]}")
    return prefix


SCRIPT = textwrap.dedent(
    """
    import json, os, subprocess, sys
    import numpy as np, pandas as pd
    mount, images, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size={size}", "tmpfs", mount], check=True)
    if mode == "control":  # what the cache did before: a sparse memmap, written page by page
        array = np.lib.format.open_memmap(
            os.path.join(mount, "x.npy"), mode="w+", dtype=np.uint8, shape=({n}, {side}, {side})
        )
        array[:] = 7
        array.flush()
        print("CONTROL SURVIVED", flush=True)
        sys.exit(0)
    import rare_cxr.image_cache as ic
    from rare_cxr.findings import FINDINGS
    ids = sorted(os.listdir(images))
    labels = pd.DataFrame({{"image_id": ids, "patient_id": range(len(ids))}})
    for finding in FINDINGS:
        labels[finding] = 0
    splits = labels[["image_id", "patient_id"]].assign(split="train")
    index = pd.DataFrame({{
        "image_id": ids, "path": [os.path.join(images, i) for i in ids], "status": "ok"
    }})
    plan = ic.plan_image_cache(splits, index, labels, size={side}, workers=2)
    if mode == "no-precheck":  # the reservation itself must catch it (disk filled meanwhile)
        ic.ImageCachePlan._check_free_space = lambda *a: None
    try:
        plan.build(os.path.join(mount, "05_model_input", "image_cache"))
    except ic.ImageCacheSpaceError as err:
        left = [p for p in os.listdir(os.path.join(mount, "05_model_input"))]
        print(json.dumps({{"error": str(err), "left": left}}), flush=True)
        sys.exit(3)
    print("BUILT", flush=True)
    """
)


@pytest.fixture(scope="module")
def small_pngs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        pixels = rng.integers(0, 255, (SIZE, SIZE), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:08d}_000.png")
    return folder


def _run(mode: str, small_pngs: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    mount = tmp_path / "disk"
    mount.mkdir()
    script = tmp_path / "build.py"
    script.write_text(SCRIPT.format(size=MOUNT_SIZE, n=N_IMAGES, side=SIZE))
    return subprocess.run(
        [*_unshare(), sys.executable, str(script), str(mount), str(small_pngs), mode],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )


def test_control_a_sparse_memmap_on_this_full_disk_dies_of_sigbus(small_pngs, tmp_path):
    done = _run("control", small_pngs, tmp_path)
    assert done.returncode == -signal.SIGBUS, done.stdout + done.stderr


@pytest.mark.parametrize("mode", ["precheck", "no-precheck"])
def test_full_disk_is_an_error_naming_folder_and_bytes(mode, small_pngs, tmp_path):
    needed = N_IMAGES * SIZE * SIZE
    assert needed > MOUNT_SIZE  # the cache cannot fit
    done = _run(mode, small_pngs, tmp_path)
    assert done.returncode == 3, done.stdout + done.stderr  # an exception, not a signal
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert "not enough space for the image cache in" in report["error"]
    assert str(tmp_path / "disk" / "05_model_input") in report["error"]
    if mode == "precheck":  # stopped before anything was decoded, with the total
        assert f"{needed:,} bytes" in report["error"]
    else:  # the reservation of the split's file failed: still an error, never SIGBUS
        assert "while reserving train.npy" in report["error"]
    assert report["left"] == []  # the staging folder is gone: the next run starts clean
