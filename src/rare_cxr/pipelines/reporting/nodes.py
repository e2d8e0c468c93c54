"""Reporting nodes: thin, named wrappers around `rare_cxr.evaluation`.

Per-model nodes run inside the model's namespace (they see `predictions`, `checkpoint`, ...
of that model only); combined nodes receive every model's output as keyword arguments named by
the model, so a table row is always labelled by the namespace that produced it.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from rare_cxr.evaluation import bootstrap, cam, cost, figures, metrics, report_html
from rare_cxr.findings import FINDINGS, finding_index

logger = logging.getLogger(__name__)

REPORTING_KEYS = {
    "models",
    "threshold_method",
    "bootstrap",
    "rare_findings",
    "cost",
    "gradcam",
    "reliability_bins",
    "data_source",
    "title",
}


def validate_reporting_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Check `params:reporting` before any work; errors name the offending key."""
    if not isinstance(params, Mapping):
        raise ValueError("reporting: expected a mapping of parameters")
    unknown = sorted(set(params) - REPORTING_KEYS)
    if unknown:
        raise ValueError(f"reporting: unknown key(s) {unknown}; known: {sorted(REPORTING_KEYS)}")
    method = params.get("threshold_method", "f1")
    if method not in metrics.THRESHOLD_METHODS:
        raise ValueError(
            f"reporting.threshold_method: expected one of "
            f"{metrics.THRESHOLD_METHODS}, got {method!r}"
        )
    boot = dict(params.get("bootstrap", {}))
    n = boot.get("n_resamples", 1000)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"reporting.bootstrap.n_resamples: expected an integer >= 1, got {n!r}")
    conf = boot.get("confidence", 0.95)
    if not isinstance(conf, int | float) or not 0 < conf < 1:
        raise ValueError(f"reporting.bootstrap.confidence: expected in (0, 1), got {conf!r}")
    rare = dict(params.get("rare_findings", {}))
    mp = rare.get("max_prevalence")
    if mp is not None and (not isinstance(mp, int | float) or not 0 < mp <= 1):
        raise ValueError(
            f"reporting.rare_findings.max_prevalence: expected null or a number in "
            f"(0, 1], got {mp!r}"
        )
    nr = rare.get("n_rarest", 5)
    if not isinstance(nr, int) or not 1 <= nr <= len(FINDINGS):
        raise ValueError(
            f"reporting.rare_findings.n_rarest: expected 1..{len(FINDINGS)}, got {nr!r}"
        )
    return {
        "threshold_method": method,
        "bootstrap": {
            "n_resamples": n,
            "seed": int(boot.get("seed", 0)),
            "confidence": float(conf),
        },
        "rare_findings": {"max_prevalence": mp, "n_rarest": nr},
        "cost": {
            "batch_size": 8,
            "n_batches": 3,
            "warmup_batches": 1,
            "device": "cpu",
            **dict(params.get("cost", {})),
        },
        "gradcam": {"examples_per_finding": 1, "device": "cpu", **dict(params.get("gradcam", {}))},
        "reliability_bins": int(params.get("reliability_bins", 10)),
        "data_source": str(params.get("data_source", "")),
        "title": str(params.get("title", "rare-cxr report")),
    }


# --- shared, once per run -------------------------------------------------------------------


def select_rare_findings(
    labels: pd.DataFrame, splits: pd.DataFrame, reporting: Mapping[str, Any]
) -> dict[str, Any]:
    """Which findings form the rare block, decided on the *training* split's prevalence."""
    cfg = validate_reporting_params(reporting)["rare_findings"]
    prevalence = metrics.split_prevalence(labels, splits, "train")
    chosen = metrics.rare_findings(prevalence, cfg["n_rarest"], cfg["max_prevalence"])
    rule = (
        f"findings with training prevalence below {cfg['max_prevalence']:.2%}"
        if cfg["max_prevalence"] is not None
        else f"the {cfg['n_rarest']} rarest findings in the training split"
    )
    return metrics.to_jsonable({"rule": rule, "findings": chosen, "train_prevalence": prevalence})


