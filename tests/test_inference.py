"""Inference on new images (`rare_cxr.inference`, pipelines `inference` and `onnx_export`).

The in-process tests use a bundle made from a tiny, untrained multi-scale ResNet (16 and 32 px)
with thresholds at the median validation probability, so that some decisions are positive;
what they check does not depend on training. The trained-model run through the real `kedro`
command line is `check_inference_on_trained_model`, called by tests/test_environments.py on
the model its default run trains (one training for both tests).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_dicom import make_dicom
from test_training import blob_cache

from rare_cxr.datasets.inference import ModelBundleDataset
from rare_cxr.evaluation import bootstrap
from rare_cxr.evaluation import metrics as M
from rare_cxr.findings import FINDINGS
from rare_cxr.image_cache import decode_resized
from rare_cxr.inference.bundle import BundleError, load_bundle_model, make_bundle, validate_bundle
from rare_cxr.inference.model_card import card_html, card_markdown
from rare_cxr.inference.predict import (
    DECISION_SUFFIX,
    overlay_name,
    prediction_columns,
    run_inference,
)
from rare_cxr.inference.report import render_inference_report
from rare_cxr.models import build_model
from rare_cxr.training.engine import predict_probabilities

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
# The documented commands (README.md and docs/inference.md), run verbatim but for the paths.
COMMAND_ENV_MODEL = "kedro run --pipelines inference --params input_dir=/path/to/images"
COMMAND_BUNDLE_FILE = (
    'kedro run --pipelines inference,onnx_export --params "bundle=/path/to/model_bundle.pt,'
    'input_dir=/path/to/images"'
)
COMMAND_DOTTED = (
    'kedro run --pipelines inference --params "inference.bundle=/path/to/model_bundle.pt,'
    'inference.input_dir=/path/to/images"'
)
FAST = {"device": "cpu", "progress_bar": False, "loader_threads": 1}
# one temperature per finding (what calibration_metrics fits on validation); Hernia has none
TEMPERATURES = {f: 2.0 for f in FINDINGS} | {"Mass": 0.5, "Hernia": None}


def tiny_bundle() -> dict:
    """A real bundle (make_bundle) around an untrained multi-scale ResNet [16, 32]."""
    torch.manual_seed(0)
    spec = {"name": "multiscale_resnet", "architecture": "multiscale_resnet", "scales": [16, 32]}
    model = build_model(spec, load_weights=False).eval()
    cache = blob_cache(n_train=4, n_val=16, n_test=16, size=SIZE)
    cpu = torch.device("cpu")
    val, _ = predict_probabilities(model, cache.split("val").images, cpu)
    chosen = {f: float(np.median(val[:, i])) for i, f in enumerate(FINDINGS)}
    chosen["Hernia"] = None  # no validation positive: no decision for it
    test = cache.split("test")
    scores, _ = predict_probabilities(model, test.images, cpu)
    t = {f: np.nan if v is None else v for f, v in chosen.items()}
    patients = np.arange(len(scores))
    metrics = {
        "test": M.evaluate_split(test.labels, scores, t),
        "intervals": bootstrap.bootstrap_intervals(
            test.labels, scores, np.array([t[f] for f in FINDINGS]), patients, n_resamples=20
        ),
        "n_test_patients": len(patients),
    }
    positives = {f: int(test.labels[:, i].sum()) for i, f in enumerate(FINDINGS)}
    checkpoint = {
        "state_dict": model.state_dict(),
        "metadata": {
            "model_spec": {**spec, "pretrained": "none"},
            "findings": list(FINDINGS),
            "normalisation": dict(model.normalisation),
            "scales": [16, 32],
            "input_size": SIZE,
            "train_params": {"seed": 0, "epochs": 1, "tta_hflip": False},
            "epoch": 1,
            "metric": 0.5,
            "metric_name": "val_macro_auroc",
            "training_id": "tiny-training",
            "checkpoint_version": "2026-01-01T00.00.00.000Z",
        },
    }
    return make_bundle(
        checkpoint=checkpoint,
        thresholds={"method": "f1", "split": "val", "thresholds": chosen},
        metrics=M.to_jsonable(metrics),
        data_summary={
            "source": "tests: synthetic blobs <script>alert(1)</script>",
            "splits": [{"split": "test", "images": 16, "patients": 16, "no_finding_images": 9}],
            "positives": [{"split": "test", **positives}],
        },
        rare_findings={"rule": "the 2 rarest", "findings": ["Hernia", "Pneumonia"]},
        subgroups={
            "rows": [
                {
                    "attribute": "view",
                    "subgroup": "AP",
                    "finding": "macro",
                    "n_images": 9,
                    "n_patients": 9,
                    "positives": 4,
                    "auroc": 0.61,
                    "ci_low": 0.4,
                    "ci_high": 0.8,
                },
                {
                    "attribute": "view",
                    "subgroup": "AP",
                    "finding": "Mass",
                    "n_images": 9,
                    "n_patients": 9,
                    "positives": 1,
                    "auroc": 0.5,
                    "ci_low": 0.1,
                    "ci_high": 0.9,
                },
            ]
        },
        reporting={"min_positives": 10, "bootstrap": {"n_resamples": 20, "confidence": 0.95}},
        calibration={
            "method": "temperature scaling",
            "split": "val",
            "binning": "equal_mass",
            "n_bins": 15,
            "temperatures": TEMPERATURES,
            "per_finding": [
                {"finding": f, "ece_raw": 0.2, "ece_calibrated": 0.05} for f in (*FINDINGS, "macro")
            ],
        },
        underdiagnosis={
            "rows": [
                {
                    "attribute": "sex",
                    "subgroup": "F",
                    "sick_images": 12,
                    "sick_patients": 11,
                    "underdiagnosis_rate": 0.25,
                    "ci_low": 0.1,
                    "ci_high": 0.5,
                    "gap": 0.05,
                    "gap_ci_low": -0.1,
                    "gap_ci_high": 0.2,
                    "reliable": True,
                }
            ]
        },
    )


@pytest.fixture(scope="module")
def bundle() -> dict:
    return tiny_bundle()


def radiograph(seed: int = 0, shape: tuple[int, int] = (48, 64)) -> np.ndarray:
    """uint8 grey test image using the full 0..255 range, not square (resized like the cache)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(20, 200, size=shape).astype(np.uint8)
    image[4:20, 6:30] = 250
    image[0, 0], image[-1, -1] = 0, 255
    return image


