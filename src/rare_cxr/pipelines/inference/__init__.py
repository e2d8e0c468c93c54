"""Pipelines `inference` (predict a folder of new images with a model bundle) and
`onnx_export` (the bundle's model as a checked ONNX file)."""

from rare_cxr.pipelines.inference.pipeline import create_onnx_pipeline, create_pipeline

__all__ = ["create_onnx_pipeline", "create_pipeline"]
