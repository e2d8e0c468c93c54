"""The model bundle and its model card: what `kedro run --pipelines inference` and a reader of
the model need (adapter over `rare_cxr.inference.bundle` and `.model_card`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rare_cxr.pipelines.reporting.nodes.lineage import check_verified
from rare_cxr.pipelines.reporting.params import ReportingParams, validate_reporting_params


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
    metrics) and its model card (Markdown), from the outputs `verify_lineage` checked belong
    together (rare_cxr.inference)."""
    from rare_cxr.inference.bundle import make_bundle
    from rare_cxr.inference.model_card import card_markdown

    version = checkpoint.get("metadata", {}).get("checkpoint_version")
    check_verified("build_model_bundle", version, lineage)
    bundle = make_bundle(
        checkpoint=checkpoint,
        thresholds=thresholds,
        metrics=metrics,
        data_summary=data_summary,
        lineage=lineage,
        rare_findings=rare_findings,
        long_tail=long_tail,
        subgroups=subgroups,
        # plain data: the bundle's metadata is written out (I/O is where a model is dumped)
        reporting=validate_reporting_params(reporting),
        calibration=calibration,
        underdiagnosis=underdiagnosis,
    )
    return bundle, card_markdown(bundle["metadata"])
