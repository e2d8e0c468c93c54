"""`phantom`: generate the embedded synthetic dataset in the NIH ChestX-ray14 layout."""

from rare_cxr.pipelines.phantom.pipeline import create_pipeline

__all__ = ["create_pipeline"]
