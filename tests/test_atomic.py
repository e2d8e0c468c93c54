"""Atomic writes: a failed or killed save never leaves a partial file that loads as the latest.

Fault injection: a writer that raises ENOSPC ("No space left on device") after N bytes, for
every dataset type the catalog uses; leftovers of dead processes are swept, live ones kept.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import pandas as pd
import pytest
import torch
from kedro.io import DatasetError, Version
from matplotlib.figure import Figure

from rare_cxr import atomic
from rare_cxr.atomic import AtomicWriter, staging_folder, sweep_leftovers, write_atomic_bytes
from rare_cxr.datasets import (
    CSVDataset,
    JSONDataset,
    MatplotlibDataset,
    ParquetDataset,
    TextDataset,
    TorchCheckpointDataset,
)
from rare_cxr.evaluation.figure_dataset import FigureDataset


def full_disk_after(monkeypatch: pytest.MonkeyPatch, n_bytes: int) -> None:
    """Every AtomicWriter accepts `n_bytes`, writes them, then fails like a full disk."""
    real_write = AtomicWriter.write

    def write(self: AtomicWriter, data):  # type: ignore[no-untyped-def]
        room = n_bytes - getattr(self, "_written", 0)
        if len(data) > room:
            real_write(self, data[: max(room, 0)])
            raise OSError(errno.ENOSPC, "No space left on device")
        self._written = getattr(self, "_written", 0) + len(data)
        return real_write(self, data)

    monkeypatch.setattr(AtomicWriter, "write", write)


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if atomic.leftover_owner(p) is not None]


def test_writer_commits_on_success_and_discards_on_error(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    write_atomic_bytes(target, b"old")
    with pytest.raises(RuntimeError), AtomicWriter(target, "wb") as handle:
        handle.write(b"new but incomplete")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert not leftovers(tmp_path)
    with AtomicWriter(target, "w", encoding="utf-8") as handle:
        handle.write("new")
    assert target.read_text() == "new"
    with pytest.raises(FileExistsError), AtomicWriter(target, "xb") as handle:  # Kedro's rule
        handle.write(b"x")
    assert target.read_text() == "new" and not leftovers(tmp_path)


def test_full_disk_part_way_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch) -> None:
    target = tmp_path / "report.html"
    write_atomic_bytes(target, b"<html>complete old report</html>")
    full_disk_after(monkeypatch, 5)
    with pytest.raises(OSError, match="No space left"):
        write_atomic_bytes(target, b"<html>a new report that does not fit</html>")
    assert target.read_bytes() == b"<html>complete old report</html>"
    assert not leftovers(tmp_path)


def _frame() -> pd.DataFrame:
    return pd.DataFrame({"model": ["a", "b"], "auroc": [0.7, 0.8]})


def _figure() -> Figure:
    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [1, 0])
    return fig


DATASETS = {
    "parquet": (lambda p, v: ParquetDataset(filepath=str(p / "t.parquet"), version=v), _frame),
    "csv": (lambda p, v: CSVDataset(filepath=str(p / "t.csv"), version=v), _frame),
    "json": (lambda p, v: JSONDataset(filepath=str(p / "m.json"), version=v), lambda: {"a": 1}),
    "text": (
        lambda p, v: TextDataset(filepath=str(p / "r.html"), version=v),
        lambda: "<p>report</p>" * 9,
    ),
    "matplotlib": (
        lambda p, v: MatplotlibDataset(filepath=str(p / "f.png"), version=v),
        _figure,
    ),
    "figure": (lambda p, v: FigureDataset(filepath=str(p / "g.png"), version=v), _figure),
    "checkpoint": (
        lambda p, v: TorchCheckpointDataset(filepath=str(p / "c.pt"), version=v),
        lambda: {"state_dict": {"w": torch.ones(64, 64)}, "metadata": {"epoch": 3}},
    ),
}


@pytest.mark.parametrize("kind", sorted(DATASETS))
def test_failed_versioned_save_never_becomes_the_latest_version(kind, tmp_path, monkeypatch):
    make, payload = DATASETS[kind]
    first = make(tmp_path, Version(None, "2026-01-01T00.00.00.000Z"))
    first.save(payload())
    reference = make(tmp_path, Version(None, None))
    if kind not in ("matplotlib",):  # kedro-datasets' MatplotlibDataset is save-only
        before = reference.load()

    full_disk_after(monkeypatch, 10)
    failing = make(tmp_path, Version(None, "2026-01-02T00.00.00.000Z"))
    with pytest.raises(DatasetError, match="No space left"):
        failing.save(payload())
    monkeypatch.undo()

    # nothing partial anywhere, and no empty version folder for Kedro to trip on
    assert not leftovers(tmp_path)
    version_dirs = sorted(p.name for p in next(tmp_path.iterdir()).iterdir())
    assert version_dirs == ["2026-01-01T00.00.00.000Z"], version_dirs
    latest = make(tmp_path, Version(None, None))
    assert latest.resolve_load_version() == "2026-01-01T00.00.00.000Z"
    if kind == "checkpoint":
        assert torch.equal(latest.load()["state_dict"]["w"], before["state_dict"]["w"])
    elif kind in ("parquet", "csv"):
        pd.testing.assert_frame_equal(latest.load(), before)
    elif kind != "matplotlib":
        assert latest.load() == before


def test_atomic_datasets_keep_kedro_datasets_behaviour(tmp_path: Path) -> None:
    """Same bytes as kedro-datasets writes, so files stay readable by anyone's tools."""
    from kedro_datasets.json import JSONDataset as PlainJSONDataset

    JSONDataset(filepath=str(tmp_path / "a.json"), save_args={"indent": 2}).save({"x": [1, 2]})
    PlainJSONDataset(filepath=str(tmp_path / "b.json"), save_args={"indent": 2}).save({"x": [1, 2]})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(done.stdout)


