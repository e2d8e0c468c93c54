"""Reporting: Grad-CAM, cost, node outputs on hand-made frames, pipeline wiring (no training)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PROJECT_ROOT
from test_metrics import make_frames
from torch import nn

from rare_cxr.evaluation import cam, cost, figures
from rare_cxr.findings import FINDINGS
from rare_cxr.models.roster import roster_from_parameters
from rare_cxr.pipeline_registry import project_parameters
from rare_cxr.pipelines.reporting import create_pipeline, nodes

# the checkout's configured models (conf/base), in report order
ROSTER = roster_from_parameters(project_parameters(PROJECT_ROOT, env="base"))
ALL_MODELS = ROSTER.models

PARAMS = {"bootstrap": {"n_resamples": 30, "seed": 1}, "data_source": "hand-made"}


class TinyNet(nn.Module):
    """Smallest model with the project's contract: [B,1,H,W] -> [B,14] and cam_layers()."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)  # in-place after the CAM layer, like VGG/DenseNet
        self.fc = nn.Linear(4, len(FINDINGS))
        self.scales = [16]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))

    def cam_layers(self) -> dict[str, nn.Module]:
        return {"conv": self.conv}


def test_grad_cam_shape_range_and_non_negative():
    torch.manual_seed(0)
    model = TinyNet()
    x = torch.rand(3, 1, 16, 16)
    maps = cam.grad_cam(model, x, class_index=FINDINGS.index("Hernia"))
    assert list(maps) == ["conv"]
    m = maps["conv"]
    assert m.shape == (3, 16, 16)
    assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0 + 1e-6
    assert not model.conv.weight.grad  # grads were taken functionally, model left clean


def test_grad_cam_one_map_per_scale_for_multiscale():
    from rare_cxr.models import build_model

    model = build_model(
        {"architecture": "multiscale_resnet", "backbone": "resnet18", "scales": [32, 64]},
        load_weights=False,
    )
    maps = cam.grad_cam(model, torch.rand(2, 1, 64, 64), class_index=0)
    assert sorted(maps) == ["scale_32", "scale_64"]
    assert all(m.shape == (2, 64, 64) and float(m.min()) >= 0 for m in maps.values())


def test_cost_counts_params_and_flops():
    model = TinyNet()
    c = cost.model_cost(model, 16, batch_size=2, n_batches=1, warmup_batches=0)
    assert c["params"] == 4 * 9 + 4 + 4 * 14 + 14
    conv_flops = 2 * 16 * 16 * 4 * 9  # multiply-adds of the 3x3 conv, 2 FLOPs each
    assert c["gflops"] * 1e9 >= conv_flops
    assert c["img_per_s"] > 0


