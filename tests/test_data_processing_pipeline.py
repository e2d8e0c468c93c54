"""End-to-end: `kedro run --pipeline data_processing` on folders laid out like the NIH release.

The folders are built here from real NIH rows and images (../shared), so the test does not
depend on the phantom generator.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from rare_cxr.findings import FINDINGS
from rare_cxr.pipelines.data_processing.parsing import LABEL_COLUMNS

pytestmark = [pytest.mark.slow, pytest.mark.real_data]


def _nih_folder(
    root: Path, sample: Path, meta: Path, *, n_images: int, gz: bool = False, nested: bool = False
) -> list[str]:
    """Write Data_Entry (40 real rows), the official lists restricted to them, and images."""
    entry = (sample / "Data_Entry_2017_v2020.csv").read_text().splitlines()
    test_all = set((meta / "test_list.txt").read_text().split())
    rows = entry[1:]
    picked = [r for r in rows if r.split(",")[0] in test_all][:10]
    picked += [r for r in rows if r.split(",")[0] not in test_all][:30]
    names = [r.split(",")[0] for r in picked]
    text = "\n".join([entry[0], *picked]) + "\n"
    root.mkdir(parents=True)
    if gz:
        (root / "Data_Entry_2017_v2020.csv.gz").write_bytes(gzip.compress(text.encode()))
    else:
        (root / "Data_Entry_2017_v2020.csv").write_text(text)
    (root / "train_val_list.txt").write_text("\n".join(n for n in names if n not in test_all))
    (root / "test_list.txt").write_text("\n".join(n for n in names if n in test_all))
    images = root / ("images_001/images" if nested else "images")
    images.mkdir(parents=True)
    for name in names[:n_images]:
        shutil.copy(sample / "images" / name, images / name)
    return names


def _latest(path: Path) -> Path:
    """The newest version of a versioned output `<path>/<version>/<name>`."""
    versions = sorted(path.iterdir())
    assert versions, f"no version under {path}"
    return versions[-1] / path.name


def _check_outputs(project, names: list[str], env: str = "base") -> dict:
    def data(*parts: str) -> Path:
        return project.data(*parts, env=env)

    labels = pd.read_parquet(data("02_intermediate", "labels.parquet"))
    assert tuple(labels.columns) == LABEL_COLUMNS
    assert sorted(labels["image_id"]) == sorted(names)
    assert all(str(labels[f].dtype) == "int8" for f in FINDINGS)
    index = pd.read_parquet(data("02_intermediate", "image_index.parquet"))
    assert tuple(index.columns) == ("image_id", "path", "status", "width", "height", "mode")
    splits = pd.read_parquet(_latest(data("03_primary", "splits.parquet")))
    assert tuple(splits.columns) == ("image_id", "patient_id", "split")
    assert (splits.groupby("patient_id")["split"].nunique() == 1).all()
    split_report = pd.read_csv(_latest(data("08_reporting", "split_report.csv")))
    assert {"split", "finding", "patients", "images", "positives", "prevalence"} <= set(
        split_report.columns
    )
    assert _latest(data("08_reporting", "split_summary.json")).exists()
    report = json.loads(_latest(data("08_reporting", "data_quality_report.json")).read_text())
    return {"index": index, "splits": splits, "report": report}


def test_data_processing_base_env(kedro_project, nih_sample: Path, nih_meta: Path, tmp_path: Path):
    folder = tmp_path / "nih_like"
    names = _nih_folder(folder, nih_sample, nih_meta, n_images=40)
    kedro_project.run(pipeline="data_processing", params={"data_root": str(folder)})
    out = _check_outputs(kedro_project, names)
    assert (out["index"]["status"] == "ok").all()
    assert set(out["index"]["width"]) == {1024}
    assert set(out["splits"]["split"]) == {"train", "val", "test"}
    assert out["report"]["images"]["missing"]["count"] == 0


def test_data_processing_nih_env_partial_download(
    kedro_project, nih_sample: Path, nih_meta: Path, tmp_path: Path
):
    folder = tmp_path / "nih_partial"
    names = _nih_folder(folder, nih_sample, nih_meta, n_images=5, gz=True, nested=True)
    kedro_project.run(
        pipeline="data_processing",
        env="nih",
        params={"data_root": str(folder), "data_entry_file": "Data_Entry_2017_v2020.csv.gz"},
    )
    out = _check_outputs(kedro_project, names, env="nih")
    # the nih environment wrote nothing into the default environment's folder
    assert not any(kedro_project.data("02_intermediate").iterdir())
    status = out["index"].set_index("image_id")["status"]
    assert (status[names[:5]] == "ok").all() and (status[names[5:]] == "missing").all()
    missing = out["report"]["images"]["missing"]
    assert missing["count"] == 35 and missing["action"] == "drop"
    assert missing["examples"][0] in names[5:]
    assert out["report"]["labels"]["source"].endswith("Data_Entry_2017_v2020.csv.gz")
    # official mode: test is exactly test_list.txt, whatever images are present
    test_list = set((folder / "test_list.txt").read_text().split())
    assert set(out["splits"].loc[out["splits"]["split"] == "test", "image_id"]) == test_list