def png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def _by_path(table: pd.DataFrame) -> pd.DataFrame:
    return table.set_index("path")


# --------------------------------------------------------------------- formats: same pixels


def test_png_jpeg_and_monochrome1_dicom_give_the_cache_pixels_and_probabilities(tmp_path, bundle):
    grey = radiograph()
    folder = tmp_path / "in"
    png(folder / "grey.png", grey)
    # 16-bit: v * 257 reads back as exactly v (to_grayscale's fixed 255/65535 scale)
    png(folder / "sixteen.png", grey.astype(np.uint16) * 257)
    rgba = np.dstack([grey, grey, grey, np.random.default_rng(1).integers(0, 256, grey.shape)])
    png(folder / "rgba.png", rgba.astype(np.uint8), "RGBA")
    Image.fromarray(grey).save(folder / "photo.jpg", quality=95)
    # MONOCHROME1 from the PNG's inverted pixels, with the identity window of 8 bits
    make_dicom(
        folder / "dicom" / "inverted.dcm",
        (255 - grey).astype(np.uint8),
        "MONOCHROME1",
        8,
        WindowCenter=128,
        WindowWidth=256,
        ViewPosition="PA",
    )
    with Image.open(folder / "sixteen.png") as image:
        assert image.mode in ("I;16", "I")  # really a 16-bit PNG
    table, overlays = run_inference(bundle, {**FAST, "input_dir": str(folder)})

    assert list(table.columns) == prediction_columns()
    rows = _by_path(table)
    assert list(rows.index) == sorted(
        ["grey.png", "sixteen.png", "rgba.png", "photo.jpg", "dicom/inverted.dcm"]
    )
    assert (rows["status"] == "ok").all(), rows["reason"].to_dict()
    assert rows.loc["dicom/inverted.dcm", "format"] == "dicom"
    assert rows.loc["photo.jpg", "format"] == "jpeg"
    assert rows.loc["grey.png", ["width", "height"]].tolist() == [64, 48]
    # the model sees exactly the image cache's pixels of the PNG
    model = load_bundle_model(bundle)
    cache_pixels = decode_resized(str(folder / "grey.png"), SIZE)
    expected, _ = predict_probabilities(model, cache_pixels[None], torch.device("cpu"))
    probs = rows[list(FINDINGS)]
    np.testing.assert_allclose(probs.loc["grey.png"].to_numpy(), expected[0], atol=1e-6)
    for same in ("sixteen.png", "rgba.png"):
        np.testing.assert_allclose(probs.loc[same], probs.loc["grey.png"], atol=1e-6)
    dicom_diff = np.abs(probs.loc["dicom/inverted.dcm"] - probs.loc["grey.png"]).max()
    assert dicom_diff <= 1e-3
    assert np.abs(probs.loc["photo.jpg"] - probs.loc["grey.png"]).max() < 0.02  # lossy JPEG
    # decisions at the bundle's thresholds; Hernia has none
    for path, row in rows.iterrows():
        for f in FINDINGS:
            t = bundle["metadata"]["thresholds"][f]
            decision = row[f + DECISION_SUFFIX]
            if t is None:
                assert pd.isna(decision)
            else:
                assert int(decision) == int(row[f] >= t), (path, f)
        positives = [
            f
            for f in FINDINGS
            if pd.notna(row[f + DECISION_SUFFIX]) and row[f + DECISION_SUFFIX] == 1
        ]
        assert sorted(str(row["positive_findings"]).split("|")) == sorted(positives)
        # one overlay per scale for the (at most 3) most probable positive findings, named
        # after the row (from 1) and listed in its `overlays` column
        top = sorted(positives, key=lambda f: -row[f])[:3]
        number = table.index[table["path"] == path][0] + 1
        names = set(filter(None, row["overlays"].split("|")))
        assert names == {overlay_name(number, path, f, f"scale_{s}") for f in top for s in (16, 32)}
        assert names <= set(overlays)
    assert any(overlays)
    with Image.open(io.BytesIO(next(iter(overlays.values()))())) as overlay:
        assert overlay.size == (SIZE, SIZE) and overlay.mode == "RGB"