def test_reporting_nodes_on_hand_made_predictions():
    preds, labels = make_frames()
    splits = labels[["image_id", "patient_id"]].assign(split="test")
    splits.loc[: len(splits) // 3, "split"] = "train"
    lineage = {"model": "a", "checkpoint_version": "2026-01-01T00.00.00.000Z"}
    thresholds = nodes.select_thresholds(preds, labels, lineage, PARAMS)
    assert thresholds["split"] == "val" and thresholds["thresholds"]["Hernia"] is None
    m = nodes.evaluate_model(preds, labels, thresholds, PARAMS)
    assert m["lineage"] == lineage
    json.dumps(m, allow_nan=False)  # valid JSON: undefined metrics are null, not NaN
    assert m["test"]["per_finding"]["Hernia"]["auroc"] is None
    assert "Hernia" in m["test"]["undefined"]
    assert m["intervals"]["unit"] == "patient"
    rare = nodes.select_rare_findings(labels, splits, PARAMS)
    assert len(rare["findings"]) == 5
    all_metrics = nodes.combine_metrics(
        a__metrics=m, a__cost={"params": 1000, "gflops": 0.5, "img_per_s": 10.0}, b__metrics=m
    )
    table, markdown = nodes.build_table1(all_metrics)
    assert list(table["Model"]) == ["a", "b"]
    assert {"ACC", "Recall", "Precision", "F1", "AUROC", "AUPRC", "params", "GFLOPs"} <= set(
        table.columns
    )
    assert "[" in table.loc[0, "F1"] and table.loc[1, "params"] == "n/a"
    assert markdown.startswith("| Model | Seeds | ACC |")
    assert {"Specificity", "Balanced ACC", "Precision 0-filled"} <= set(table.columns)
    per = nodes.build_per_finding_auroc(all_metrics)
    assert per.shape == (2, len(FINDINGS) + 2) and per["Hernia"].isna().all()
    rare_table = nodes.build_rare_findings_table(all_metrics, rare, PARAMS)
    assert len(rare_table) == 10
    few = rare_table["test positive patients"] < 10  # marked unreliable, not hidden
    assert few.any() and rare_table.loc[few, "AUROC"].str.endswith("†").all()
    assert not rare_table.loc[~few, "AUROC"].str.endswith("†").any()
    assert (rare_table["test positive patients"] <= rare_table["test positives"]).all()
    assert rare_table.loc[few, "Recall"].str.endswith("†").all()
    # a precision of exactly 1 degenerates in the bootstrap: its interval is Clopper-Pearson
    perfect = rare_table["Precision"].str.startswith("1.000 [")
    assert perfect.any() and (rare_table.loc[perfect, "Precision"] != "1.000 [1.000, 1.000]").all()
    assert rare_table.loc[perfect, "interval (recall, precision)"].str.contains("Clopper").all()
    assert m["intervals"]["per_finding_method"]["Atelectasis"]["auroc"] == "bootstrap"
    assert set(m["intervals"]["macro_resamples_dropped"]) >= {"auroc", "recall", "accuracy"}
    assert table.loc[0, "Uncertainty"] == "95% patient-bootstrap interval"
    assert table.loc[0, "Resamples dropped"].endswith(" of 30")
    people = m["test"]["per_finding"]["Atelectasis"]
    assert 0 < people["positive_patients"] <= people["positives"]
    summary = nodes.summarise_data(labels, splits, "", PARAMS)
    assert summary["bounding_boxes"]["present"] is False  # the optional file is absent
    # the model bundle and its card, from these outputs (rare_cxr.inference.bundle)
    checkpoint = {
        "state_dict": {"fc.weight": torch.zeros(14, 2)},
        "metadata": {
            "model_spec": {"name": "a", "architecture": "multiscale_resnet", "scales": [8]},
            "findings": list(FINDINGS),
            "normalisation": {"mean": 0.5, "std": 0.25},
            "input_size": 8,
            "checkpoint_version": lineage["checkpoint_version"],
        },
    }
    bundle_inputs = {
        "checkpoint": checkpoint,
        "lineage": lineage,
        "thresholds": thresholds,
        "metrics": m,
        "long_tail": {"groups": [{"group": "tail", "findings": "Hernia", "auroc": 0.5}]},
        "subgroups": {"rows": []},
        "data_summary": summary,
        "rare_findings": rare,
        "reporting": PARAMS,
    }
    bundle, card = nodes.build_model_bundle(**bundle_inputs)
    assert bundle["metadata"]["thresholds"] == thresholds["thresholds"]
    assert bundle["metadata"]["data"]["source"] == "hand-made"
    assert "## Metrics (test split)" in card and "Long tail" in card
    with pytest.raises(nodes.LineageError, match="lineage check verified"):
        nodes.build_model_bundle(**{**bundle_inputs, "lineage": {"checkpoint_version": "x"}})
    fig = figures.auroc_intervals({"a": m})
    png = _png(fig)
    html = nodes.render_report(
        all_metrics=all_metrics,
        table1=table,
        per_finding_auroc=per,
        rare_findings_table=rare_table,
        rare_findings=rare,
        data_summary=summary,
        reporting=PARAMS,
        per_finding_auroc_figure=png,
        a__gradcam=png,
        a__model_card=card,
    )
    assert html.count("data:image/png;base64,") == 2
    assert "Model cards" in html and "<summary>a</summary>" in html and "Limitations" in html
    assert "All-negative baseline" in html and "n/a" in html and "hand-made" in html
    assert "<script" not in html and "src='http" not in html  # self-contained


def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def test_figures_survive_undefined_findings():
    preds, labels = make_frames()
    histories = {
        "a": pd.DataFrame(
            {
                "epoch": [1, 2],
                "train_loss": [1.0, 0.8],
                "val_loss": [1.1, 0.9],
                "val_acc": [0.5, 0.6],
                "val_macro_auroc": [0.55, 0.6],
            }
        )
    }
    for fig in (
        nodes.plot_validation_curves(**histories),
        nodes.plot_training_loss(**histories),
        nodes.plot_roc_curves(labels, a=preds, b=preds),
        nodes.plot_pr_curves(labels, a=preds),
        nodes.plot_reliability(labels, PARAMS, a=preds),
        figures.gradcam_panel("a", []),
    ):
        assert len(_png(fig)) > 1000


def test_bbox_list_parsing_uses_alias():
    text = (
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "00000001_000.png,Infiltrate,10.5,20,30,40\n"
        "00000002_000.png,Hernia,1,2,3,4\n"
    )
    boxes = nodes._bbox_table(text)
    assert list(boxes["finding"]) == ["Infiltration", "Hernia"]
    assert boxes.loc[0, "x"] == pytest.approx(10.5)


def test_params_are_validated_with_the_key_named():
    with pytest.raises(ValueError, match="reporting.threshold_method"):
        nodes.validate_reporting_params({"threshold_method": "median"})
    with pytest.raises(ValueError, match="reporting.bootstrap.n_resamples"):
        nodes.validate_reporting_params({"bootstrap": {"n_resamples": 0}})
    with pytest.raises(ValueError, match=r"reporting\.bootsrap: unknown key"):
        nodes.validate_reporting_params({"bootsrap": {}})
    # every sub-block too: a typo must not be silently ignored, and the error names its full key
    with pytest.raises(
        ValueError, match=r"^reporting\.gradcam\.devcie: unknown key \(did you mean 'device'\?\)"
    ):
        nodes.validate_reporting_params({"gradcam": {"devcie": "cuda"}})
    with pytest.raises(ValueError, match=r"^reporting\.cost\.batchsize: unknown key"):
        nodes.validate_reporting_params({"cost": {"batchsize": 2}})
    with pytest.raises(ValueError, match=r"^reporting\.bootstrap\.n_resample: unknown key"):
        nodes.validate_reporting_params({"bootstrap": {"n_resample": 20}})
    with pytest.raises(ValueError, match=r"^reporting\.rare_findings\.nrarest: unknown key"):
        nodes.validate_reporting_params({"rare_findings": {"nrarest": 3}})
    with pytest.raises(ValueError, match=r"^reporting\.cost\.device: expected auto, cpu, cuda"):
        nodes.validate_reporting_params({"cost": {"device": "gpu"}})
    with pytest.raises(
        ValueError,
        match=r"^reporting\.long_tail\.head_min: 0\.01 must be greater than "
        r"reporting\.long_tail\.tail_max \(0\.02\)",
    ):
        nodes.validate_reporting_params({"long_tail": {"head_min": 0.01, "tail_max": 0.02}})
    with pytest.raises(ValueError, match=r"reporting\.min_positives"):
        nodes.validate_reporting_params({"min_positives": 0})


def roster():
    """The configured models (conf/base), as the registry hands them to the pipeline."""
    from rare_cxr.pipeline_registry import current_roster

    return current_roster()


def test_pipeline_per_model_namespaces_and_inputs():
    pipe = create_pipeline(roster(), models=["multiscale_resnet", "vgg16"])
    names = {n.name for n in pipe.nodes}
    for model in ("multiscale_resnet", "vgg16"):
        for node in ("select_thresholds", "evaluate_model", "measure_cost", "gradcam_examples"):
            assert f"{model}.{node}" in names
    assert {"build_table1", "render_report", "plot_validation_curves"} <= names
    expected = {
        "labels",
        "splits",
        "image_cache",
        "image_index",
        "raw_bbox_list",
        "raw_expert_labels",
        "params:reporting",
        *(
            f"{m}.{k}"
            for m in ("multiscale_resnet", "vgg16")
            for k in ("predictions", "history", "checkpoint")
        ),
    }
    assert pipe.inputs() == expected
    assert len(create_pipeline(roster()).nodes) == 12 * len(ALL_MODELS) + 24
    with pytest.raises(ValueError, match="unknown model"):
        create_pipeline(roster(), models=["resnet9000"])


def test_every_reporting_output_is_persisted(kedro_project):
    catalog = kedro_project.catalog()
    pipe = create_pipeline(roster())
    # verify_lineage hands the tables it checked on, in memory, within the run (by design)
    in_memory = {
        n for n in pipe.all_outputs() if n.endswith((".verified_predictions", ".verified_history"))
    }
    assert len(in_memory) == 2 * len(ALL_MODELS)
    reports = kedro_project.data("08_reporting")
    for name in sorted(pipe.all_outputs() - in_memory):
        ds = catalog.get(name, fallback_to_runtime_pattern=True)
        assert ds is not None and type(ds).__name__ != "MemoryDataset", f"{name} is not persisted"
        # the model bundle is a model artefact (docs/inference.md), the rest is the report
        folder = kedro_project.data("06_models") if name.endswith(".model_bundle") else reports
        assert str(ds._describe().get("filepath")).startswith(str(folder)), name
        assert type(ds).__module__.startswith("rare_cxr."), f"{name}: not an atomic dataset"


def test_registry_default_reports_the_ablation_pair_and_nih_all_six(kedro_project):
    from rare_cxr.pipeline_registry import register_pipelines

    pipes = register_pipelines()
    default_nodes = {n.name for n in pipes["__default__"].nodes}
    for model in ("multiscale_resnet", "resnet_single_scale"):  # same trunk, one vs two scales
        assert {f"{model}.train_model", f"{model}.evaluate_model"} <= default_nodes
    assert "vgg16.evaluate_model" not in default_nodes and "vgg16.train_model" not in default_nodes
    nih_nodes = {n.name for n in pipes["nih"].nodes}
    assert {f"{m}.evaluate_model" for m in ALL_MODELS} <= nih_nodes
    assert {f"{m}.train_model" for m in ALL_MODELS} <= nih_nodes
    baselines = {n.name for n in pipes["baselines"].nodes}
    assert baselines == {
        f"{m}.{n}"
        for m in ALL_MODELS
        if m != "multiscale_resnet"
        for n in ("train_model", "predict")
    }


@pytest.mark.parametrize("requested", [["nih"], ["all_models"], ["data_processing"]])
def test_registry_compositions_survive_kedro_lazy_loading(kedro_project, requested):
    """`kedro run --pipelines nih` makes Kedro 1.7 load only the *folders* it names; the
    compositions must not come out empty (they once did: `--pipelines nih` ran nothing)."""
    import warnings

    from kedro.framework.project import pipelines as project_pipelines

    from rare_cxr.pipeline_registry import register_pipelines

    project_pipelines.set_requested(requested)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "error occurred while importing ...nih" noise
            pipes = register_pipelines()
    finally:
        project_pipelines.set_requested(None)
    full = {n.name for n in pipes["nih"].nodes}
    assert {"parse_labels", "split_patients"} <= full
    assert {f"{m}.train_model" for m in ALL_MODELS} <= full
    assert {n.name for n in pipes["all_models"].nodes} == full
    from rare_cxr.pipelines.phantom import create_pipeline as create_phantom

    assert set(create_phantom().nodes) <= set(pipes["__default__"].nodes)


# ---------------------------------------------------------------- lineage


def _lineage_inputs():
    """A consistent set: checkpoint, history, predictions, cache, labels, splits of one run."""
    from test_training import blob_cache

    from rare_cxr.pipelines.training.nodes import cache_fingerprint_text

    cache = blob_cache(n_train=8, n_val=6, n_test=4)
    tables = {n: cache.split(n).table for n in ("train", "val", "test")}
    labels = pd.concat(tables.values(), ignore_index=True)
    splits = pd.concat(
        [t[["image_id", "patient_id"]].assign(split=n) for n, t in tables.items()],
        ignore_index=True,
    )
    meta = {
        "model_spec": {"name": "m"},
        "checkpoint_version": "2026-11-26T10.00.00.000Z",
        "training_id": "abc123",
        "epoch": 2,
    }
    predictions = pd.concat(
        [t[["image_id", "patient_id"]].assign(split=n) for n, t in tables.items() if n != "train"],
        ignore_index=True,
    )
    for f in FINDINGS:
        predictions[f] = 0.5
    predictions["checkpoint_version"] = meta["checkpoint_version"]
    predictions["training_id"] = meta["training_id"]
    predictions["image_cache_fingerprint"] = cache_fingerprint_text(cache)
    history = pd.DataFrame({"epoch": [1, 2], "training_id": ["abc123"] * 2})
    return {
        "checkpoint": {"metadata": meta, "state_dict": {}},
        "history": history,
        "predictions": predictions,
        "image_cache": cache,
        "labels": labels,
        "splits": splits,
    }


def test_verify_lineage_passes_a_consistent_set_through():
    inputs = _lineage_inputs()
    record, predictions, history = nodes.verify_lineage(**inputs)
    assert record["checkpoint_version"] == "2026-11-26T10.00.00.000Z"
    assert record["training_id"] == "abc123" and record["best_epoch"] == 2
    assert predictions is inputs["predictions"] and history is inputs["history"]


def _break(inputs, what: str):
    if what == "checkpoint":  # a later training saved its checkpoint, then died before predict
        inputs["checkpoint"]["metadata"]["checkpoint_version"] = "2026-11-27T09.00.00.000Z"
    elif what == "history":
        inputs["history"]["training_id"] = "zzz999"
    elif what == "cache":
        inputs["predictions"]["image_cache_fingerprint"] = "0123:4567:32px"
    elif what == "labels":
        first_val = inputs["image_cache"].split("val").table["image_id"].iloc[0]
        row = inputs["labels"]["image_id"] == first_val
        inputs["labels"].loc[row, "Hernia"] = 1 - inputs["labels"].loc[row, "Hernia"]
    elif what == "splits":
        first_test = inputs["image_cache"].split("test").table["image_id"].iloc[0]
        inputs["splits"].loc[inputs["splits"]["image_id"] == first_test, "split"] = "train"
    elif what == "old predictions":
        inputs["predictions"] = inputs["predictions"].drop(columns=["training_id"])
    return inputs


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("checkpoint", r"checkpoint version 2026-11-26T10.00.00.000Z.*is version 2026-11-27"),
        ("history", r"m\.history belongs to training \{'0': 'zzz999'\}"),
        ("cache", r"image cache 0123:4567:32px, but the image cache is now"),
        ("labels", r"labels differ from those the image cache.*1 val image"),
        ("splits", r"put 1 image\(s\) of the cache's test split elsewhere"),
        ("old predictions", r"lack the lineage column.*--nodes m\.predict"),
    ],
)
def test_verify_lineage_names_every_mismatch(what, message):
    with pytest.raises(nodes.LineageError, match=message):
        nodes.verify_lineage(**_break(_lineage_inputs(), what))


