"""Reporting nodes: thin, named wrappers around `rare_cxr.evaluation`.

Per-model nodes run inside the model's namespace (they see `predictions`, `checkpoint`, ...
of that model only); combined nodes receive every model's output as keyword arguments named by
the model, so a table row is always labelled by the namespace that produced it.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from rare_cxr.evaluation import (
    bootstrap,
    cam,
    cost,
    expert,
    figures,
    localisation,
    longtail,
    metrics,
    paired,
    report_html,
    subgroups,
)
from rare_cxr.findings import FINDINGS, finding_index
from rare_cxr.pipelines.reporting.params import ReportingParams, validate_reporting_params
from rare_cxr.pipelines.reporting.test_arrays import (
    _seed_arrays,
    _seed_thresholds,
    _test_arrays,
    _test_table,
)
from rare_cxr.progress import progress

logger = logging.getLogger(__name__)


# --- shared, once per run -------------------------------------------------------------------


def select_rare_findings(
    labels: pd.DataFrame, splits: pd.DataFrame, reporting: ReportingParams
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
    reporting: ReportingParams,
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
    reporting: ReportingParams,
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
    reporting: ReportingParams,
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
        _, ps, ys, ss = metrics.split_arrays(predictions, labels, "test", seed)
        result = metrics.evaluate_split(ys, ss, ts, ps)
        per_seed[str(seed)] = {k: result[k] for k in ("macro", "paper", "subset_accuracy")}
    t = _seed_thresholds(thresholds, seeds[0])
    _, patients, y, s = metrics.split_arrays(predictions, labels, "test")
    if len(y) == 0:
        raise ValueError("predictions: no 'test' rows; the report is computed on test")
    test = metrics.evaluate_split(y, s, t, patients)
    _, _, yv, sv = metrics.split_arrays(predictions, labels, "val")
    val = metrics.evaluate_split(yv, sv, t)
    model = str((thresholds.get("lineage") or {}).get("model", "model"))
    intervals = bootstrap.bootstrap_intervals(
        y,
        s,
        np.array([t[f] for f in FINDINGS]),
        patients,
        **cfg["bootstrap"],
        min_positive_patients=cfg["min_positives"],
        proportion_method=cfg["proportion_interval"],
        progress_desc=f"{model} bootstrap",
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


def _seed_summary(per_seed: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Mean, sample sd and count over seeds of each macro metric (NaN seeds left out)."""
    out = {}
    for key in bootstrap.METRICS:  # the same macro metrics the intervals cover
        values = np.array([float(p["macro"][key]) for p in per_seed.values()], dtype=float)
        values = values[np.isfinite(values)]
        out[key] = {
            "mean": float(values.mean()) if len(values) else math.nan,
            "sd": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
            "n": int(len(values)),
        }
    return out


def long_tail_metrics(
    predictions: pd.DataFrame,
    labels: pd.DataFrame,
    splits: pd.DataFrame,
    thresholds: Mapping[str, Any],
    reporting: ReportingParams,
) -> dict[str, Any]:
    """NIH-CXR-LT's view of one model: head/medium/tail groups by training prevalence (with
    patient-bootstrap intervals of the group means), balanced accuracy, specificity and
    sensitivity at fixed specificities per finding, and a reliability flag per finding."""
    cfg = validate_reporting_params(reporting)
    lt = cfg["long_tail"]
    train_ids = set(splits.loc[splits["split"].astype(str) == "train", "image_id"].astype(str))
    train = labels[labels["image_id"].astype(str).isin(train_ids)]
    n_train = max(len(train), 1)
    train_positives = {f: int(train[f].sum()) for f in FINDINGS}
    # prevalence cut-offs as counts: count >= ceil(p * n)  <=>  count / n >= p for integers
    head_min = math.ceil(lt["head_min"] * n_train)
    tail_max = min(math.ceil(lt["tail_max"] * n_train), head_min - 1)
    _, patients, y, s = _test_table(predictions, labels)
    t = _seed_thresholds(thresholds, None)
    per_finding, groups = longtail.long_tail_tables(
        y,
        s,
        t,
        train_positives,
        patients,
        head_min=head_min,
        tail_max=max(tail_max, 0),
        min_positives=cfg["min_positives"],
        specificities=lt["specificities"],
        **cfg["bootstrap"],
    )
    return metrics.to_jsonable(
        {
            "cutoffs": {
                "head_min_prevalence": lt["head_min"],
                "tail_max_prevalence": lt["tail_max"],
                "train_images": n_train,
            },
            "per_finding": per_finding.to_dict(orient="records"),
            "groups": groups.to_dict(orient="records"),
        }
    )


