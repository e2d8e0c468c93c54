"""Pipeline `augmentation`: image cache, augmentation policy and its preview figure."""

from __future__ import annotations

from kedro.pipeline import Pipeline, node, pipeline

from rare_cxr.pipelines.augmentation.nodes import (
    build_augmentation,
    build_image_cache,
    preview_augmentation,
)


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                build_image_cache,
                inputs=[
                    "splits",
                    "image_index",
                    "labels",
                    "params:image_cache",
                    "params:data_processing.images",
                ],
                outputs="image_cache",
                name="build_image_cache",
                tags=["augmentation", "image_cache"],
            ),
            node(
                build_augmentation,
                inputs="params:augmentation",
                outputs="augmentation_policy",
                name="build_augmentation",
                tags=["augmentation", "augmentation_policy"],
            ),
            node(
                preview_augmentation,
                inputs=["augmentation_policy", "image_cache", "params:augmentation_preview"],
                outputs="augmentation_preview",
                name="preview_augmentation",
                tags=["augmentation", "reporting"],
            ),
        ]
    )
