"""Pipeline `baselines`: every model block without `role: main`, trained by the shared
training pipeline (the list comes from the parameters, see `rare_cxr.models.roster`)."""

from rare_cxr.pipelines.baselines.pipeline import create_pipeline

__all__ = ["create_pipeline"]