def test_sweep_removes_dead_processes_leftovers_and_keeps_live_ones(tmp_path: Path) -> None:
    dead = _dead_pid()
    version = tmp_path / "metrics.json" / "2026-01-01T00.00.00.000Z"
    version.mkdir(parents=True)
    orphan = version / f".metrics.json.rare-cxr-tmp-{dead}-0a1b2c3d"
    orphan.write_text("{partial")
    staging = tmp_path / f".image_cache.rare-cxr-tmp-{dead}-00ff"
    (staging / "sub").mkdir(parents=True)
    live = tmp_path / f".table1.csv.rare-cxr-tmp-{os.getpid()}-abcd"
    live.write_text("being written right now")
    unrelated = tmp_path / "notes.tmp-123"
    unrelated.write_text("not ours")

    removed = sweep_leftovers(tmp_path)
    assert set(removed) == {orphan, staging}
    assert not version.exists()  # the version folder held nothing else
    assert live.exists() and unrelated.exists()


def test_staging_folder_swaps_in_whole_or_not_at_all(tmp_path: Path) -> None:
    final = tmp_path / "images"
    with staging_folder(final) as staging:
        (staging / "a.png").write_bytes(b"1")
    assert sorted(p.name for p in final.iterdir()) == ["a.png"]
    with pytest.raises(KeyboardInterrupt), staging_folder(final) as staging:
        (staging / "b.png").write_bytes(b"2")
        raise KeyboardInterrupt
    assert sorted(p.name for p in final.iterdir()) == ["a.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_atomic_csv_dataset_keeps_kedro_datasets_preview(tmp_path):
    """kedro-viz previews a CSV by deep-copying the dataset; the atomic filesystem wrapper must
    survive the copy (it once recursed forever in `__getattr__`)."""
    import pandas as pd

    from rare_cxr.datasets import CSVDataset

    dataset = CSVDataset(filepath=str(tmp_path / "t.csv"), save_args={"index": False})
    dataset.save(pd.DataFrame({"finding": ["Hernia", "Mass", "Nodule"], "n": [1, 2, 3]}))
    preview = dataset.preview(nrows=2)
    assert preview["columns"] == ["finding", "n"] and preview["data"] == [
        ["Hernia", 1],
        ["Mass", 2],
    ]