def test_reporting_models_are_the_trained_ones_or_a_parameter(tmp_path):
    from rare_cxr.pipelines.reporting.pipeline import select_models

    assert select_models("trained", None, ROSTER) == list(ALL_MODELS)  # kedro-viz: no data folder
    assert select_models("trained", tmp_path, ROSTER) == list(ALL_MODELS)  # nothing trained yet
    for model in ("vgg16", "multiscale_resnet"):
        (tmp_path / "06_models" / model / "checkpoint.pt" / "2026-01-01T00.00.00.000Z").mkdir(
            parents=True
        )
    (
        tmp_path
        / "06_models"
        / "vgg16"
        / "checkpoint.pt"
        / "2026-01-01T00.00.00.000Z"
        / "checkpoint.pt"
    ).write_bytes(b"x")
    assert select_models("trained", tmp_path, ROSTER) == ["vgg16"]  # an empty version: no
    assert select_models(["vgg16", "multiscale_resnet"], tmp_path, ROSTER) == [
        "multiscale_resnet",
        "vgg16",
    ]
    with pytest.raises(ValueError, match=r"reporting\.models: unknown model\(s\) \['resnet9'\]"):
        select_models(["resnet9"], tmp_path, ROSTER)
    with pytest.raises(ValueError, match=r"reporting\.models: expected 'trained'"):
        select_models("all", tmp_path, ROSTER)


