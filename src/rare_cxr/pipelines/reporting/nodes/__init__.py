"""Reporting nodes: short, named adapters over `rare_cxr.evaluation` (and `rare_cxr.lineage`,
`rare_cxr.inference`), one module per thing they produce:

* `lineage`: `verify_lineage` (checkpoint, history, predictions from one training);
* `metrics`: rare findings, data summary, validation thresholds, test metrics with intervals,
  cost, Table 1 and the per-finding and rare tables;
* `paired`: each model against its reference on the same patients;
* `long_tail`, `subgroups` (and underdiagnosis), `labels_and_boxes` (expert labels,
  localisation), `calibration`: the analyses beyond the paper;
* `lesion_size`: ΔAUROC by planted lesion size (where boxes exist);
* `explanations`: the Grad-CAM figure; `bundle`: model bundle and card;
* `figures`: the combined figures; `report`: report.html.

Per-model nodes run inside the model's namespace (they see `predictions`, `checkpoint`, ...
of that model only); combined nodes receive every model's output as keyword arguments named by
the model (`<model>__<kind>`), so a table row is always labelled by the namespace that
produced it. `pipeline.py` imports this package only.
"""

from rare_cxr.pipelines.reporting.nodes.bundle import build_model_bundle
from rare_cxr.pipelines.reporting.nodes.calibration import (
    build_calibration_table,
    calibration_metrics,
)
from rare_cxr.pipelines.reporting.nodes.explanations import gradcam_examples
from rare_cxr.pipelines.reporting.nodes.figures import (
    plot_auroc_intervals,
    plot_paired_forest,
    plot_pr_curves,
    plot_reliability,
    plot_reliability_rare,
    plot_roc_curves,
    plot_seed_spread,
    plot_training_loss,
    plot_validation_curves,
)
from rare_cxr.pipelines.reporting.nodes.labels_and_boxes import (
    build_expert_table,
    build_localisation_table,
    expert_label_metrics,
    localisation_metrics,
)
from rare_cxr.pipelines.reporting.nodes.lesion_size import lesion_size_delta
from rare_cxr.pipelines.reporting.nodes.lineage import LineageError, verify_lineage
from rare_cxr.pipelines.reporting.nodes.long_tail import (
    build_long_tail_ranking,
    build_long_tail_tables,
    build_method_comparison,
    long_tail_metrics,
)
from rare_cxr.pipelines.reporting.nodes.metrics import (
    build_per_finding_auroc,
    build_rare_findings_table,
    build_table1,
    combine_metrics,
    evaluate_model,
    measure_cost,
    select_rare_findings,
    select_thresholds,
    summarise_data,
)
from rare_cxr.pipelines.reporting.nodes.paired import PAIRED_COLUMNS, paired_comparison
from rare_cxr.pipelines.reporting.nodes.report import FIGURE_CAPTIONS, render_report
from rare_cxr.pipelines.reporting.nodes.subgroups import (
    build_subgroup_table,
    build_underdiagnosis_table,
    subgroup_metrics,
    underdiagnosis_metrics,
)

__all__ = [
    "FIGURE_CAPTIONS",
    "PAIRED_COLUMNS",
    "LineageError",
    "build_calibration_table",
    "build_expert_table",
    "build_localisation_table",
    "build_long_tail_ranking",
    "build_long_tail_tables",
    "build_method_comparison",
    "build_model_bundle",
    "build_per_finding_auroc",
    "build_rare_findings_table",
    "build_subgroup_table",
    "build_table1",
    "build_underdiagnosis_table",
    "calibration_metrics",
    "combine_metrics",
    "evaluate_model",
    "expert_label_metrics",
    "gradcam_examples",
    "lesion_size_delta",
    "localisation_metrics",
    "long_tail_metrics",
    "measure_cost",
    "paired_comparison",
    "plot_auroc_intervals",
    "plot_paired_forest",
    "plot_pr_curves",
    "plot_reliability",
    "plot_reliability_rare",
    "plot_roc_curves",
    "plot_seed_spread",
    "plot_training_loss",
    "plot_validation_curves",
    "render_report",
    "select_rare_findings",
    "select_thresholds",
    "subgroup_metrics",
    "summarise_data",
    "underdiagnosis_metrics",
    "verify_lineage",
]
