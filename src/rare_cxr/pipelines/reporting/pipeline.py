"""Pipeline `reporting`: metrics, tables, figures and report.html for a list of models.

Per model (namespace `<model>`, so kedro-viz folds them into the same box as that model's
training nodes): `verify_lineage` (checkpoint, history and predictions from one training, on
the current image cache, labels and split; everything downstream reads its verified tables)
-> `select_thresholds` (validation only) -> `evaluate_model` (test + patient bootstrap) ;
`calibration_metrics` (temperatures fitted on validation, test ECE) ; `underdiagnosis_metrics` ;
`measure_cost` ; `gradcam_examples` ; `build_model_bundle` (weights + validation thresholds +
temperatures + data summary + metrics in one file, and its model card: what `kedro run
--pipelines inference` reads, docs/inference.md). Then, once for all models:
`combine_metrics` -> `build_table1`, `build_per_finding_auroc`, `build_rare_findings_table`,
the figures, and `render_report`, which embeds the PNGs this run saved.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from kedro.pipeline import Node, Pipeline

# the module, not through the package (whose __init__ imports this module): no import cycle
import rare_cxr.pipelines.reporting.nodes as nodes  # noqa: PLR0402
from rare_cxr.pipelines.reporting.params import ReportingParams
from rare_cxr.runs import DOWNSTREAM_TAG

if TYPE_CHECKING:
    from rare_cxr.models.roster import Roster

SHARED_INPUTS = {
    "raw_expert_labels",
    "labels",
    "splits",
    "image_cache",
    "image_index",
    "raw_bbox_list",
    "rare_findings",
    "data_summary",
}
FIGURES = (
    "figure2_validation_curves",
    "training_loss_curves",
    "per_finding_auroc_figure",
    "roc_curves",
    "pr_curves",
    "reliability_diagram",
    "reliability_rare",
    "seed_spread",
    "paired_forest",
)


def _model_pipeline() -> Pipeline:
    """Per model: lineage, metrics and thresholds; the analyses; cost, bundle, Grad-CAM."""
    return _model_metric_nodes() + _model_analysis_nodes() + _model_artefact_nodes()


def _model_metric_nodes() -> Pipeline:
    return Pipeline(
        [
            Node(
                nodes.verify_lineage,
                {
                    name: name
                    for name in (
                        "checkpoint",
                        "history",
                        "predictions",
                        "image_cache",
                        "labels",
                        "splits",
                    )
                },
                ["lineage", "verified_predictions", "verified_history"],
                name="verify_lineage",
                tags=["lineage"],
            ),
            Node(
                nodes.select_thresholds,
                ["verified_predictions", "labels", "lineage", "params:reporting"],
                "thresholds",
                name="select_thresholds",
                tags=["metrics"],
            ),
            Node(
                nodes.evaluate_model,
                ["verified_predictions", "labels", "thresholds", "params:reporting"],
                "metrics",
                name="evaluate_model",
                tags=["metrics"],
            ),
        ]
    )


def _model_analysis_nodes() -> Pipeline:
    return Pipeline(
        [
            Node(
                nodes.long_tail_metrics,
                [
                    "verified_predictions",
                    "labels",
                    "splits",
                    "thresholds",
                    "params:reporting",
                ],
                "long_tail",
                name="long_tail_metrics",
                tags=["metrics", "long_tail"],
            ),
            Node(
                nodes.expert_label_metrics,
                ["verified_predictions", "labels", "raw_expert_labels", "params:reporting"],
                "expert_labels",
                name="expert_label_metrics",
                tags=["metrics", "expert_labels"],
            ),
            Node(
                nodes.localisation_metrics,
                {
                    "checkpoint": "checkpoint",
                    "predictions": "verified_predictions",
                    **{k: k for k in ("labels", "image_cache", "image_index", "raw_bbox_list")},
                    "reporting": "params:reporting",
                },
                "localisation",
                name="localisation_metrics",
                tags=["figures", "localisation"],
            ),
            Node(
                nodes.subgroup_metrics,
                ["verified_predictions", "labels", "params:reporting"],
                "subgroups",
                name="subgroup_metrics",
                tags=["metrics", "subgroups"],
            ),
            Node(
                nodes.calibration_metrics,
                ["verified_predictions", "labels", "params:reporting"],
                "calibration",
                name="calibration_metrics",
                tags=["metrics", "calibration"],
            ),
            Node(
                nodes.underdiagnosis_metrics,
                ["verified_predictions", "labels", "thresholds", "params:reporting"],
                "underdiagnosis",
                name="underdiagnosis_metrics",
                tags=["metrics", "subgroups", "underdiagnosis"],
            ),
        ]
    )


def _model_artefact_nodes() -> Pipeline:
    return Pipeline(
        [
            Node(
                nodes.measure_cost,
                ["checkpoint", "lineage", "params:reporting"],
                "cost",
                name="measure_cost",
                tags=["cost"],
            ),
            Node(
                nodes.build_model_bundle,
                {
                    "reporting": "params:reporting",
                    **{
                        k: k
                        for k in (
                            "checkpoint",
                            "lineage",
                            "thresholds",
                            "metrics",
                            "long_tail",
                            "subgroups",
                            "calibration",
                            "underdiagnosis",
                            "data_summary",
                            "rare_findings",
                        )
                    },
                },
                ["model_bundle", "model_card"],
                name="build_model_bundle",
                tags=["bundle"],
            ),
            Node(
                nodes.gradcam_examples,
                {
                    "predictions": "verified_predictions",
                    **{k: k for k in ("checkpoint", "thresholds", "labels")},
                    **{k: k for k in ("image_cache", "image_index", "raw_bbox_list")},
                    "rare_findings": "rare_findings",
                    "reporting": "params:reporting",
                },
                "gradcam",
                name="gradcam_examples",
                tags=["figures", "gradcam"],
            ),
        ]
    )


def trained_models(data_dir: str | Path, models: Sequence[str]) -> list[str]:
    """Those of `models` with at least one complete checkpoint version under `data_dir`."""
    models_dir = Path(data_dir) / "06_models"
    return [m for m in models if any(models_dir.glob(f"{m}/checkpoint.pt/*/checkpoint.pt"))]


def select_models(setting: Any, data_dir: str | Path | None, roster: Roster) -> list[str]:
    """The models `kedro run --pipelines reporting` reports (parameter `reporting.models`).

    `trained` (the default): every configured model that has a checkpoint in this environment's
    data folder -- after the first GPU run trained only the multi-scale model, its report covers
    that model instead of dying on the five missing ones. A list names the models explicitly.
    When nothing is trained yet (or the data folder is unknown, as for kedro-viz), all of them.
    """
    if setting is None or setting == "trained":
        found = trained_models(data_dir, roster.models) if data_dir is not None else []
        return found or list(roster.models)
    if not isinstance(setting, list | tuple) or not setting:
        raise ValueError(
            f"reporting.models: expected 'trained' or a non-empty list of models, got {setting!r}"
        )
    return roster.check_names(list(setting), "reporting.models")


def create_model_pipeline(model: str) -> Pipeline:
    """The per-model reporting nodes in namespace `model`."""
    return Pipeline(
        _model_pipeline(),
        namespace=model,
        inputs=SHARED_INPUTS,
        parameters={"params:reporting": "params:reporting"},
        tags=[model],
    )


def create_pipeline(
    roster: Roster,
    models: Sequence[str] | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
    **kwargs: object,
) -> Pipeline:
    """Reporting for `models` (default: every model of `roster`, which
    `rare_cxr.pipeline_registry` reads from the run's parameters) from
    `<model>.predictions|history|checkpoint`; `pairs` are the paired comparisons (default: each
    model against its configured `reference`, where both are reported)."""
    models = roster.check_names(list(roster.models if models is None else models), "reporting")
    if not models:
        raise ValueError("reporting: need at least one model")
    pairs = roster.pairs(models) if pairs is None else list(pairs)
    per_model = sum((create_model_pipeline(m) for m in models), Pipeline([]))
    histories = {m: f"{m}.verified_history" for m in models}
    predictions = {m: f"{m}.verified_predictions" for m in models}
    metric_inputs = {f"{m}__{k}": f"{m}.{k}" for m in models for k in ("metrics", "cost")}
    with warnings.catch_warnings():
        # The combined nodes read other namespaces' datasets by their full dotted names on
        # purpose; Kedro warns about any dotted name outside a namespace.
        warnings.filterwarnings("ignore", message="One or more dataset names contain")
        combined = (
            _combined_table_nodes(metric_inputs)
            + _combined_figure_nodes(histories, predictions, _report_inputs(models))
            + _combined_paired_nodes(models, pairs)
            + _combined_analysis_nodes(models)
        )
    # `downstream`: these nodes only read models' outputs and write their own, so a reporting
    # run waits only for the models being trained right now (rare_cxr.runs.plan_locks)
    combined = Pipeline(combined, tags=[DOWNSTREAM_TAG])
    return Pipeline(per_model + combined, tags=["reporting"])


def _report_inputs(models: Sequence[str]) -> dict[str, str]:
    """`render_report`'s inputs: every combined table, the figures, Grad-CAMs and cards."""
    return {
        "all_metrics": "metrics_all",
        "localisation": "localisation_table",
        "expert_labels": "expert_label_table",
        "paired_comparison": "paired_comparison",
        "long_tail": "long_tail_table",
        "long_tail_findings": "long_tail_findings",
        "subgroups": "subgroup_table",
        "long_tail_ranking": "long_tail_ranking",
        "method_comparison": "method_comparison",
        "lesion_size_delta": "lesion_size_delta",
        "calibration": "calibration_table",
        "underdiagnosis": "underdiagnosis_table",
        "table1": "table1",
        "per_finding_auroc": "per_finding_auroc",
        "rare_findings_table": "rare_findings_table",
        "rare_findings": "rare_findings",
        "data_summary": "data_summary",
        "reporting": "params:reporting",
        **{f: f for f in FIGURES},
        **{f"{m}__gradcam": f"{m}.gradcam" for m in models},
        **{f"{m}__model_card": f"{m}.model_card" for m in models},
    }


def _per_model(models: Sequence[str], *kinds: str) -> dict[str, str]:
    """`{<model>__<kind>: <model>.<dataset>}` inputs of a combined node; a kind of the form
    `kind=dataset` reads another dataset name (`predictions=verified_predictions`)."""
    out = {}
    for kind in kinds:
        name, _, dataset = kind.partition("=")
        out.update({f"{m}__{name}": f"{m}.{dataset or name}" for m in models})
    return out


def _combined_paired_nodes(models: Sequence[str], pairs: list[tuple[str, str]]) -> Pipeline:
    """The paired tests: each model against its reference (per finding, by planted lesion size,
    and on what a long-tail method changes), and the long-tail ranking."""
    shared = {"labels": "labels", "reporting": "params:reporting"}
    predictions = "predictions=verified_predictions"
    return Pipeline(
        [
            Node(
                _with_pairs(nodes.paired_comparison, pairs),
                {**shared, **_per_model(models, predictions, "thresholds")},
                "paired_comparison",
                name="paired_comparison",
                tags=["metrics", "paired"],
            ),
            Node(
                _lesion_size_delta_of(pairs),
                {
                    **shared,
                    "raw_bbox_list": "raw_bbox_list",
                    **_per_model(models, predictions, "thresholds"),
                },
                "lesion_size_delta",
                name="lesion_size_delta",
                tags=["metrics", "paired", "localisation"],
            ),
            Node(
                nodes.plot_paired_forest,
                "paired_comparison",
                "paired_forest",
                name="plot_paired_forest",
                tags=["figures", "paired"],
            ),
            Node(
                nodes.build_long_tail_ranking,
                {**shared, **_per_model(models, "long_tail", predictions, "thresholds")},
                "long_tail_ranking",
                name="build_long_tail_ranking",
                tags=["tables", "long_tail", "paired"],
            ),
            Node(
                _with_pairs(nodes.build_method_comparison, pairs),
                {**shared, **_per_model(models, "long_tail", predictions, "thresholds")},
                "method_comparison",
                name="build_method_comparison",
                tags=["tables", "long_tail", "calibration", "paired"],
            ),
        ]
    )


def _combined_analysis_nodes(models: Sequence[str]) -> Pipeline:
    """The combined tables of the analyses (long tail, localisation, expert labels,
    subgroups, calibration, underdiagnosis)."""
    shared = {"labels": "labels", "reporting": "params:reporting"}
    predictions = "predictions=verified_predictions"
    return Pipeline(
        [
            Node(
                nodes.build_long_tail_tables,
                _per_model(models, "long_tail"),
                ["long_tail_table", "long_tail_findings"],
                name="build_long_tail_tables",
                tags=["tables", "long_tail"],
            ),
            Node(
                nodes.build_localisation_table,
                {"reporting": "params:reporting", **_per_model(models, "localisation")},
                "localisation_table",
                name="build_localisation_table",
                tags=["tables", "localisation"],
            ),
            Node(
                nodes.build_expert_table,
                _per_model(models, "expert_labels"),
                "expert_label_table",
                name="build_expert_table",
                tags=["tables", "expert_labels"],
            ),
            Node(
                nodes.build_subgroup_table,
                _per_model(models, "subgroups"),
                "subgroup_table",
                name="build_subgroup_table",
                tags=["tables", "subgroups"],
            ),
            Node(
                nodes.build_calibration_table,
                _per_model(models, "calibration"),
                "calibration_table",
                name="build_calibration_table",
                tags=["tables", "calibration"],
            ),
            Node(
                nodes.plot_reliability_rare,
                {
                    **shared,
                    "rare_findings": "rare_findings",
                    **_per_model(models, "calibration", predictions),
                },
                "reliability_rare",
                name="plot_reliability_rare",
                tags=["figures", "calibration"],
            ),
            Node(
                nodes.build_underdiagnosis_table,
                _per_model(models, "underdiagnosis"),
                "underdiagnosis_table",
                name="build_underdiagnosis_table",
                tags=["tables", "subgroups", "underdiagnosis"],
            ),
        ]
    )


def _with_pairs(
    node_function: Callable[..., pd.DataFrame], pairs: list[tuple[str, str]]
) -> Callable[..., pd.DataFrame]:
    """`node_function(labels, reporting, pairs=..., **inputs)` with this pipeline's (model,
    reference) pairs bound (`nodes.paired_comparison`, `nodes.build_method_comparison`). A plain
    function rather than `functools.partial`, so that Kedro can read its signature and type
    hints (typed parameters) like any node's."""

    def bound(labels: pd.DataFrame, reporting: ReportingParams, **inputs: Any) -> pd.DataFrame:
        return node_function(labels, reporting, pairs=pairs, **inputs)

    bound.__name__ = bound.__qualname__ = node_function.__name__
    return bound


def _lesion_size_delta_of(pairs: list[tuple[str, str]]) -> Callable[..., pd.DataFrame]:
    """`nodes.lesion_size_delta` with the pairs bound (as `_with_pairs`, plus the box list)."""

    def lesion_size_delta(
        labels: pd.DataFrame, raw_bbox_list: str, reporting: ReportingParams, **inputs: Any
    ) -> pd.DataFrame:
        return nodes.lesion_size_delta(labels, raw_bbox_list, reporting, pairs=pairs, **inputs)

    return lesion_size_delta


def _combined_table_nodes(metric_inputs: dict[str, str]) -> Pipeline:
    """The once-per-run nodes: shared inputs, the metrics of every model, the summary tables."""
    return Pipeline(
        [
            Node(
                nodes.select_rare_findings,
                ["labels", "splits", "params:reporting"],
                "rare_findings",
                name="select_rare_findings",
                tags=["metrics"],
            ),
            Node(
                nodes.summarise_data,
                ["labels", "splits", "raw_bbox_list", "params:reporting"],
                "data_summary",
                name="summarise_data",
                tags=["tables"],
            ),
            Node(
                nodes.combine_metrics,
                metric_inputs,
                "metrics_all",
                name="combine_metrics",
                tags=["metrics"],
            ),
            Node(
                nodes.build_table1,
                "metrics_all",
                ["table1", "table1_markdown"],
                name="build_table1",
                tags=["tables"],
            ),
            Node(
                nodes.build_per_finding_auroc,
                "metrics_all",
                "per_finding_auroc",
                name="build_per_finding_auroc",
                tags=["tables"],
            ),
            Node(
                nodes.build_rare_findings_table,
                ["metrics_all", "rare_findings", "params:reporting"],
                "rare_findings_table",
                name="build_rare_findings_table",
                tags=["tables"],
            ),
        ]
    )


def _combined_figure_nodes(
    histories: dict[str, str], predictions: dict[str, str], report_inputs: dict[str, str]
) -> Pipeline:
    """The figures of every model together, and the report that embeds them."""
    return Pipeline(
        [
            Node(
                nodes.plot_validation_curves,
                histories,
                "figure2_validation_curves",
                name="plot_validation_curves",
                tags=["figures"],
            ),
            Node(
                nodes.plot_training_loss,
                histories,
                "training_loss_curves",
                name="plot_training_loss",
                tags=["figures"],
            ),
            Node(
                nodes.plot_auroc_intervals,
                "metrics_all",
                "per_finding_auroc_figure",
                name="plot_auroc_intervals",
                tags=["figures"],
            ),
            Node(
                nodes.plot_roc_curves,
                {"labels": "labels", **predictions},
                "roc_curves",
                name="plot_roc_curves",
                tags=["figures"],
            ),
            Node(
                nodes.plot_pr_curves,
                {"labels": "labels", **predictions},
                "pr_curves",
                name="plot_pr_curves",
                tags=["figures"],
            ),
            Node(
                nodes.plot_reliability,
                {"labels": "labels", "reporting": "params:reporting", **predictions},
                "reliability_diagram",
                name="plot_reliability",
                tags=["figures"],
            ),
            Node(
                nodes.plot_seed_spread,
                "metrics_all",
                "seed_spread",
                name="plot_seed_spread",
                tags=["figures"],
            ),
            Node(
                nodes.render_report,
                report_inputs,
                "report_html",
                name="render_report",
                tags=["report"],
            ),
        ]
    )