def subgroup_metrics(
    predictions: pd.DataFrame, labels: pd.DataFrame, reporting: ReportingParams
) -> dict[str, Any]:
    """AUROC per finding and macro by sex, view and age band, with patient-bootstrap intervals
    computed within each subgroup (test split, primary seed)."""
    cfg = validate_reporting_params(reporting)
    ids, _, y, s = _test_table(predictions, labels)
    meta = labels.assign(image_id=labels["image_id"].astype(str)).set_index("image_id")
    meta = meta.loc[ids, ["sex", "age", "view", "patient_id"]].reset_index(drop=True)
    table = subgroups.subgroup_aurocs(
        y, s, meta, age_edges=cfg["subgroups"]["age_edges"], **cfg["bootstrap"]
    )
    return metrics.to_jsonable({"rows": table.to_dict(orient="records")})


def expert_label_metrics(
    predictions: pd.DataFrame,
    labels: pd.DataFrame,
    raw_expert_labels: str,
    reporting: ReportingParams,
) -> dict[str, Any]:
    """AUROC against NIH's text-mined labels and against the Google 2019 expert labels, on the
    same test images, with patient-bootstrap intervals (primary seed). The mapping of the 14
    findings to the experts' 4 is `rare_cxr.evaluation.expert.NIH_SOURCES`. Without the
    (optional) expert file: no rows, and the reason."""
    cfg = validate_reporting_params(reporting)
    if not raw_expert_labels or not raw_expert_labels.strip():
        return {"rows": [], "note": "no expert-label file in the data root (it is optional)"}
    table = expert.expert_comparison(
        metrics.seed_rows(predictions[predictions["split"].astype(str) == "test"]),
        labels,
        expert.parse_expert_labels(raw_expert_labels),
        **cfg["bootstrap"],
    )
    return metrics.to_jsonable({"rows": table.to_dict(orient="records"), "note": ""})


def localisation_metrics(
    *,
    checkpoint: Mapping[str, Any],
    predictions: pd.DataFrame,
    labels: pd.DataFrame,
    image_cache: Any,
    image_index: pd.DataFrame,
    raw_bbox_list: str,
    reporting: ReportingParams,
) -> dict[str, Any]:
    """Grad-CAM on EVERY boxed test image (NIH's BBox_List, or the phantom's boxes), per box
    finding and per CAM layer (one per scale for the multi-scale model): is the map's maximum
    inside the box (pointing game), and which share of its energy lies inside. Records, one
    per (image, box, layer); `build_localisation_table` adds patient-bootstrap intervals."""
    cfg = validate_reporting_params(reporting)
    boxes = _bbox_table(raw_bbox_list)
    name = str(checkpoint.get("metadata", {}).get("model_spec", {}).get("name", "model"))
    if boxes.empty:
        return {"records": [], "note": "no bounding boxes (BBox_List_2017.csv absent)"}
    test = image_cache.split("test")
    position = {i: k for k, i in enumerate(test.table["image_id"].astype(str))}
    sizes = image_index.set_index(image_index["image_id"].astype(str))
    boxes = boxes[boxes["image_id"].astype(str).isin(position)]
    device = _device(cfg["gradcam"]["device"])
    model = _load_model(checkpoint).to(device)
    patient_of = dict(
        zip(test.table["image_id"].astype(str), test.table["patient_id"], strict=True)
    )
    records = []
    with progress(total=len(boxes), desc=f"{name} localisation Grad-CAM", unit="box") as bar:
        for finding, part in boxes.groupby("finding", sort=True):
            rows = list(part.itertuples(index=False))
            for start in range(0, len(rows), 16):  # batched Grad-CAM, one finding at a time
                chunk = rows[start : start + 16]
                images = np.stack(
                    [np.asarray(test.images[position[str(r.image_id)]]) for r in chunk]
                )
                x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None].to(device)
                maps = cam.grad_cam(model, x, FINDINGS.index(str(finding)))
                for k, r in enumerate(chunk):
                    width = float(sizes.loc[str(r.image_id), "width"])
                    height = float(sizes.loc[str(r.image_id), "height"])
                    box = localisation.rescale_box(
                        (r.x, r.y, r.w, r.h), (width, height), images.shape[1:]
                    )
                    for layer, m in maps.items():
                        heat = m[k].detach().cpu().numpy()
                        records.append(
                            {
                                "model": name,
                                "layer": layer,
                                "finding": str(finding),
                                "image_id": str(r.image_id),
                                "patient_id": patient_of[str(r.image_id)],
                                "hit": localisation.pointing_hit(heat, box),
                                "energy": localisation.energy_in_box(heat, box),
                            }
                        )
                bar.update(len(chunk))
    return metrics.to_jsonable({"records": records, "note": ""})


