"""Pipeline `augmentation`: the image cache (deterministic half of the input transform) and
the augmentation policy plus its preview (random half)."""

from rare_cxr.pipelines.augmentation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
