"""The `data_processing` pipeline: raw NIH-layout files -> labels, image index, patient split.

`split_patients` reads only labels and the official lists, never `image_index`: the split is a
property of patients, so it is the same whichever images happen to be downloaded.
"""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from .nodes import index_images, parse_labels, split_patients


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                parse_labels,
                inputs=["raw_data_entry", "params:data_processing.labels"],
                outputs=["labels", "label_quality"],
                name="parse_labels",
            ),
            Node(
                index_images,
                inputs=[
                    "labels",
                    "label_quality",
                    "raw_images",
                    "params:data_processing.images",
                ],
                outputs=["image_index", "data_quality_report"],
                name="index_images",
            ),
            Node(
                split_patients,
                inputs=[
                    "labels",
                    "raw_train_val_list",
                    "raw_test_list",
                    "params:data_processing.split",
                ],
                outputs=["splits", "split_report", "split_summary"],
                name="split_patients",
            ),
        ]
    )