def test_calibrated_and_rescaled_columns_from_the_bundle(tmp_path, bundle):
    """<finding>_calibrated = sigmoid(logit(p) / T) with the bundle's temperatures (none: the
    raw p); with rescale_to_threshold, <finding>_rescaled >= 0.5 exactly at the decision."""
    from rare_cxr.datasets.inference import PredictionsCSVDataset
    from rare_cxr.evaluation.calibration import apply_temperature
    from rare_cxr.inference.predict import CALIBRATED_SUFFIX, RESCALED_SUFFIX

    folder = tmp_path / "in"
    for k in range(3):
        png(folder / f"{k}.png", radiograph(k))
    (folder / "notes.txt").write_text("x")
    cfg = {**FAST, "input_dir": str(folder), "rescale_to_threshold": True}
    table, _ = run_inference(bundle, {**cfg, "gradcam": {"enabled": False}})
    assert list(table.columns) == prediction_columns(rescaled=True)
    assert prediction_columns(rescaled=True)[: len(prediction_columns())] == prediction_columns()
    ok = table[table["status"] == "ok"]
    assert len(ok) == 3
    for f in FINDINGS:
        raw, calibrated = ok[f].to_numpy(), ok[f + CALIBRATED_SUFFIX].to_numpy()
        np.testing.assert_allclose(calibrated, apply_temperature(raw, TEMPERATURES[f]))
        t = bundle["metadata"]["thresholds"][f]
        rescaled = ok[f + RESCALED_SUFFIX].to_numpy()
        if t is None:
            assert np.isnan(rescaled).all()
            continue
        expected = np.where(raw < t, raw / (2 * t), 1 - (1 - raw) / (2 * (1 - t)))
        np.testing.assert_allclose(rescaled, expected)
        assert ((rescaled >= 0.5) == (ok[f + DECISION_SUFFIX].to_numpy() == 1)).all()
    np.testing.assert_array_equal(ok["Hernia_calibrated"], ok["Hernia"])  # no temperature
    assert (ok["Mass_calibrated"] - 0.5).abs().ge((ok["Mass"] - 0.5).abs()).all()  # T < 1
    bad = table[table["status"] != "ok"]
    assert bad[[f + CALIBRATED_SUFFIX for f in FINDINGS]].isna().all().all()
    # predictions.csv keeps them as numbers
    dataset = PredictionsCSVDataset(filepath=str(tmp_path / "predictions.csv"))
    dataset.save(table)
    loaded = dataset.load()
    assert loaded["Mass_calibrated"].dtype == "float64"
    np.testing.assert_allclose(loaded["Mass_calibrated"], table["Mass_calibrated"])

    # a bundle from before temperatures: the calibrated columns stay empty, no rescaled ones
    older = {**bundle, "metadata": {k: v for k, v in bundle["metadata"].items()}}
    del older["metadata"]["calibration"]
    validate_bundle(older, check_weights=False)
    plain, _ = run_inference(older, {**FAST, "input_dir": str(folder)})
    assert list(plain.columns) == prediction_columns()
    assert plain[[f + CALIBRATED_SUFFIX for f in FINDINGS]].isna().all().all()
    np.testing.assert_allclose(plain[list(FINDINGS)], table[list(FINDINGS)])