def _device(name: str) -> str:
    """`auto` = cuda when available, else cpu (Grad-CAM over every boxed image and the cost
    measurement of a study want the GPU it trained on; conf/nih uses auto)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _load_model(checkpoint: Mapping[str, Any]) -> torch.nn.Module:
    from rare_cxr.pipelines.training.nodes import load_checkpoint_model

    return load_checkpoint_model(checkpoint).eval()


def measure_cost(
    checkpoint: Mapping[str, Any], lineage: Mapping[str, Any], reporting: ReportingParams
) -> dict[str, Any]:
    """Parameters, GFLOPs/image at the input size, measured img/s; plus the checkpoint's card
    (which names the verified checkpoint version)."""
    cfg = validate_reporting_params(reporting)["cost"]
    cfg = {**cfg, "device": _device(cfg["device"])}
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
            "pos_weight",  # the class weights trained with (the report shows the cap's effect)
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
    # image ids and names as written (`NA` or `0001` must not become missing or a number)
    raw = pd.read_csv(
        io.StringIO(raw_bbox_list),
        header=None,
        skiprows=1,
        usecols=range(6),
        dtype={0: str, 1: str},
        keep_default_na=False,
    )
    raw.columns = ["image_id", "finding", "x", "y", "w", "h"]
    for column in ("x", "y", "w", "h"):
        raw[column] = pd.to_numeric(raw[column], errors="coerce")
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
    reporting: ReportingParams,
) -> Any:
    """Grad-CAM figure for the best-scored test true positives of each rare finding.

    One map per `cam_layers()` entry (one per scale for the multi-scale model), overlaid on the
    cached radiograph; the BBox_List box (rescaled from the original image size) when one exists.
    """
    cfg = validate_reporting_params(reporting)["gradcam"]
    model_device = _device(cfg["device"])
    model = _load_model(checkpoint).to(model_device)
    test = image_cache.split("test")
    position = {str(i): k for k, i in enumerate(test.table["image_id"].astype(str))}
    truth = labels.set_index(labels["image_id"].astype(str))
    preds = metrics.seed_rows(predictions)  # the primary seed's model is the one loaded
    preds = preds[preds["split"].astype(str) == "test"].copy()
    preds["image_id"] = preds["image_id"].astype(str)
    boxes = _bbox_table(raw_bbox_list)
    sizes = image_index.set_index(image_index["image_id"].astype(str))
    name = str(checkpoint.get("metadata", {}).get("model_spec", {}).get("name", "model"))
    selected = []  # (finding, threshold, prediction row), chosen before any Grad-CAM runs
    for finding in rare_findings["findings"]:
        t = metrics.from_json_number(thresholds["thresholds"].get(finding))
        if math.isnan(t):
            continue
        positive = truth.loc[preds["image_id"], finding].to_numpy() == 1
        hits = preds[positive & (preds[finding].to_numpy() >= t)]
        hits = hits[hits["image_id"].isin(position)].nlargest(
            int(cfg["examples_per_finding"]), finding
        )
        selected += [(finding, t, hit) for _, hit in hits.iterrows()]
    rows = []
    with progress(total=len(selected), desc=f"{name} Grad-CAM examples", unit="img") as bar:
        for finding, t, hit in selected:
            k = position[hit["image_id"]]
            img = np.asarray(test.images[k])
            x = torch.from_numpy(img.astype(np.float32) / 255.0)[None, None].to(model_device)
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
            bar.update()
    return figures.gradcam_panel(name, rows)


def build_model_bundle(
    *,
    checkpoint: Mapping[str, Any],
    lineage: Mapping[str, Any],
    thresholds: Mapping[str, Any],
    metrics: Mapping[str, Any],
    long_tail: Mapping[str, Any],
    subgroups: Mapping[str, Any],
    data_summary: Mapping[str, Any],
    rare_findings: Mapping[str, Any],
    reporting: ReportingParams,
    calibration: Mapping[str, Any] | None = None,
    underdiagnosis: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], str]:
    """The model bundle (weights, spec, validation thresholds and temperatures, data summary,
    metrics) and its
    model card (Markdown): what `kedro run --pipelines inference` and a reader of the model
    need, from the outputs `verify_lineage` checked belong together (rare_cxr.inference)."""
    from rare_cxr.inference.bundle import make_bundle
    from rare_cxr.inference.model_card import card_markdown

    version = checkpoint.get("metadata", {}).get("checkpoint_version")
    if version != lineage.get("checkpoint_version"):
        raise LineageError(
            f"build_model_bundle got checkpoint {version} but the lineage check verified "
            f"{lineage.get('checkpoint_version')}"
        )
    bundle = make_bundle(
        checkpoint=checkpoint,
        thresholds=thresholds,
        metrics=metrics,
        data_summary=data_summary,
        lineage=lineage,
        rare_findings=rare_findings,
        long_tail=long_tail,
        subgroups=subgroups,
        reporting=validate_reporting_params(reporting),
        calibration=calibration,
        underdiagnosis=underdiagnosis,
    )
    return bundle, card_markdown(bundle["metadata"])


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
    seeds: mean ± sd over the seeds (each at its own validation thresholds) -- the sd is
    TRAINING variation only (the same test set for every seed; the test-sampling error is not
    in it); the intervals of the primary seed stay in metrics.json. `Uncertainty` says which
    of the two a row shows. `Precision 0-filled` counts the findings that occur in test but
    were never predicted: their precision is counted as 0 in the macro mean. `Resamples
    dropped` (one seed): the most bootstrap resamples any of the row's macro intervals lost
    because they drew no positive patient of a finding in the macro's fixed set (see
    `bootstrap.fixed_set_mean`), out of the resamples drawn.
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
        row["img/s on"] = c.get("device", "cpu")  # measured there only
        # additive columns (issue 18): what the ± or [ ] of this row means, and the macro
        # resamples dropped
        row["Uncertainty"] = (
            f"mean ± sd over {len(seeds)} seeds: training variation only"
            if len(seeds) > 1
            else "95% patient-bootstrap interval"
        )
        dropped = m["intervals"].get("macro_resamples_dropped") or {}
        shown = [int(dropped[k]) for k in TABLE1_COLUMNS.values() if k in dropped]
        row["Resamples dropped"] = (
            f"{max(shown)} of {m['intervals']['n_resamples']}"
            if shown and len(seeds) == 1
            else "n/a"
        )
        rows.append(row)
    table = pd.DataFrame(rows)
    return table, dataframe_to_markdown(table)


def dataframe_to_markdown(df: pd.DataFrame) -> str:
    """GitHub-flavoured Markdown table (no `tabulate` dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def build_long_tail_tables(**inputs: Mapping[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(`long_tail.csv`: model x group means with intervals, `long_tail_findings.csv`: model x
    finding: group, balanced accuracy, specificity, sensitivity at fixed specificities,
    reliable) from the per-model inputs named `<model>__long_tail`."""
    groups, findings = [], []
    for key, value in inputs.items():
        model = key.rsplit("__", 1)[0]
        groups += [{"model": model, **row} for row in value["groups"]]
        findings += [{"model": model, **row} for row in value["per_finding"]]
    return pd.DataFrame(groups), pd.DataFrame(findings)


def build_localisation_table(
    reporting: ReportingParams, **inputs: Mapping[str, Any]
) -> pd.DataFrame:
    """`localisation.csv`: model x layer x finding pointing-game hit rate and in-box energy
    share, with patient-bootstrap intervals (inputs named `<model>__localisation`)."""
    cfg = validate_reporting_params(reporting)
    records = [r for value in inputs.values() for r in value["records"]]
    if not records:
        return pd.DataFrame(columns=list(localisation.SUMMARY_COLUMNS))
    return localisation.localisation_summary(pd.DataFrame(records), **cfg["bootstrap"])


def build_expert_table(**inputs: Mapping[str, Any]) -> pd.DataFrame:
    """`expert_labels.csv`: model x expert finding, AUROC against NIH's labels and against the
    experts' on the same images (inputs named `<model>__expert_labels`)."""
    rows = []
    for key, value in inputs.items():
        rows += [{"model": key.rsplit("__", 1)[0], **row} for row in value["rows"]]
    return pd.DataFrame(rows)


def build_subgroup_table(**inputs: Mapping[str, Any]) -> pd.DataFrame:
    """`subgroups.csv`: model x attribute x subgroup x finding AUROC with intervals."""
    rows = []
    for key, value in inputs.items():
        rows += [{"model": key.rsplit("__", 1)[0], **row} for row in value["rows"]]
    return pd.DataFrame(rows)


# paired_comparison.csv: issue 10's columns, then the reliability of each per-finding row,
# then issue 18's additions (paired.ROW_COLUMNS after `method`).
_ROW_BASE = paired.ROW_COLUMNS[2 : paired.ROW_COLUMNS.index("method") + 1]
PAIRED_COLUMNS = (
    "model",
    "reference",
    "seeds",
    *_ROW_BASE,
    "test_positives",
    "test_positive_patients",
    "reliable",
    *paired.ROW_COLUMNS[paired.ROW_COLUMNS.index("method") + 1 :],
)


def _reliable(positive_patients: int, min_positives: int) -> bool:
    """Enough distinct positive patients to read an interval or a p-value: at least
    `reporting.min_positives`, and never fewer than 2 (one patient's clustered variance is 0)."""
    return int(positive_patients) >= max(int(min_positives), 2)


def paired_comparison(
    labels: pd.DataFrame,
    reporting: ReportingParams,
    *,
    pairs: Sequence[tuple[str, str]] = (),
    **inputs: Any,
) -> pd.DataFrame:
    """`paired_comparison.csv`: each model against its reference on the same test patients
    and the same bootstrap resamples, seed by seed (seed s of one with seed s of the other),
    combined over seeds: macro ΔAUROC/ΔAUPRC/ΔF1 by paired patient bootstrap, per-finding
    ΔAUROC by paired DeLong with a Holm correction across findings.

    `pairs` are the (model, reference) comparisons: each model block's `reference`
    (`rare_cxr.models.roster`), among the models reported; the pipeline binds them.
    Inputs are named `<model>__predictions` and `<model>__thresholds`. Why paired: two marginal
    intervals can overlap while the paired difference excludes 0 (and the reverse), because the
    models err on the same hard images; only the paired test answers "is A better than B".
    """
    cfg = validate_reporting_params(reporting)
    preds = {k.rsplit("__", 1)[0]: v for k, v in inputs.items() if k.endswith("__predictions")}
    cuts = {k.rsplit("__", 1)[0]: v for k, v in inputs.items() if k.endswith("__thresholds")}
    frames = []
    absent = sorted({m for pair in pairs for m in pair} - set(preds))
    if absent:
        raise ValueError(
            f"paired comparison: no predictions for {absent} (inputs: {sorted(preds)})"
        )
    for model, reference in pairs:
        seeds_m = metrics.prediction_seeds(preds[model])
        seeds_r = metrics.prediction_seeds(preds[reference])
        common = [s for s in seeds_m if s in seeds_r] if None not in seeds_m + seeds_r else [None]
        if not common:
            logger.warning(
                "paired comparison %s vs %s skipped: no common training seed (%s vs %s)",
                model,
                reference,
                seeds_m,
                seeds_r,
            )
            continue
        ids_m, patients, y, scores_m, t_m = _seed_arrays(preds[model], cuts[model], labels, common)
        ids_r, _, _, scores_r, t_r = _seed_arrays(preds[reference], cuts[reference], labels, common)
        if not np.array_equal(ids_m, ids_r):
            raise ValueError(
                f"{model} and {reference} were tested on different images; a paired "
                "comparison needs the same test patients (same image cache)"
            )
        rows = paired.paired_comparison_rows(
            model,
            reference,
            y,
            scores_m,
            scores_r,
            t_m,
            t_r,
            patients,
            **cfg["bootstrap"],
            progress_desc=f"{model} vs {reference} paired bootstrap",
        )
        rows.insert(2, "seeds", len(common))
        # DeLong's normal approximation with a handful of positive patients prints tiny
        # p-values that mean nothing (2 Hernia films gave p_holm 1e-5 on the phantom): say so
        # on the row, as the rare table's dagger does. The unit is the patient (the test is
        # patient-clustered), and one positive patient leaves its variance undefined, so such
        # a row is never reliable. Holm itself stays over every defined test (conservative).
        films = dict(zip(FINDINGS, y.sum(axis=0).astype(int).tolist(), strict=True))
        people = dict(zip(FINDINGS, metrics.positive_patients(y, patients).tolist(), strict=True))
        rows["test_positives"] = [films.get(f, pd.NA) for f in rows["finding"]]
        rows["test_positive_patients"] = [people.get(f, pd.NA) for f in rows["finding"]]
        rows["reliable"] = [
            f == "macro" or _reliable(people[f], cfg["min_positives"]) for f in rows["finding"]
        ]
        frames.append(rows)
    if not frames:
        return pd.DataFrame(columns=[*PAIRED_COLUMNS])
    return pd.concat(frames, ignore_index=True)[list(PAIRED_COLUMNS)]


def plot_paired_forest(paired_comparison: pd.DataFrame) -> Any:
    """Forest plot of the paired differences (one panel per comparison)."""
    return figures.paired_forest(paired_comparison)


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
    all_metrics: Mapping[str, Any],
    rare_findings: Mapping[str, Any],
    reporting: ReportingParams | None = None,
) -> pd.DataFrame:
    """Rare block: AUROC/AUPRC/F1 (and recall, precision) with intervals per rare finding and
    model; a cell of a finding with fewer than `reporting.min_positives` positive test
    PATIENTS ends in † (unreliable). `interval (recall, precision)` names the interval of the
    two proportions: the patient bootstrap, or Clopper-Pearson/Wilson where it degenerates."""
    min_positives = validate_reporting_params(reporting or {})["min_positives"]
    rows = []
    for finding in rare_findings["findings"]:
        for model, both in all_metrics.items():
            per = both["metrics"]["test"]["per_finding"][finding]
            ci = both["metrics"]["intervals"]["per_finding"][finding]
            how = (both["metrics"]["intervals"].get("per_finding_method") or {}).get(finding, {})
            people = int(per.get("positive_patients", per["positives"]))
            mark = "" if _reliable(people, min_positives) else " †"
            rows.append(
                {
                    "Finding": finding,
                    "Model": model,
                    "train prevalence": _fmt(
                        rare_findings["train_prevalence"].get(finding), digits=4
                    ),
                    "test positives": per["positives"],
                    "test positive patients": people,
                    "AUROC": _fmt(per["auroc"], ci["auroc"]) + mark,
                    "AUPRC": _fmt(per["auprc"], ci["auprc"]) + mark,
                    "F1": _fmt(per["f1"], ci["f1"]) + mark,
                    "Recall": _fmt(per["recall"], ci["recall"]) + mark,
                    "Precision": _fmt(per["precision"], ci["precision"]) + mark,
                    "interval (recall, precision)": ", ".join(
                        dict.fromkeys(how.get(k, "bootstrap") for k in ("recall", "precision"))
                    ),
                }
            )
    return pd.DataFrame(rows)


def _primary_seed(history: pd.DataFrame) -> pd.DataFrame:
    """The history of the primary (first) seed: the curves are one training's epochs."""
    if "seed" not in history.columns or history.empty:
        return history
    return history[history["seed"] == history["seed"].iloc[0]]


def plot_validation_curves(**histories: pd.DataFrame) -> Any:
    """Figure 2: validation ACC and AUROC per epoch, all models (primary seed)."""
    return figures.validation_curves({m: _primary_seed(h) for m, h in histories.items()})


def plot_training_loss(**histories: pd.DataFrame) -> Any:
    """Training/validation loss per epoch, all models (primary seed)."""
    return figures.training_loss_curves({m: _primary_seed(h) for m, h in histories.items()})


def plot_seed_spread(all_metrics: Mapping[str, Any]) -> Any:
    """Each model's test macro AUROC / balanced ACC per training seed."""
    return figures.seed_spread({m: b["metrics"] for m, b in all_metrics.items()})


def plot_roc_curves(labels: pd.DataFrame, **predictions: pd.DataFrame) -> Any:
    """ROC per finding with every model overlaid."""
    return figures.roc_curves(*_test_arrays(labels, predictions))


def plot_pr_curves(labels: pd.DataFrame, **predictions: pd.DataFrame) -> Any:
    """Precision-recall per finding with every model overlaid."""
    return figures.pr_curves(*_test_arrays(labels, predictions))


def plot_reliability(
    labels: pd.DataFrame, reporting: ReportingParams, **predictions: pd.DataFrame
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
    "reliability_diagram": "Reliability diagram (test, all findings pooled)",
    "reliability_rare": "Reliability per rare finding (test): raw (solid) and after the "
    "validation temperature (dashed), in the ECE's bins (reporting.calibration)",
    "seed_spread": "Spread over training seeds (dots) and their mean (bar)",
    "paired_forest": "Paired comparison: Δ (model − reference) with UNADJUSTED 95% intervals; "
    "filled = the interval excludes 0 (no multiplicity correction, for bars and fill alike); "
    "* after a finding = p_holm < 0.05 (Holm across findings); grey, hollow, † = unreliable "
    "(fewer than reporting.min_positives positive test patients)",
}


def render_report(
    *,
    all_metrics: Mapping[str, Any],
    table1: pd.DataFrame,
    per_finding_auroc: pd.DataFrame,
    rare_findings_table: pd.DataFrame,
    rare_findings: Mapping[str, Any],
    data_summary: Mapping[str, Any],
    reporting: ReportingParams,
    paired_comparison: pd.DataFrame | None = None,
    expert_labels: pd.DataFrame | None = None,
    localisation: pd.DataFrame | None = None,
    long_tail: pd.DataFrame | None = None,
    long_tail_findings: pd.DataFrame | None = None,
    subgroups: pd.DataFrame | None = None,
    long_tail_ranking: pd.DataFrame | None = None,
    calibration: pd.DataFrame | None = None,
    underdiagnosis: pd.DataFrame | None = None,
    **pngs: bytes,
) -> str:
    """report.html: tables, every saved figure (PNG bytes of this run), definitions, data, params.

    `pngs` are keyword inputs named after the figure datasets; Grad-CAM ones are
    `<model>__gradcam`. `<model>__model_card` inputs are the model cards (Markdown).
    """
    from rare_cxr.inference.model_card import card_html

    cfg = validate_reporting_params(reporting)
    cards = {
        key.rsplit("__", 1)[0]: card_html(pngs.pop(key))
        for key in [k for k in pngs if k.endswith("__model_card")]
    }
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
        sections=_paired_section(paired_comparison)
        + _analysis_sections(
            long_tail,
            long_tail_findings,
            subgroups,
            cfg["min_positives"],
            extra={
                "long_tail_ranking": long_tail_ranking,
                "calibration": calibration,
                "underdiagnosis": underdiagnosis,
            },
        )
        + _label_and_box_sections(expert_labels, localisation)
        + _class_weight_section(all_metrics, data_summary),
        model_cards=cards,
    )


def _paired_section(table: pd.DataFrame | None) -> list[tuple[str, str, pd.DataFrame]]:
    if table is None or not len(table):
        return []
    return [
        (
            "Paired comparison",
            "Each model minus its reference on the same test patients (paired patient bootstrap "
            "for the macro rows, every resample averaging one fixed set of findings — "
            "resamples_dropped counts those that lost a finding's positives; per finding, the "
            "patient-clustered paired DeLong test of Obuchowski (1997), Holm-corrected across "
            "findings in p_holm). The patient is the unit: follow-up films of one patient are "
            "not independent, and an image-level DeLong test would be far too sure. With several "
            "seeds, seed s of one model is paired with seed s of the other and the differences "
            "are averaged over seeds; the tests are CONDITIONAL ON THE TRAINED WEIGHTS: their "
            "intervals and p-values carry the test-sampling error of these trainings, not the "
            "variation between retrainings, which is seed_sd (sd of the per-seed differences). "
            "Read a difference as real only if its interval excludes 0 (p_holm < 0.05 for a "
            "finding) and, with several seeds, the per-seed dots of the seed figure agree. "
            "A finding row with reliable = False has fewer than reporting.min_positives "
            "positive test patients (test_positive_patients): its p-value and interval are not "
            "to be trusted, however small. Overlapping marginal intervals in Table 1 do not "
            "mean 'no difference', and separate ones do not prove one.",
            _round(table),
        )
    ]


def _class_weight_section(
    all_metrics: Mapping[str, Any], data_summary: Mapping[str, Any]
) -> list[tuple[str, str, pd.DataFrame]]:
    """The class weights each model trained with, and what `pos_weight_cap` changed."""
    cards = {m: (b.get("cost") or {}).get("checkpoint") or {} for m, b in all_metrics.items()}
    table = report_html.class_weight_table(cards, data_summary)
    if not len(table):
        return []
    return [
        (
            "Class weights (training.loss)",
            "Balanced class weights (the paper): BCE pos_weight = negatives / positives of each "
            "finding in the training split, capped at training.loss.pos_weight_cap. 'capped' "
            "lists the findings whose balanced weight exceeds the cap, with that uncapped "
            "weight (from the training split's label counts in the data section); they trained "
            "with the cap instead. docs/training.md says why the cap exists.",
            table,
        )
    ]


def _label_and_box_sections(
    expert_table: pd.DataFrame | None, localisation_table: pd.DataFrame | None
) -> list[tuple[str, str, pd.DataFrame]]:
    out: list[tuple[str, str, pd.DataFrame]] = []
    if expert_table is not None and len(expert_table):
        out.append(
            (
                "Expert labels (Google 2019) against NIH's labels",
                "The same test images scored against NIH's text-mined labels and against "
                "radiologists' labels for 4 findings: Pneumothorax; Nodule or mass = max(Nodule, "
                "Mass); Airspace opacity = max(Consolidation, Infiltration, Pneumonia, Edema); "
                "Fracture has no NIH finding. A gap between the two AUROCs is what label noise "
                "does to the measured numbers. On the phantom the expert file holds the planted "
                "truth and phantom.label_noise perturbs only NIH-style labels.",
                _round(expert_table),
            )
        )
    if localisation_table is not None and len(localisation_table):
        out.append(
            (
                "Localisation on every boxed test image",
                "Per model, CAM layer (one per scale for the multi-scale model) and finding: "
                "hit_rate = hits / ALL boxed positives (pointing game: the Grad-CAM maximum "
                "inside the box), an all-zero or non-finite map counting as a miss; undecided = "
                "such maps; hit_rate_decided = hits / decided boxes only (higher: it leaves out "
                "the images where the model looked nowhere). energy = mean share of the map "
                "inside the box. 95% patient-bootstrap intervals (hit_ci_* for hit_rate).",
                _round(localisation_table),
            )
        )
    return out


def _round(df: pd.DataFrame) -> pd.DataFrame:
    return df.round(3) if df is not None else df


def _analysis_sections(
    long_tail: pd.DataFrame | None,
    long_tail_findings: pd.DataFrame | None,
    subgroup_table: pd.DataFrame | None,
    min_positives: int,
    extra: Mapping[str, pd.DataFrame | None] | None = None,
) -> list[tuple[str, str, pd.DataFrame]]:
    """(title, explanation, table) blocks of the report's analysis part, in reading order.
    `extra`: issue 20's tables (`long_tail_ranking`, `calibration`, `underdiagnosis`), each
    placed next to the section it extends."""
    import rare_cxr.pipelines.reporting.analysis_nodes as analysis_nodes  # noqa: PLR0402
    from rare_cxr.evaluation.longtail import read_group_table

    extra = extra or {}
    out: list[tuple[str, str, pd.DataFrame]] = []
    if long_tail is not None and len(long_tail):
        out.append(
            (
                "Long tail: head / medium / tail findings",
                "Findings grouped by training prevalence (reporting.long_tail); group means of "
                "AUROC, AUPRC — named mAP, as the CXR-LT challenges do: the mean over the "
                "group's findings of the average precision — and balanced accuracy (0.5 = a "
                "model that says 'absent' everywhere), with 95% patient-bootstrap intervals of "
                "the group mean; the row 'all' averages every finding (the challenges' overall "
                "mAP; equal to Table 1's macro AUPRC). Every resample averages the group's "
                "findings defined on test, and <metric>_resamples_dropped counts the resamples "
                "that lost one of them.",
                _round(read_group_table(long_tail)),
            )
        )
    out += analysis_nodes.ranking_section(extra.get("long_tail_ranking"))
    if long_tail_findings is not None and len(long_tail_findings):
        out.append(
            (
                "Per finding: balanced accuracy, specificity, sensitivity at fixed specificity",
                f"reliable = at least {min_positives} positive test PATIENTS "
                "(test_positive_patients; test_positives counts films); cells of findings with "
                "fewer are estimates from a handful of cases and their intervals are not to be "
                "trusted (reporting.min_positives).",
                _round(long_tail_findings),
            )
        )
    if subgroup_table is not None and len(subgroup_table):
        macro = subgroup_table[subgroup_table["finding"] == "macro"]
        out.append(
            (
                "Subgroups: macro AUROC by sex, view and age band",
                "Per-finding rows are in subgroups.csv. View (AP/PA) is confounded with "
                "illness in NIH: AP films come from sicker, often bedridden patients.",
                _round(macro),
            )
        )
    out += analysis_nodes.underdiagnosis_section(extra.get("underdiagnosis"))
    out += analysis_nodes.calibration_section(extra.get("calibration"), min_positives)
    return out