def test_several_seeds_give_per_seed_metrics_mean_sd_in_table1_and_paired_rows():
    import numpy as np

    preds, labels = make_frames()
    rng = np.random.default_rng(0)
    other = preds.copy()
    other[list(FINDINGS)] = np.clip(
        other[list(FINDINGS)] + rng.normal(0, 0.1, (len(other), 14)), 0, 1
    )
    two = pd.concat([preds.assign(seed=42), other.assign(seed=43)], ignore_index=True)
    lineage = {"model": "m"}
    thresholds = nodes.select_thresholds(two, labels, lineage, PARAMS)
    assert set(thresholds["per_seed"]) == {"42", "43"}
    m = nodes.evaluate_model(two, labels, thresholds, PARAMS)
    assert m["seeds"] == [42, 43] and set(m["per_seed"]) == {"42", "43"}
    one_seed = nodes.evaluate_model(
        preds, labels, nodes.select_thresholds(preds, labels, lineage, PARAMS), PARAMS
    )
    assert m["per_seed"]["42"]["macro"]["auroc"] == pytest.approx(
        one_seed["test"]["macro"]["auroc"]
    )
    for key in nodes.TABLE1_COLUMNS.values():
        values = [m["per_seed"][s]["macro"][key] for s in ("42", "43")]
        assert m["seed_summary"][key]["mean"] == pytest.approx(np.mean(values)), key
        assert m["seed_summary"][key]["sd"] == pytest.approx(np.std(values, ddof=1)), key
    table, _ = nodes.build_table1({"m": {"metrics": m, "cost": {}}})
    assert table.loc[0, "Seeds"] == 2
    for column in nodes.TABLE1_COLUMNS:
        assert " ± " in table.loc[0, column], column  # every column, balanced ACC included
    assert table.loc[0, "Uncertainty"] == "mean ± sd over 2 seeds: training variation only"
    assert table.loc[0, "Resamples dropped"] == "n/a"

    # paired: the same model against itself differs by nothing, seed by seed
    rows = nodes.paired_comparison(
        labels,
        PARAMS,
        pairs=[("multiscale_resnet", "resnet_single_scale")],
        multiscale_resnet__predictions=two,
        multiscale_resnet__thresholds=thresholds,
        resnet_single_scale__predictions=two,
        resnet_single_scale__thresholds=thresholds,
    )
    assert rows["seeds"].unique().tolist() == [2]
    macro = rows[rows["finding"] == "macro"]
    assert (macro["delta"] == 0).all() and (macro["p_value"] == 1).all()
    assert (rows["seed_sd"].dropna() == 0).all() and rows["seed_sd"].notna().any()