def test_bundle_temperatures_are_checked_key_by_key(bundle):
    meta = bundle["metadata"]
    for temperatures, message in (
        ({**TEMPERATURES, "Mass": -1.0}, r"calibration\.temperatures\.Mass"),
        ({**TEMPERATURES, "Mass": "hot"}, r"calibration\.temperatures\.Mass"),
        ({k: v for k, v in TEMPERATURES.items() if k != "Edema"}, "missing \\['Edema'\\]"),
    ):
        broken = {
            **bundle,
            "metadata": {
                **meta,
                "calibration": {**meta["calibration"], "temperatures": temperatures},
            },
        }
        with pytest.raises(BundleError, match=message):
            validate_bundle(broken, "b.pt", check_weights=False)


# --------------------------------------------------------------------- bad input


def test_every_bad_input_gets_a_status_with_a_reason_and_the_run_finishes(tmp_path, bundle):
    folder = tmp_path / "in"
    good = png(folder / "sub" / "deep" / "good.png", radiograph(3))
    damaged = png(folder / "truncated.png", radiograph(4))
    damaged.write_bytes(damaged.read_bytes()[:200])
    (folder / "notes.txt").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    png(folder / "huge.png", np.zeros((80, 90), np.uint8))  # 7,200 px > the limit below
    os.mkfifo(folder / "pipe.png")
    make_dicom(folder / "dose_report.dcm", None, Modality="SR")
    make_dicom(folder / "cine.dcm", np.stack([radiograph(5), radiograph(6)]), bits_stored=8)
    make_dicom(
        folder / "lateral.dcm",
        radiograph(7),
        bits_stored=8,
        ViewPosition="LL",
        WindowCenter=128,
        WindowWidth=256,
    )
    outside = png(tmp_path / "elsewhere" / "secret.png", radiograph(8))
    (folder / "link_out.png").symlink_to(outside)
    (folder / "link_in.png").symlink_to(good)
    (folder / "broken.png").symlink_to(folder / "gone.png")
    (folder / "linked_folder").symlink_to(outside.parent, target_is_directory=True)

    params = {**FAST, "input_dir": str(folder), "max_image_pixels": 5000}
    table, overlays = run_inference(bundle, params)
    rows = _by_path(table)
    expected = {
        "sub/deep/good.png": "ok",
        "link_in.png": "ok",
        "lateral.dcm": "ok",
        "truncated.png": "corrupt",
        "notes.txt": "not-an-image",
        "empty.png": "not-an-image",
        "huge.png": "too-large",
        "pipe.png": "not-a-file",
        "dose_report.dcm": "no-pixel-data",
        "cine.dcm": "unsupported",
        "link_out.png": "outside-input",
        "broken.png": "missing",
        "linked_folder": "not-followed",
    }
    assert rows["status"].to_dict() == expected
    reasons = rows["reason"]
    assert "90x80 = 7,200 pixels exceeds inference.max_image_pixels = 5,000" in reasons["huge.png"]
    assert "multi-frame DICOM (2 frames)" in reasons["cine.dcm"]
    assert "outside the input folder: not followed" in reasons["link_out.png"]
    assert "secret" not in "".join(overlays)  # nothing outside the folder was read
    assert "FIFO" in reasons["pipe.png"]
    assert "not a PNG, JPEG or DICOM" in reasons["notes.txt"]
    assert (reasons[rows["status"] == "ok"] == "").all()
    assert (reasons[rows["status"] != "ok"].str.len() > 10).all()
    # lateral: flagged, still predicted
    assert rows.loc["lateral.dcm", "flags"] == "lateral-view"
    assert rows.loc["lateral.dcm", "view_position"] == "LL"
    ok = rows["status"] == "ok"
    assert rows.loc[ok, list(FINDINGS)].notna().all().all()
    assert rows.loc[~ok, list(FINDINGS)].isna().all().all()
    assert rows.loc[~ok, [f + DECISION_SUFFIX for f in FINDINGS]].isna().all().all()
    np.testing.assert_allclose(
        rows.loc["link_in.png", list(FINDINGS)],
        rows.loc["sub/deep/good.png", list(FINDINGS)],
        atol=1e-6,
    )

    from rare_cxr.inference.predict import validate_inference_params

    html = render_inference_report(
        predictions=table,
        overlays=overlays,
        bundle=bundle,
        cfg=validate_inference_params(params),
        input_root=str(folder),
    )
    assert "Files not predicted" in html and "1 lateral view(s)" in html
    for path, reason in reasons[~ok].items():
        assert path in html and reason.split(":")[0][:30] in html
    assert html.count("<div class='img'>") == 3  # the three predicted images
    assert "Not for clinical use" in html and "Model card" in html
    assert "<script>" not in html  # text from the data is escaped