def summarise_data(
    labels: pd.DataFrame,
    splits: pd.DataFrame,
    raw_bbox_list: str,
    reporting: Mapping[str, Any],
) -> dict[str, Any]:
    """Source, images/patients per split, positives per finding and split, and whether
    bounding boxes exist (the report 'Data' section)."""
    cfg = validate_reporting_params(reporting)
    boxes = _bbox_table(raw_bbox_list)
    merged = (
        splits[["image_id", "split"]]
        .astype({"image_id": str})
        .merge(labels.astype({"image_id": str}), on="image_id", how="left")
    )
    rows, positives = [], []
    for name, part in merged.groupby("split", sort=False):
        rows.append(
            {
                "split": str(name),
                "images": int(len(part)),
                "patients": int(part["patient_id"].nunique()),
                "no_finding_images": int((part[list(FINDINGS)].sum(axis=1) == 0).sum()),
            }
        )
        positives.append(
            {"split": str(name), **{f: int(part[f].fillna(0).sum()) for f in FINDINGS}}
        )
    return {
        "source": cfg["data_source"],
        "splits": rows,
        "positives": positives,
        "bounding_boxes": {
            "present": bool(len(boxes)),
            "boxes": int(len(boxes)),
            "images": int(boxes["image_id"].nunique()) if len(boxes) else 0,
            "note": (
                ""
                if len(boxes)
                else "no BBox_List_2017.csv in the data root (it is optional): Grad-CAM "
                "figures are drawn without boxes"
            ),
        },
    }


# --- lineage: what this report combines must belong together ---------------------------------


class LineageError(ValueError):
    """Reporting inputs that do not belong together (named, with the fix)."""


def verify_lineage(
    *,
    checkpoint: Mapping[str, Any],
    history: pd.DataFrame,
    predictions: pd.DataFrame,
    image_cache: Any,
    labels: pd.DataFrame,
    splits: pd.DataFrame,
) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """Check that one model's checkpoint, history and predictions come from one training,
    on the current image cache, labels and split; return (lineage record, predictions,
    history). Every downstream node reads the returned (verified) tables, so nothing is
    computed from a mix.

    Why: each of these is loaded as "the latest version" independently. A training run that
    died after saving its checkpoint but before `predict`, or a data_processing rerun with new
    labels, would otherwise make a report that pairs one run's predictions with another run's
    weights, or a phantom's predictions with NIH labels — silently.
    """
    from rare_cxr.pipelines.training.nodes import LINEAGE_COLUMNS, cache_fingerprint_text

    meta = checkpoint.get("metadata", {})
    model = str(meta.get("model_spec", {}).get("name", "model"))
    rerun = (
        f"re-predict from the latest checkpoint with `kedro run --pipelines all_models --nodes "
        f"{model}.predict`, or retrain with `kedro run --pipelines all_models --namespaces "
        f"{model}`"
    )
    missing = [c for c in LINEAGE_COLUMNS if c not in predictions.columns]
    if missing:
        raise LineageError(
            f"{model}.predictions lack the lineage column(s) {missing} (written by an older "
            f"rare-cxr), so they cannot be matched to a checkpoint: {rerun}"
        )

    def single(column: str) -> str:
        values = sorted(predictions[column].astype(str).unique())
        if len(values) != 1:
            raise LineageError(f"{model}.predictions mix several {column}s: {values}; {rerun}")
        return values[0]

    checkpoint_version = str(meta.get("checkpoint_version"))
    if single("checkpoint_version") != checkpoint_version:
        raise LineageError(
            f"{model}.predictions were computed from checkpoint version "
            f"{single('checkpoint_version')}, but the {model}.checkpoint loaded here is version "
            f"{checkpoint_version} (a later training whose predict step did not run?). Either "
            f"{rerun}, or report the older pair with `--load-versions "
            f"{model}.checkpoint:{single('checkpoint_version')}`"
        )
    from rare_cxr.pipelines.training.nodes import checkpoint_seeds, seed_training_id

    expected = {str(s): seed_training_id(checkpoint, s) for s in checkpoint_seeds(checkpoint)}
    training_id = expected[str(checkpoint_seeds(checkpoint)[0])]
    found = _training_ids(predictions, expected)
    if found != expected:
        raise LineageError(
            f"{model}.predictions come from training(s) {found}, the checkpoint from "
            f"{expected} (seed: training id); {rerun}"
        )
    history_ids = (
        _training_ids(history, expected)
        if "training_id" in history.columns
        else "(none: an older history file)"
    )
    if history_ids != expected:
        raise LineageError(
            f"{model}.history belongs to training {history_ids}, the checkpoint to training "
            f"{expected} (the run stopped between saving the two?); retrain with `kedro run "
            f"--pipelines all_models --namespaces {model}` (a finished training is reused, "
            "not repeated)"
        )
    current_cache = cache_fingerprint_text(image_cache)
    if single("image_cache_fingerprint") != current_cache:
        raise LineageError(
            f"{model}.predictions were made from image cache {single('image_cache_fingerprint')}"
            f", but the image cache is now {current_cache}: the images, labels or split changed "
            f"since this model was trained. Retrain it (`kedro run --pipelines all_models "
            f"--namespaces {model}`) or rebuild the old cache"
        )
    truth = labels.assign(image_id=labels["image_id"].astype(str)).set_index("image_id")
    assigned = splits.assign(image_id=splits["image_id"].astype(str)).set_index("image_id")
    for name in ("val", "test"):
        if name not in image_cache.split_names:
            continue
        table = image_cache.split(name).table.assign(image_id=lambda t: t["image_id"].astype(str))
        ids = table["image_id"]
        unknown = ids[~ids.isin(truth.index)]
        if len(unknown):
            raise LineageError(
                f"labels lack {len(unknown)} {name} image(s) of the image cache (e.g. "
                f"{unknown.head(3).tolist()}): labels come from another dataset than the cache; "
                "rerun `kedro run --pipelines data_processing,augmentation` and retrain"
            )
        differ = truth.loc[ids, list(FINDINGS)].to_numpy() != table[list(FINDINGS)].to_numpy()
        changed = ids[differ.any(axis=1)]
        if len(changed):
            raise LineageError(
                f"labels differ from those the image cache (and {model}) used for "
                f"{len(changed)} {name} image(s), e.g. {changed.head(3).tolist()}: the label "
                "file changed after the cache was built. Rerun `kedro run --pipelines "
                "augmentation` and retrain"
            )
        current = assigned["split"].reindex(ids).astype(str).to_numpy()
        moved = ids[current != name]
        if len(moved):
            raise LineageError(
                f"the current splits put {len(moved)} image(s) of the cache's {name} split "
                f"elsewhere (e.g. {moved.head(3).tolist()}): the split changed after the cache "
                "was built. Rerun `kedro run --pipelines augmentation` and retrain"
            )
    record = {
        "model": model,
        "checkpoint_version": checkpoint_version,
        "training_id": training_id,
        "seeds": {seed: tid for seed, tid in expected.items()},
        "image_cache_fingerprint": current_cache,
        "best_epoch": meta.get("epoch"),
        "prediction_rows": int(len(predictions)),
        "checked": [
            "predictions <- checkpoint version",
            "predictions, history <- training id",
            "predictions <- current image cache",
            "image cache labels == labels",
            "image cache splits == splits",
        ],
    }
    logger.info(
        "%s: lineage verified (checkpoint %s, training %s)", model, checkpoint_version, training_id
    )
    return record, predictions, history