def test_paired_rows_say_how_many_test_positives_and_flag_unreliable_findings():
    """A per-finding paired row with fewer than reporting.min_positives positive test PATIENTS
    is marked reliable = False (its p-value means nothing); macro rows pool all findings."""
    import numpy as np

    preds, labels = make_frames()
    rng = np.random.default_rng(1)
    other = preds.copy()
    other[list(FINDINGS)] = np.clip(
        other[list(FINDINGS)] + rng.normal(0, 0.2, (len(other), 14)), 0, 1
    )
    lineage = {"model": "m"}
    rows = nodes.paired_comparison(
        labels,
        PARAMS,
        pairs=[("a", "b")],
        a__predictions=preds,
        a__thresholds=nodes.select_thresholds(preds, labels, lineage, PARAMS),
        b__predictions=other,
        b__thresholds=nodes.select_thresholds(other, labels, lineage, PARAMS),
    )
    assert list(rows.columns) == list(nodes.PAIRED_COLUMNS)
    test = labels.set_index("image_id").loc[preds.loc[preds["split"] == "test", "image_id"]]
    minimum = nodes.validate_reporting_params(PARAMS)["min_positives"]
    for finding in FINDINGS:
        (row,) = rows[rows["finding"] == finding].to_dict("records")
        positive = test[test[finding] == 1]
        assert row["test_positives"] == len(positive), finding
        assert row["test_positive_patients"] == positive["patient_id"].nunique(), finding
        assert row["reliable"] == (row["test_positive_patients"] >= max(minimum, 2)), finding
        assert row["method"] == "clustered DeLong (patients, Obuchowski 1997)"
    assert (rows["test_positive_patients"].dropna() < rows["test_positives"].dropna()).any()
    assert rows.loc[rows["finding"] == "macro", "reliable"].all()
    assert not rows["reliable"].all(), "the fixture should hold a rare finding"


