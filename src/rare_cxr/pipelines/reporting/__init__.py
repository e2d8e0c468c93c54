"""Pipeline `reporting`: metrics with patient-bootstrap intervals, Table 1, figures, report.html."""

from rare_cxr.pipelines.reporting.pipeline import create_pipeline

__all__ = ["create_pipeline"]