# --- per model (inside the model's namespace) ------------------------------------------------


def _training_ids(table: pd.DataFrame, expected: Mapping[str, str]) -> dict[str, Any]:
    """{seed: training id} found in a predictions/history table (one seed if no seed column);
    a seed with several ids maps to their sorted list, so it can never equal `expected`."""
    if "seed" not in table.columns:
        seeds = [next(iter(expected))] if expected else ["?"]
        groups = {seeds[0]: table["training_id"]}
    else:
        groups = {str(int(s)): part["training_id"] for s, part in table.groupby("seed", sort=False)}
    out: dict[str, Any] = {}
    for seed, ids in groups.items():
        values = sorted(ids.astype(str).unique())
        out[seed] = values[0] if len(values) == 1 else values
    return out


def select_thresholds(
    predictions: pd.DataFrame,
    labels: pd.DataFrame,
    lineage: Mapping[str, Any],
    reporting: Mapping[str, Any],
) -> dict[str, Any]:
    """Decision thresholds per finding from the validation rows only (with the lineage of the
    predictions they were tuned on)."""
    method = validate_reporting_params(reporting)["threshold_method"]
    seeds = metrics.prediction_seeds(predictions)
    per_seed = {
        str(seed): metrics.select_thresholds(predictions, labels, method, seed) for seed in seeds
    }
    thresholds = per_seed[str(seeds[0])]  # the primary seed's: what Grad-CAM and inference use
    undefined = [f for f, t in thresholds.items() if math.isnan(t)]
    if undefined:
        logger.warning(
            "no validation threshold for %s (no positives in val): their threshold "
            "metrics are reported as undefined",
            ", ".join(undefined),
        )
    return metrics.to_jsonable(
        {
            "method": method,
            "split": "val",
            "thresholds": thresholds,
            "per_seed": per_seed,
            "lineage": dict(lineage),
        }
    )


