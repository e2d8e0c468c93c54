"""The phantom pipeline: one node writing the NIH-layout raw files (see docs/phantom.md)."""

from __future__ import annotations

from kedro.pipeline import Pipeline, node

from rare_cxr.pipelines.phantom.nodes import generate_phantom


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                generate_phantom,
                inputs="params:phantom",
                outputs=[
                    "raw_data_entry",
                    "raw_train_val_list",
                    "raw_test_list",
                    "raw_bbox_list",
                    "raw_expert_labels",
                    "raw_images",
                    "phantom_summary",
                ],
                name="generate_phantom",
            )
        ]
    )