def test_a_system_read_error_is_recorded_as_unreadable(tmp_path, monkeypatch):
    """EIO/EACCES after retries (not simulable by file modes: the tests may run as root) is
    `unreadable`, not `corrupt`: the file may be fine, the storage was not."""
    import errno

    from rare_cxr.imaging import TransientImageError
    from rare_cxr.inference import images

    png(tmp_path / "x.png", radiograph())

    def failing(name, **kwargs):
        raise TransientImageError(name, "EIO: Input/output error", errno.EIO, 3)

    monkeypatch.setattr(images, "load_grayscale", failing)
    (entry,) = images.scan_folder(tmp_path)
    result = images.read_for_model(entry, SIZE, 10_000)
    assert result.status == "unreadable" and result.pixels is None
    assert "failed 3 time(s) with a system error (EIO" in result.reason
    assert "NOT marked corrupt" in result.reason


def test_empty_and_missing_input_folders(tmp_path, bundle):
    (tmp_path / "empty").mkdir()
    table, overlays = run_inference(bundle, {**FAST, "input_dir": str(tmp_path / "empty")})
    assert table.empty and list(table.columns) == prediction_columns() and overlays == {}
    from rare_cxr.inference.predict import validate_inference_params

    html = render_inference_report(
        predictions=table,
        overlays=overlays,
        bundle=bundle,
        cfg=validate_inference_params(FAST),
        input_root=str(tmp_path / "empty"),
    )
    assert "The input folder holds no files" in html
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError, match=f"input folder '{missing}' does not exist"):
        run_inference(bundle, {**FAST, "input_dir": str(missing)})
    with pytest.raises(ValueError, match="inference.input_dir is not set.*--params input_dir="):
        run_inference(bundle, FAST)


# --------------------------------------------------------------------- bundle and card


def test_bundle_round_trip_loads_weights_only_and_refuses_what_is_not_one(tmp_path, bundle):
    from kedro.io import DatasetError, Version

    versioned = ModelBundleDataset(str(tmp_path / "model_bundle.pt"), version=Version(None, "v1"))
    versioned.save(bundle)
    loaded = ModelBundleDataset(
        str(tmp_path / "model_bundle.pt"), version=Version(None, None)
    ).load()
    assert loaded["metadata"]["bundle_version"] == "v1"
    saved = tmp_path / "model_bundle.pt" / "v1" / "model_bundle.pt"
    raw = torch.load(saved, weights_only=True)  # plain tensors and containers only
    assert raw["metadata"]["format"] == "rare-cxr-model-bundle"
    meta = loaded["metadata"]
    assert meta["input_size"] == SIZE and meta["scales"] == [16, 32]
    assert meta["findings"] == list(FINDINGS) and meta["thresholds"]["Hernia"] is None
    assert meta["normalisation"] == bundle["metadata"]["normalisation"]
    assert {"train_params", "training_id", "checkpoint_version"} <= set(meta["training"])
    assert meta["data"]["positives"] and meta["metrics"]["intervals"]["macro"]["auroc"]
    assert meta["calibration"]["temperatures"] == TEMPERATURES  # fitted on validation
    assert meta["calibration"]["split"] == "val"
    assert meta["calibration"]["test_ece"]["macro"] == {"raw": 0.2, "calibrated": 0.05}
    assert loaded["state_dict"].keys() == bundle["state_dict"].keys()
    for name, tensor in bundle["state_dict"].items():
        assert torch.equal(loaded["state_dict"][name], tensor), name
    assert {k: v for k, v in meta.items() if k != "bundle_version"} == bundle["metadata"]

    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": bundle["state_dict"], "metadata": {"model_spec": {}}}, checkpoint)
    with pytest.raises(DatasetError, match="training checkpoint: run `kedro run --pipelines rep"):
        ModelBundleDataset(str(checkpoint)).load()
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "metadata": {"x": Path("/")}}, evil)  # a pickled object
    with pytest.raises(DatasetError, match="could not be read as a model bundle"):
        ModelBundleDataset(str(evil)).load()
    with pytest.raises(DatasetError, match="does not exist: bundles are written by"):
        ModelBundleDataset(str(tmp_path / "nothing.pt")).load()
    with pytest.raises(DatasetError, match="no model bundle at .*kedro run --pipelines reporting"):
        ModelBundleDataset(str(tmp_path / "none.pt"), version=Version(None, None)).load()
    broken = {**bundle, "metadata": {**bundle["metadata"], "thresholds": {}}}
    with pytest.raises(BundleError, match="metadata.thresholds: expected one threshold per"):
        validate_bundle(broken)