def test_forest_plot_greys_unreliable_rows_and_fills_by_the_drawn_interval():
    base = {"model": "a", "reference": "b", "metric": "auroc", "p_holm": 0.5, "p_value": 0.01}
    significant = {**base, "finding": "Mass", "delta": 0.1, "ci_low": 0.02, "ci_high": 0.2}
    # a small p_holm but 2 positive patients: grey and hollow, whatever its interval
    few = {**significant, "finding": "Hernia", "p_holm": 1e-5, "reliable": False}
    crossing = {**base, "finding": "Nodule", "delta": 0.05, "ci_low": -0.01, "ci_high": 0.1}
    assert figures.forest_style({**significant, "reliable": True})["face"] == "C3"
    assert figures.forest_style(few) == {"bar": "0.7", "face": "white", "edge": "0.6"}
    # the fill follows the drawn (unadjusted) interval, not p_holm
    assert figures.forest_style({**crossing, "p_holm": 1e-9, "reliable": True})["face"] == "white"
    assert figures.forest_style({**crossing, "delta": float("nan")}) is None
    table = pd.DataFrame([{**significant, "reliable": True}, few, {**crossing, "reliable": True}])
    fig = figures.paired_forest(table)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert "Hernia AUROC * †" in labels and "Mass AUROC" in labels
    assert "unadjusted" in fig.axes[0].get_xlabel()
    assert len(_png(fig)) > 1000


