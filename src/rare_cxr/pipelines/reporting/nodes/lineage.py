"""Lineage: the first node of each model's report (`rare_cxr.lineage` does the checking)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pandas as pd

from rare_cxr.lineage import LineageError, check_lineage

logger = logging.getLogger(__name__)

__all__ = ["LineageError", "check_verified", "verify_lineage"]


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
    computed from a mix (why: `rare_cxr.lineage`)."""
    record = check_lineage(
        checkpoint=checkpoint,
        history=history,
        predictions=predictions,
        image_cache=image_cache,
        labels=labels,
        splits=splits,
    )
    logger.info(
        "%s: lineage verified (checkpoint %s, training %s)",
        record["model"],
        record["checkpoint_version"],
        record["training_id"],
    )
    return record, predictions, history


def check_verified(node: str, checkpoint_version: Any, lineage: Mapping[str, Any]) -> None:
    """A node that loads the checkpoint again gets the version `verify_lineage` checked."""
    if checkpoint_version != lineage.get("checkpoint_version"):
        raise LineageError(
            f"{node} got checkpoint {checkpoint_version} but the lineage check "
            f"verified {lineage.get('checkpoint_version')}"
        )