def test_model_card_covers_use_data_metrics_thresholds_limits_and_citations(bundle):
    card = card_markdown(bundle["metadata"])
    for text in (
        "## Intended use",
        "**Not for clinical use.**",
        "## Data",
        "| test | 16 | 16 | 9 |",
        "## Metrics (test split)",
        "95% percentile intervals from 20 bootstrap resamples of patients",
        "## Decision thresholds",
        "chosen on the `val` split by `f1`",
        "## Limitations",
        "**Labels are text-mined.**",
        "**AP/PA view is confounded with illness.**",
        "Subgroups (macro AUROC by sex, view and age band)",
        "Hernia (rare)",
        "## Citations",
        "ChestX-ray8: Hospital-scale Chest X-ray Database",
        "CVPR 2017",
        "Multi-Scale Classification of Rare Diseases Using ResNet",
    ):
        assert text in card, text
    macro = card.split("| AUROC | ")[1].split(" |")[0]
    assert macro.count("[") == 1  # value [low, high]
    hernia = next(line for line in card.splitlines() if line.startswith("| Hernia (rare)"))
    assert hernia.rstrip(" |").endswith("n/a")  # no threshold
    assert "| view | AP | 9 | 9 | 0.610 [0.400, 0.800] |" in card
    # what a probability and 0.5 mean; the temperatures and the threshold on both scales
    assert "## Decision thresholds and what a probability means" in card
    assert "**0.5 is not the decision threshold" in card
    assert "`<finding>_calibrated`" in card and "`<finding>_rescaled`" in card
    t_mass = bundle["metadata"]["thresholds"]["Mass"]
    on_calibrated = 1 / (1 + ((1 - t_mass) / t_mass) ** 2)  # T = 0.5 doubles the logit
    section = card.split("## Decision thresholds and what a probability means")[1]
    mass = next(line for line in section.splitlines() if line.startswith("| Mass | "))
    assert mass == f"| Mass | {t_mass:.4f} | 0.500 | {on_calibrated:.4f} | 0.200 | 0.050 |"
    hernia_t = next(line for line in section.splitlines() if line.startswith("| Hernia | "))
    assert hernia_t == "| Hernia | n/a | n/a | n/a | 0.200 | 0.050 |"
    assert "raw 0.200, calibrated 0.050 (mean over findings)" in card
    assert "| sex | F | 12 | 11 | 0.250 [0.100, 0.500] | 0.050 [-0.100, 0.200] |" in card
    html = card_html(card)
    assert "<table>" in html and "&lt;script&gt;" in html and "<script>" not in html


# --------------------------------------------------------------------- registry


