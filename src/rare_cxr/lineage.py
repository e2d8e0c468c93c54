"""What one model's report combines must belong together: its checkpoint, history and
predictions come from one training, on the current image cache, labels and split.

Why: each of these is loaded as "the latest version" independently. A training run that died
after saving its checkpoint but before `predict`, or a data_processing rerun with new labels,
would otherwise make a report that pairs one run's predictions with another run's weights, or a
phantom's predictions with NIH labels -- silently. `check_lineage` names any mismatch with the
command that fixes it; the reporting node `verify_lineage` is its adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from rare_cxr.findings import FINDINGS

CHECKED = [
    "predictions <- checkpoint version",
    "predictions, history <- training id",
    "predictions <- current image cache",
    "image cache labels == labels",
    "image cache splits == splits",
]


class LineageError(ValueError):
    """Reporting inputs that do not belong together (named, with the fix)."""


def check_lineage(
    *,
    checkpoint: Mapping[str, Any],
    history: pd.DataFrame,
    predictions: pd.DataFrame,
    image_cache: Any,
    labels: pd.DataFrame,
    splits: pd.DataFrame,
) -> dict[str, Any]:
    """The lineage record of one model's report, or LineageError naming what does not match."""
    from rare_cxr.pipelines.training.nodes import cache_fingerprint_text

    meta = checkpoint.get("metadata", {})
    model = str(meta.get("model_spec", {}).get("name", "model"))
    rerun = (
        f"re-predict from the latest checkpoint with `kedro run --pipelines all_models --nodes "
        f"{model}.predict`, or retrain with `kedro run --pipelines all_models --namespaces "
        f"{model}`"
    )
    _check_columns(model, predictions, rerun)
    checkpoint_version = str(meta.get("checkpoint_version"))
    _check_checkpoint_version(model, predictions, checkpoint_version, rerun)
    expected, training_id = _check_training_ids(model, checkpoint, predictions, history, rerun)
    current_cache = cache_fingerprint_text(image_cache)
    _check_image_cache(model, predictions, current_cache, rerun)
    for name in ("val", "test"):
        if name in image_cache.split_names:
            _check_cached_split(model, name, image_cache.split(name).table, labels, splits)
    return {
        "model": model,
        "checkpoint_version": checkpoint_version,
        "training_id": training_id,
        "seeds": dict(expected),
        "image_cache_fingerprint": current_cache,
        "best_epoch": meta.get("epoch"),
        "prediction_rows": int(len(predictions)),
        "checked": list(CHECKED),
    }


def _single(model: str, predictions: pd.DataFrame, column: str, rerun: str) -> str:
    """The one value of `column` in the predictions (several: a mix of trainings)."""
    values = sorted(predictions[column].astype(str).unique())
    if len(values) != 1:
        raise LineageError(f"{model}.predictions mix several {column}s: {values}; {rerun}")
    return values[0]


def _check_columns(model: str, predictions: pd.DataFrame, rerun: str) -> None:
    from rare_cxr.pipelines.training.nodes import LINEAGE_COLUMNS

    missing = [c for c in LINEAGE_COLUMNS if c not in predictions.columns]
    if missing:
        raise LineageError(
            f"{model}.predictions lack the lineage column(s) {missing} (written by an older "
            f"rare-cxr), so they cannot be matched to a checkpoint: {rerun}"
        )


def _check_checkpoint_version(
    model: str, predictions: pd.DataFrame, checkpoint_version: str, rerun: str
) -> None:
    found = _single(model, predictions, "checkpoint_version", rerun)
    if found != checkpoint_version:
        raise LineageError(
            f"{model}.predictions were computed from checkpoint version "
            f"{found}, but the {model}.checkpoint loaded here is version "
            f"{checkpoint_version} (a later training whose predict step did not run?). Either "
            f"{rerun}, or report the older pair with `--load-versions "
            f"{model}.checkpoint:{found}`"
        )


def _check_training_ids(
    model: str,
    checkpoint: Mapping[str, Any],
    predictions: pd.DataFrame,
    history: pd.DataFrame,
    rerun: str,
) -> tuple[dict[str, str], str]:
    """({seed: training id} of the checkpoint, the primary seed's id), after checking that the
    predictions and the history carry exactly those ids."""
    from rare_cxr.pipelines.training.nodes import checkpoint_seeds, seed_training_id

    seeds = checkpoint_seeds(checkpoint)
    expected = {str(s): seed_training_id(checkpoint, s) for s in seeds}
    found = training_ids(predictions, expected)
    if found != expected:
        raise LineageError(
            f"{model}.predictions come from training(s) {found}, the checkpoint from "
            f"{expected} (seed: training id); {rerun}"
        )
    history_ids = (
        training_ids(history, expected)
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
    return expected, expected[str(seeds[0])]


def _check_image_cache(
    model: str, predictions: pd.DataFrame, current_cache: str, rerun: str
) -> None:
    found = _single(model, predictions, "image_cache_fingerprint", rerun)
    if found != current_cache:
        raise LineageError(
            f"{model}.predictions were made from image cache {found}"
            f", but the image cache is now {current_cache}: the images, labels or split changed "
            f"since this model was trained. Retrain it (`kedro run --pipelines all_models "
            f"--namespaces {model}`) or rebuild the old cache"
        )


def _check_cached_split(
    model: str, name: str, table: pd.DataFrame, labels: pd.DataFrame, splits: pd.DataFrame
) -> None:
    """The image cache's `name` split has the current labels and split assignments."""
    truth = labels.assign(image_id=labels["image_id"].astype(str)).set_index("image_id")
    assigned = splits.assign(image_id=splits["image_id"].astype(str)).set_index("image_id")
    table = table.assign(image_id=lambda t: t["image_id"].astype(str))
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


def training_ids(table: pd.DataFrame, expected: Mapping[str, str]) -> dict[str, Any]:
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