def test_class_weight_table_shows_the_cap_and_what_it_changed():
    from rare_cxr.evaluation.report_html import class_weight_table

    summary = {
        "splits": [{"split": "train", "images": 1001}],
        "positives": [{"split": "train", "Hernia": 2, "Mass": 100, "Edema": 0}],
    }
    card = {
        "train_params": {"loss": {"name": "bce", "balanced": True, "pos_weight_cap": 100.0}},
        "pos_weight": [100.0, 9.0],
    }
    table = class_weight_table({"m": card, "old": {}}, summary)
    assert table["Model"].tolist() == ["m"]  # no training parameters: left out
    row = table.iloc[0]
    assert row["pos_weight_cap"] == 100.0 and row["largest pos_weight used"] == 100.0
    assert row["capped (uncapped weight)"] == "Hernia (500)"  # Mass: 901/100 = 9 < 100


def test_calibration_underdiagnosis_and_ranking_nodes_on_hand_made_predictions():
    """Issue 20's nodes: temperatures from validation only, test ECE raw and calibrated, the
    'any finding' underdiagnosis by sex and age, the tail ranking, their report sections and
    the bundle's temperatures."""
    from rare_cxr.evaluation import calibration
    from rare_cxr.pipelines.reporting import analysis_nodes

    preds, labels = make_frames()
    rng = np.random.default_rng(0)
    labels["sex"] = np.where(labels["patient_id"].astype(int) % 2 == 0, "F", "M")
    labels["age"] = (labels["patient_id"].astype(int) * 7) % 90
    labels["view"] = "PA"
    splits = labels[["image_id", "patient_id"]].assign(split="test")
    splits.loc[: len(splits) // 3, "split"] = "train"
    lineage = {"model": "a", "checkpoint_version": "2026-01-01T00.00.00.000Z"}
    thresholds = nodes.select_thresholds(preds, labels, lineage, PARAMS)

    result = analysis_nodes.calibration_metrics(preds, labels, PARAMS)
    json.dumps(result, allow_nan=False)
    assert result["split"] == "val" and result["binning"] == "equal_mass"
    assert result["temperatures"]["Hernia"] is None  # no validation positive
    # the temperatures are a function of the validation rows only: test scores do not move them
    moved = preds.copy()
    test = moved["split"] == "test"
    moved.loc[test, list(FINDINGS)] = rng.random((int(test.sum()), len(FINDINGS)))
    assert (
        analysis_nodes.calibration_metrics(moved, labels, PARAMS)["temperatures"]
        == (result["temperatures"])
    )
    val = preds[preds["split"] == "val"]
    mass = FINDINGS.index("Mass")
    y_val = labels.set_index("image_id").loc[val["image_id"], "Mass"].to_numpy()
    fit = calibration.fit_temperature(y_val, val["Mass"].to_numpy())
    assert result["temperatures"]["Mass"] == pytest.approx(fit.temperature)
    rows = {r["finding"]: r for r in result["per_finding"]}
    assert rows["Mass"]["val_nll_calibrated"] <= rows["Mass"]["val_nll_raw"]
    assert mass >= 0 and set(rows) == {*FINDINGS, "macro"}

    under = analysis_nodes.underdiagnosis_metrics(preds, labels, thresholds, PARAMS)
    json.dumps(under, allow_nan=False)
    table = pd.DataFrame(under["rows"])
    assert table["attribute"].tolist()[:3] == ["all", "sex", "sex"]
    assert set(table["subgroup"]) >= {"all", "F", "M", "0-17", "80+"}
    overall = table.iloc[0]
    y_test = labels.set_index("image_id").loc[
        preds.loc[preds["split"] == "test", "image_id"], list(FINDINGS)
    ]
    assert overall["sick_images"] == int((y_test.sum(axis=1) > 0).sum())

    # cut-offs that put Fibrosis, Infiltration, Mass (11-12 training positives) and Hernia in
    # the tail of this small training split
    tail_params = {**PARAMS, "long_tail": {"head_min": 0.35, "tail_max": 0.27}}
    long_a = nodes.long_tail_metrics(preds, labels, splits, thresholds, tail_params)
    tail = next(g for g in long_a["groups"] if g["group"] == "tail")
    assert tail["findings"] == "Fibrosis|Hernia|Infiltration|Mass"
    assert [g["group"] for g in long_a["groups"]][-1] == "all"
    assert "mAP" in long_a["groups"][0] and "auprc" not in long_a["groups"][0]
    other = preds.copy()
    other[list(FINDINGS)] = np.clip(
        preds[list(FINDINGS)] + rng.normal(0, 0.2, (len(preds), 14)), 0, 1
    )
    thresholds_b = nodes.select_thresholds(other, labels, lineage, PARAMS)
    long_b = nodes.long_tail_metrics(other, labels, splits, thresholds_b, tail_params)
    ranking = analysis_nodes.build_long_tail_ranking(
        labels,
        PARAMS,
        a__long_tail=long_a,
        b__long_tail=long_b,
        a__predictions=preds,
        b__predictions=other,
        a__thresholds=thresholds,
        b__thresholds=thresholds_b,
    )
    assert set(ranking["metric"]) == {"mAP", "auroc"}
    for _, part in ranking.groupby("metric"):
        assert part["rank"].tolist() == [1, 2] and part["value"].is_monotonic_decreasing
        second = part.iloc[1]
        assert second["leader"] == part.iloc[0]["model"] and second["seeds"] == 1
        assert second["delta_vs_leader"] == pytest.approx(second["value"] - part.iloc[0]["value"])
        assert second["delta_ci_low"] <= second["delta_vs_leader"] <= second["delta_ci_high"]

    calibration_table = analysis_nodes.build_calibration_table(a__calibration=result)
    assert calibration_table["model"].unique().tolist() == ["a"]
    under_table = analysis_nodes.build_underdiagnosis_table(a__underdiagnosis=under)
    fig = analysis_nodes.plot_reliability_rare(
        labels,
        {"findings": ["Hernia", "Pneumonia", "Mass"]},
        PARAMS,
        a__predictions=preds,
        a__calibration=result,
    )
    assert len(_png(fig)) > 1000
    m = nodes.evaluate_model(preds, labels, thresholds, PARAMS)
    all_metrics = nodes.combine_metrics(a__metrics=m)
    table1, _ = nodes.build_table1(all_metrics)
    rare = nodes.select_rare_findings(labels, splits, PARAMS)
    long_table, long_findings = nodes.build_long_tail_tables(a__long_tail=long_a)
    html = nodes.render_report(
        all_metrics=all_metrics,
        table1=table1,
        per_finding_auroc=nodes.build_per_finding_auroc(all_metrics),
        rare_findings_table=nodes.build_rare_findings_table(all_metrics, rare, PARAMS),
        rare_findings=rare,
        data_summary=nodes.summarise_data(labels, splits, "", PARAMS),
        reporting=PARAMS,
        long_tail=long_table,
        long_tail_findings=long_findings,
        long_tail_ranking=ranking,
        calibration=calibration_table,
        underdiagnosis=under_table,
        reliability_rare=_png(fig),
    )
    order = [
        "Long tail: head / medium / tail findings",
        "Long tail: ranking by tail mAP and tail AUROC",
        "Underdiagnosis by sex and age",
        "Calibration: raw and temperature-scaled probabilities",
        "Reliability per rare finding",
    ]
    positions = [html.index(title) for title in order]
    assert positions == sorted(positions)
    assert "<th>mAP</th>" in html and "<th>ece_calibrated</th>" in html
    assert "<th>underdiagnosis_rate</th>" in html and "<th>differs_from_leader</th>" in html

    checkpoint = {
        "state_dict": {"fc.weight": torch.zeros(14, 2)},
        "metadata": {
            "model_spec": {"name": "a", "architecture": "multiscale_resnet", "scales": [8]},
            "findings": list(FINDINGS),
            "normalisation": {"mean": 0.5, "std": 0.25},
            "input_size": 8,
            "checkpoint_version": lineage["checkpoint_version"],
        },
    }
    bundle, card = nodes.build_model_bundle(
        checkpoint=checkpoint,
        lineage=lineage,
        thresholds=thresholds,
        metrics=m,
        long_tail=long_a,
        subgroups={"rows": []},
        data_summary=nodes.summarise_data(labels, splits, "", PARAMS),
        rare_findings=rare,
        reporting=PARAMS,
        calibration=result,
        underdiagnosis=under,
    )
    assert bundle["metadata"]["calibration"]["temperatures"] == result["temperatures"]
    assert bundle["metadata"]["underdiagnosis"] == under["rows"]
    assert "| tail |" in card and "| all |" in card and "mAP" in card
    assert "threshold, calibrated" in card and "Underdiagnosis" in card