def test_inference_runs_on_demand_only_and_reads_the_chosen_bundle(kedro_project):
    from rare_cxr import pipeline_registry

    pipes = pipeline_registry.register_pipelines()
    for name in ("__default__", "nih", "all_models"):
        assert not {"predict_folder", "export_onnx"} & {n.name for n in pipes[name].nodes}
    assert pipes["inference"].inputs() == {"multiscale_resnet.model_bundle", "params:inference"}
    assert {n.name for n in pipes["onnx_export"].nodes} == {"export_onnx"}
    saved = dict(pipeline_registry._ACTIVE)
    try:
        pipeline_registry._ACTIVE["inference"] = {"model": "vgg16"}
        assert "vgg16.model_bundle" in pipeline_registry.register_pipelines()["inference"].inputs()
        pipeline_registry._ACTIVE["inference"] = {"model": "vgg16", "bundle": "/x.pt"}
        pipes = pipeline_registry.register_pipelines()
        assert "model_bundle_file" in pipes["inference"].inputs()
        assert "model_bundle_file" in pipes["onnx_export"].inputs()
    finally:
        pipeline_registry._ACTIVE.clear()
        pipeline_registry._ACTIVE.update(saved)


# --------------------------------------------------------------------- the real command line


def read_predictions(path: Path) -> pd.DataFrame:
    """predictions.csv as a reader outside Kedro should read it: every cell as text (file names
    such as `NA` or `0001` stay names), then the numeric columns typed."""
    from rare_cxr.inference.table import from_csv_frame

    return from_csv_frame(pd.read_csv(path, dtype=str, keep_default_na=False))


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert found, f"no {pattern} under {folder}"
    return found[-1]


def test_docs_show_the_tested_commands():
    for doc in ("README.md", "docs/inference.md"):
        text = (ROOT / doc).read_text()
        assert COMMAND_ENV_MODEL in text, doc
    assert COMMAND_BUNDLE_FILE in (ROOT / "docs" / "inference.md").read_text()
    assert COMMAND_DOTTED in (ROOT / "docs" / "inference.md").read_text()


@pytest.mark.slow
def test_a_bundle_file_and_a_folder_give_predictions_report_and_a_checked_onnx(tmp_path, bundle):
    """docs/inference.md: someone holding only a bundle file and a folder of images."""
    import onnxruntime as ort
    from conftest import make_project

    from rare_cxr.inference.onnx_export import check_inputs

    project = make_project(tmp_path / "project")
    bundle_file = tmp_path / "shared" / "model_bundle.pt"
    ModelBundleDataset(str(bundle_file)).save(bundle)
    images = tmp_path / "images"
    png(images / "a.png", radiograph(10))
    make_dicom(images / "b" / "c.dcm", radiograph(11), bits_stored=8)
    (images / "readme.txt").write_text("x")
    project.write_local_params({"inference.device": "cpu", "inference.progress_bar": False})
    command = COMMAND_BUNDLE_FILE.replace("/path/to/model_bundle.pt", str(bundle_file))
    command = command.replace("/path/to/images", str(images))
    args = command.split(" ", 1)[1].replace('"', "").split(" ")
    done = project.cli(*args)
    assert "Pipeline execution completed successfully" in done.stdout + done.stderr

    data = project.data()
    predictions = read_predictions(_one(data, "07_model_output/inference/predictions.csv/*/*.csv"))
    assert predictions["path"].tolist() == ["a.png", "b/c.dcm", "readme.txt"]
    assert predictions["status"].tolist() == ["ok", "ok", "not-an-image"]
    assert (predictions["bundle_version"] == "unversioned").all()
    overlays = _one(data, "08_reporting/inference/overlays/*/overlays")
    positives = predictions.loc[0, "positive_findings"]
    if positives:
        first = positives.split("|")[0]
        assert (overlays / overlay_name(1, "a.png", first, "scale_32")).is_file()
    html = _one(data, "08_reporting/inference/inference_report.html/*/*.html").read_text()
    assert "a.png" in html and "readme.txt" in html and "Model card" in html

    parity = json.loads(_one(data, "06_models/onnx/onnx_parity.json/*/*.json").read_text())
    assert parity["passed"] is True and parity["max_abs_diff"] <= 1e-4
    onnx_file = _one(data, "06_models/onnx/model.onnx/*/model.onnx")
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    pixels = decode_resized(str(images / "a.png"), SIZE)[None, None].astype(np.float32) / 255
    x = np.concatenate([check_inputs(SIZE, 3, seed=7), pixels])
    got = session.run(["probabilities"], {"image": x})[0]
    with torch.no_grad():
        expected = torch.sigmoid(load_bundle_model(bundle)(torch.from_numpy(x))).numpy()
    assert np.abs(got - expected).max() <= 1e-4  # ONNX parity on CPU
    np.testing.assert_allclose(got[-1], predictions.loc[0, list(FINDINGS)], atol=1e-4)
    meta = {p.key: p.value for p in __import__("onnx").load(str(onnx_file)).metadata_props}
    assert json.loads(meta["rare_cxr.findings"]) == list(FINDINGS)
    assert json.loads(meta["rare_cxr.thresholds"])["Hernia"] is None

    # the dotted form of the same parameters (the review found it resolved to the project folder)
    command = COMMAND_DOTTED.replace("/path/to/model_bundle.pt", str(bundle_file))
    command = command.replace("/path/to/images", str(images))
    project.cli(*command.split(" ", 1)[1].replace('"', "").split(" "))
    again = read_predictions(_one(data, "07_model_output/inference/predictions.csv/*/*.csv"))
    pd.testing.assert_frame_equal(again.drop(columns="run_id", errors="ignore"),
                                  predictions.drop(columns="run_id", errors="ignore"))  # fmt: skip