def evaluate_model(
    predictions: pd.DataFrame,
    labels: pd.DataFrame,
    thresholds: Mapping[str, Any],
    reporting: Mapping[str, Any],
) -> dict[str, Any]:
    """Test metrics at the validation thresholds, with patient-bootstrap intervals.

    The top level describes the primary seed (intervals included). With several seeds,
    `per_seed` holds each seed's test macro/paper metrics (at that seed's own validation
    thresholds) and `seed_summary` their mean, sd and count: what Table 1 shows then.
    """
    cfg = validate_reporting_params(reporting)
    seeds = metrics.prediction_seeds(predictions)
    per_seed: dict[str, Any] = {}
    for seed in seeds:
        ts = _seed_thresholds(thresholds, seed)
        _, _, ys, ss = metrics.split_arrays(predictions, labels, "test", seed)
        result = metrics.evaluate_split(ys, ss, ts)
        per_seed[str(seed)] = {k: result[k] for k in ("macro", "paper", "subset_accuracy")}
    t = _seed_thresholds(thresholds, seeds[0])
    _, patients, y, s = metrics.split_arrays(predictions, labels, "test")
    if len(y) == 0:
        raise ValueError("predictions: no 'test' rows; the report is computed on test")
    test = metrics.evaluate_split(y, s, t)
    _, _, yv, sv = metrics.split_arrays(predictions, labels, "val")
    val = metrics.evaluate_split(yv, sv, t)
    intervals = bootstrap.bootstrap_intervals(
        y, s, np.array([t[f] for f in FINDINGS]), patients, **cfg["bootstrap"]
    )
    return metrics.to_jsonable(
        {
            "threshold_method": thresholds.get("method"),
            "lineage": thresholds.get("lineage"),
            "n_test_patients": int(pd.Series(patients).nunique()),
            "test": test,
            "val": {
                "note": "thresholds were tuned on this split: optimistic, for reference only",
                **{k: val[k] for k in ("n_images", "macro", "paper")},
            },
            "intervals": intervals,
            "seeds": seeds,
            "per_seed": per_seed,
            "seed_summary": _seed_summary(per_seed),
        }
    )


def _seed_thresholds(thresholds: Mapping[str, Any], seed: int | None) -> dict[str, float]:
    chosen = (thresholds.get("per_seed") or {}).get(str(seed)) or thresholds["thresholds"]
    return {f: metrics.from_json_number(chosen.get(f)) for f in FINDINGS}


