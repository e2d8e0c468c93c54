"""Pipeline `training`: train the multi-scale ResNet and predict val/test probabilities."""

from rare_cxr.pipelines.training.pipeline import create_model_pipeline, create_pipeline

__all__ = ["create_model_pipeline", "create_pipeline"]