def check_inference_on_trained_model(project, tmp_path: Path) -> None:
    """The README's command on the model the default run trained (tests/test_environments.py):
    reporting wrote its bundle and model card; inference reads only the bundle."""
    data = project.data()
    card = _one(data, "08_reporting/multiscale_resnet/model_card.md/*/model_card.md").read_text()
    assert "## Metrics (test split)" in card and "Synthetic data." in card
    report = _one(data, "08_reporting/report.html/*/report.html").read_text()
    assert "Model cards" in report and "Not for clinical use" in report
    raw = sorted((data / "01_raw" / "phantom" / "images").glob("*.png"))[:3]
    images = tmp_path / "new_images"
    images.mkdir()
    for source in raw:
        shutil.copy(source, images / source.name)
    grey = np.asarray(Image.open(raw[0]).convert("L"))
    make_dicom(
        images / "inverted.dcm",
        255 - grey,
        "MONOCHROME1",
        8,
        WindowCenter=128,
        WindowWidth=256,
        ViewPosition="LL",
    )
    (images / "notes.txt").write_text("not an image")
    command = COMMAND_ENV_MODEL.replace("/path/to/images", str(images))
    project.cli(*command.split(" ")[1:])
    predictions = read_predictions(_one(data, "07_model_output/inference/predictions.csv/*/*.csv"))
    rows = predictions.set_index("path")
    assert rows["status"].to_dict() == {
        **{p.name: "ok" for p in raw},
        "inverted.dcm": "ok",
        "notes.txt": "not-an-image",
    }
    assert rows.loc["inverted.dcm", "flags"] == "lateral-view"
    diff = np.abs(rows.loc["inverted.dcm", list(FINDINGS)] - rows.loc[raw[0].name, list(FINDINGS)])
    assert diff.max() <= 1e-3
    bundle_file = _one(data, "06_models/multiscale_resnet/model_bundle.pt/*/model_bundle.pt")
    assert (rows["bundle_version"] == bundle_file.parent.name).all()  # the latest bundle
    scales = ModelBundleDataset(str(bundle_file)).load()["metadata"]["scales"]
    assert len(scales) > 1
    overlays = _one(data, "08_reporting/inference/overlays/*/overlays")
    n_overlays = 0
    for number, row in predictions.iterrows():
        if row["status"] != "ok":
            continue
        for f in [f for f in row["positive_findings"].split("|") if f][:3]:
            for s in scales:  # one overlay per scale of the multi-scale model
                name = overlay_name(number + 1, row["path"], f, f"scale_{s}")
                assert (overlays / name).is_file(), (row["path"], f, s)
                assert name in row["overlays"].split("|")
                n_overlays += 1
    assert n_overlays == len(list(overlays.rglob("*.png")))
    html = _one(data, "08_reporting/inference/inference_report.html/*/*.html").read_text()
    assert "Model card — multiscale_resnet" in html and "notes.txt" in html


def test_grad_cam_with_one_class_per_image_equals_one_pass_per_image():
    """Inference batches every (image, positive finding) pair into one Grad-CAM pass."""
    from test_reporting import TinyNet

    from rare_cxr.evaluation.cam import grad_cam

    torch.manual_seed(0)
    model, x, classes = TinyNet().eval(), torch.rand(3, 1, 16, 16), [0, 5, 13]
    batched = grad_cam(model, x, classes)
    for i, c in enumerate(classes):
        for name, single in grad_cam(model, x[i : i + 1], c).items():
            torch.testing.assert_close(batched[name][i], single[0])