def _seed_summary(per_seed: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Mean, sample sd and count over seeds of each macro metric (NaN seeds left out)."""
    keys = ("auroc", "auprc", "precision", "recall", "f1", "specificity", "accuracy")
    out = {}
    for key in keys:
        values = np.array([float(p["macro"][key]) for p in per_seed.values()], dtype=float)
        values = values[np.isfinite(values)]
        out[key] = {
            "mean": float(values.mean()) if len(values) else math.nan,
            "sd": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
            "n": int(len(values)),
        }
    return out


def _load_model(checkpoint: Mapping[str, Any]) -> torch.nn.Module:
    from rare_cxr.pipelines.training.nodes import load_checkpoint_model

    return load_checkpoint_model(checkpoint).eval()


def measure_cost(
    checkpoint: Mapping[str, Any], lineage: Mapping[str, Any], reporting: Mapping[str, Any]
) -> dict[str, Any]:
    """Parameters, GFLOPs/image at the input size, measured img/s; plus the checkpoint's card
    (which names the verified checkpoint version)."""
    cfg = validate_reporting_params(reporting)["cost"]
    model = _load_model(checkpoint)
    meta = checkpoint.get("metadata", {})
    size = int(meta.get("input_size") or max(getattr(model, "scales", [224])))
    with torch.no_grad():
        block = cost.model_cost(model, size, **cfg)
    card = {
        k: meta.get(k)
        for k in (
            "model_spec",
            "train_params",
            "epoch",
            "metric",
            "metric_name",
            "scales",
            "checkpoint_version",
            "training_id",
        )
    }
    if card["checkpoint_version"] != lineage.get("checkpoint_version"):
        raise LineageError(
            f"measure_cost got checkpoint {card['checkpoint_version']} but the lineage check "
            f"verified {lineage.get('checkpoint_version')}"
        )
    return metrics.to_jsonable({**block, "checkpoint": card})


def _bbox_table(raw_bbox_list: str | None) -> pd.DataFrame:
    """`BBox_List_2017.csv` text -> image_id, finding (canonical), x, y, w, h (original px).

    Empty text (the optional file is absent) gives an empty table: no boxes are drawn."""
    if not raw_bbox_list or not raw_bbox_list.strip():
        return pd.DataFrame(columns=["image_id", "finding", "x", "y", "w", "h"])
    raw = pd.read_csv(io.StringIO(raw_bbox_list), header=None, skiprows=1, usecols=range(6))
    raw.columns = ["image_id", "finding", "x", "y", "w", "h"]
    raw["finding"] = raw["finding"].map(lambda n: FINDINGS[finding_index(str(n).strip())])
    return raw


def gradcam_examples(
    *,
    checkpoint: Mapping[str, Any],
    predictions: pd.DataFrame,
    thresholds: Mapping[str, Any],
    labels: pd.DataFrame,
    image_cache: Any,
    image_index: pd.DataFrame,
    raw_bbox_list: str,
    rare_findings: Mapping[str, Any],
    reporting: Mapping[str, Any],
) -> Any:
    """Grad-CAM figure for the best-scored test true positives of each rare finding.

    One map per `cam_layers()` entry (one per scale for the multi-scale model), overlaid on the
    cached radiograph; the BBox_List box (rescaled from the original image size) when one exists.
    """
    cfg = validate_reporting_params(reporting)["gradcam"]
    model = _load_model(checkpoint).to(cfg["device"])
    test = image_cache.split("test")
    position = {str(i): k for k, i in enumerate(test.table["image_id"].astype(str))}
    truth = labels.set_index(labels["image_id"].astype(str))
    preds = metrics.seed_rows(predictions)  # the primary seed's model is the one loaded
    preds = preds[preds["split"].astype(str) == "test"].copy()
    preds["image_id"] = preds["image_id"].astype(str)
    boxes = _bbox_table(raw_bbox_list)
    sizes = image_index.set_index(image_index["image_id"].astype(str))
    rows = []
    for finding in rare_findings["findings"]:
        t = metrics.from_json_number(thresholds["thresholds"].get(finding))
        if math.isnan(t):
            continue
        positive = truth.loc[preds["image_id"], finding].to_numpy() == 1
        hits = preds[positive & (preds[finding].to_numpy() >= t)]
        hits = hits[hits["image_id"].isin(position)].nlargest(
            int(cfg["examples_per_finding"]), finding
        )
        for _, hit in hits.iterrows():
            k = position[hit["image_id"]]
            img = np.asarray(test.images[k])
            x = torch.from_numpy(img.astype(np.float32) / 255.0)[None, None].to(cfg["device"])
            maps = cam.grad_cam(model, x, FINDINGS.index(finding))
            box = None
            b = boxes[(boxes["image_id"] == hit["image_id"]) & (boxes["finding"] == finding)]
            if len(b) and hit["image_id"] in sizes.index:
                scale_x = img.shape[1] / float(sizes.loc[hit["image_id"], "width"])
                scale_y = img.shape[0] / float(sizes.loc[hit["image_id"], "height"])
                r = b.iloc[0]
                box = (r["x"] * scale_x, r["y"] * scale_y, r["w"] * scale_x, r["h"] * scale_y)
            rows.append(
                {
                    "image": img,
                    "maps": {n: m[0].cpu().numpy() for n, m in maps.items()},
                    "box": box,
                    "title": f"{finding} p={hit[finding]:.2f} (t={t:.2f})\n{hit['image_id']}",
                }
            )
    name = str(checkpoint.get("metadata", {}).get("model_spec", {}).get("name", "model"))
    return figures.gradcam_panel(name, rows)


# --- combined (every model) -------------------------------------------------------------------


def combine_metrics(**inputs: Any) -> dict[str, Any]:
    """`{model: {"metrics": ..., "cost": ...}}` from inputs named `<model>__metrics|cost`."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in inputs.items():
        model, kind = key.rsplit("__", 1)
        out.setdefault(model, {})[kind] = value
    return out


def _fmt(value: Any, ci: Any = None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = f"{value:.{digits}f}"
    if ci and ci[0] is not None and ci[1] is not None:
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text


TABLE1_COLUMNS = {
    "ACC": "accuracy",
    "Recall": "recall",
    "Precision": "precision",
    "F1": "f1",
    "Specificity": "specificity",
    "Balanced ACC": "balanced_accuracy",
    "AUROC": "auroc",
    "AUPRC": "auprc",
}


def _mean_sd(summary: Mapping[str, Any] | None) -> str:
    if not summary or summary.get("mean") is None or math.isnan(float(summary["mean"])):
        return "n/a"
    sd = summary.get("sd")
    sd_text = "n/a" if sd is None or math.isnan(float(sd)) else f"{float(sd):.3f}"
    return f"{float(summary['mean']):.3f} ± {sd_text}"


def build_table1(all_metrics: Mapping[str, Any]) -> tuple[pd.DataFrame, str]:
    """The paper's Table 1, extended: macro metrics, params, GFLOPs, img/s.

    One seed: each cell is the test value with its 95% patient-bootstrap interval. Several
    seeds: mean ± sd over the seeds (each at its own validation thresholds); the intervals of
    the primary seed stay in metrics.json. `Precision 0-filled` counts the findings that occur
    in test but were never predicted: their precision is counted as 0 in the macro mean.
    """
    rows = []
    for model, both in all_metrics.items():
        m, c = both["metrics"], both.get("cost", {})
        macro, ci = m["test"]["macro"], m["intervals"]["macro"]
        seeds = list(m.get("seeds") or [None])
        row: dict[str, Any] = {"Model": model, "Seeds": len(seeds)}
        for col, key in TABLE1_COLUMNS.items():
            if len(seeds) > 1:
                row[col] = _mean_sd((m.get("seed_summary") or {}).get(key))
            else:
                row[col] = _fmt(macro.get(key), ci.get(key))
        row["Precision 0-filled"] = int(macro.get("precision_zero_filled") or 0)
        row["Subset ACC"] = _fmt(m["test"]["subset_accuracy"], m["intervals"]["subset_accuracy"])
        row["All-negative ACC"] = _fmt(m["test"]["all_negative"]["accuracy"])
        row["params"] = f"{c.get('params', 0) / 1e6:.2f}M" if c.get("params") else "n/a"
        row["GFLOPs"] = _fmt(c.get("gflops"), digits=2)
        row["img/s"] = _fmt(c.get("img_per_s"), digits=1)
        rows.append(row)
    table = pd.DataFrame(rows)
    return table, dataframe_to_markdown(table)


def dataframe_to_markdown(df: pd.DataFrame) -> str:
    """GitHub-flavoured Markdown table (no `tabulate` dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def build_per_finding_auroc(all_metrics: Mapping[str, Any]) -> pd.DataFrame:
    """Models x findings test AUROC (CheXNet layout); empty cell = undefined."""
    rows = []
    for model, both in all_metrics.items():
        per = both["metrics"]["test"]["per_finding"]
        rows.append(
            {
                "Model": model,
                **{f: per[f]["auroc"] for f in FINDINGS},
                "Macro": both["metrics"]["test"]["macro"]["auroc"],
            }
        )
    return pd.DataFrame(rows)


def build_rare_findings_table(
    all_metrics: Mapping[str, Any], rare_findings: Mapping[str, Any]
) -> pd.DataFrame:
    """Rare block: AUROC/AUPRC/F1 with intervals per rare finding and model."""
    rows = []
    for finding in rare_findings["findings"]:
        for model, both in all_metrics.items():
            per = both["metrics"]["test"]["per_finding"][finding]
            ci = both["metrics"]["intervals"]["per_finding"][finding]
            rows.append(
                {
                    "Finding": finding,
                    "Model": model,
                    "train prevalence": _fmt(
                        rare_findings["train_prevalence"].get(finding), digits=4
                    ),
                    "test positives": per["positives"],
                    "AUROC": _fmt(per["auroc"], ci["auroc"]),
                    "AUPRC": _fmt(per["auprc"], ci["auprc"]),
                    "F1": _fmt(per["f1"], ci["f1"]),
                }
            )
    return pd.DataFrame(rows)


def _test_arrays(labels: pd.DataFrame, predictions: Mapping[str, pd.DataFrame]):
    """Common test labels and per-model scores, aligned on the first model's image order."""
    scores, y, reference = {}, None, None
    for model, p in predictions.items():
        ids, _, yy, s = metrics.split_arrays(p, labels, "test")
        order = np.argsort(ids, kind="mergesort")
        if y is None:
            y, reference = yy[order], ids[order]
        elif not np.array_equal(ids[order], reference):
            raise ValueError(
                f"{model}.predictions: test images differ from the other models'; "
                "curves must compare models on the same images (same image cache)"
            )
        scores[model] = s[order]
    return (y if y is not None else np.zeros((0, len(FINDINGS)))), scores


def plot_validation_curves(**histories: pd.DataFrame) -> Any:
    """Figure 2: validation ACC and AUROC per epoch, all models."""
    return figures.validation_curves(histories)


def plot_training_loss(**histories: pd.DataFrame) -> Any:
    """Training/validation loss per epoch, all models."""
    return figures.training_loss_curves(histories)


def plot_roc_curves(labels: pd.DataFrame, **predictions: pd.DataFrame) -> Any:
    """ROC per finding with every model overlaid."""
    return figures.roc_curves(*_test_arrays(labels, predictions))


def plot_pr_curves(labels: pd.DataFrame, **predictions: pd.DataFrame) -> Any:
    """Precision-recall per finding with every model overlaid."""
    return figures.pr_curves(*_test_arrays(labels, predictions))


def plot_reliability(
    labels: pd.DataFrame, reporting: Mapping[str, Any], **predictions: pd.DataFrame
) -> Any:
    """Reliability diagram (calibration), all models."""
    bins = validate_reporting_params(reporting)["reliability_bins"]
    y, scores = _test_arrays(labels, predictions)
    return figures.reliability_diagram(y, scores, bins)


def plot_auroc_intervals(all_metrics: Mapping[str, Any]) -> Any:
    """Per-finding AUROC with bootstrap interval bars."""
    return figures.auroc_intervals({m: b["metrics"] for m, b in all_metrics.items()})


FIGURE_CAPTIONS = {
    "figure2_validation_curves": "Figure 2 — validation ACC and AUROC per epoch",
    "training_loss_curves": "Training and validation loss",
    "per_finding_auroc_figure": "Per-finding test AUROC with 95% intervals",
    "roc_curves": "ROC curves per finding (test)",
    "pr_curves": "Precision-recall curves per finding (test)",
    "reliability_diagram": "Reliability diagram (test)",
}


def render_report(
    *,
    all_metrics: Mapping[str, Any],
    table1: pd.DataFrame,
    per_finding_auroc: pd.DataFrame,
    rare_findings_table: pd.DataFrame,
    rare_findings: Mapping[str, Any],
    data_summary: Mapping[str, Any],
    reporting: Mapping[str, Any],
    **pngs: bytes,
) -> str:
    """report.html: tables, every saved figure (PNG bytes of this run), definitions, data, params.

    `pngs` are keyword inputs named after the figure datasets; Grad-CAM ones are
    `<model>__gradcam`.
    """
    cfg = validate_reporting_params(reporting)
    figs: dict[str, tuple[str, bytes]] = {}
    for key, png in pngs.items():
        if key.endswith("__gradcam"):
            figs[key] = (f"Grad-CAM — {key.rsplit('__', 1)[0]}", png)
        else:
            figs[key] = (FIGURE_CAPTIONS.get(key, key), png)
    first = next(iter(all_metrics.values()), None)
    all_negative = (
        {
            "ACC": first["metrics"]["test"]["all_negative"]["accuracy"],
            "subset ACC": first["metrics"]["test"]["all_negative"]["subset_accuracy"],
        }
        if first
        else {}
    )
    undefined = {m: b["metrics"]["test"]["undefined"] for m, b in all_metrics.items()}
    lineage = {m: b["metrics"].get("lineage") or {} for m, b in all_metrics.items()}
    params = {
        "reporting": cfg,
        "models": {m: b.get("cost", {}).get("checkpoint", {}) for m, b in all_metrics.items()},
    }
    return report_html.render_report(
        title=cfg["title"],
        table1=table1,
        all_negative=all_negative,
        per_finding_auroc=per_finding_auroc.round(3),
        rare_table=rare_findings_table,
        rare_findings=rare_findings,
        data_summary=data_summary,
        figures=figs,
        undefined=undefined,
        params=params,
        lineage=lineage,
    )
