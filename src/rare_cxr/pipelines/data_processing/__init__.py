"""`data_processing`: parse NIH labels, index the images, split patients."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
