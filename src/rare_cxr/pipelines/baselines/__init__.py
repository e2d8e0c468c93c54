"""Pipeline `baselines`: five comparison models trained by the shared training pipeline."""

from rare_cxr.pipelines.baselines.pipeline import BASELINES, create_pipeline

__all__ = ["BASELINES", "create_pipeline"]
