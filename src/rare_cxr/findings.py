"""The one ordered list of NIH ChestX-ray14 findings; everything else refers to it.

The order is alphabetical, as NIH's own tables and most papers (CheXNet) list them, and it is
the column order of `labels.parquet`, of `predictions.parquet` and of every model's output.
"""

from __future__ import annotations

FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
)

NO_FINDING = "No Finding"

# Images carrying each finding in Data_Entry_2017_v2020 (112,120 images); the phantom uses
# these prevalences so that the demo data is as imbalanced as the real data.
NIH_IMAGE_COUNTS: dict[str, int] = {
    "Atelectasis": 11_559,
    "Cardiomegaly": 2_776,
    "Consolidation": 4_667,
    "Edema": 2_303,
    "Effusion": 13_317,
    "Emphysema": 2_516,
    "Fibrosis": 1_686,
    "Hernia": 227,
    "Infiltration": 19_894,
    "Mass": 5_782,
    "Nodule": 6_331,
    "Pleural_Thickening": 3_385,
    "Pneumonia": 1_431,
    "Pneumothorax": 5_302,
}
NIH_TOTAL_IMAGES = 112_120
NIH_PREVALENCE: dict[str, float] = {k: v / NIH_TOTAL_IMAGES for k, v in NIH_IMAGE_COUNTS.items()}

# Spellings seen in NIH side files (the bounding-box list says "Infiltrate").
FINDING_ALIASES: dict[str, str] = {"Infiltrate": "Infiltration"}


def finding_index(name: str) -> int:
    """Position of a finding in FINDINGS; a clear error for an unknown name."""
    canonical = FINDING_ALIASES.get(name, name)
    try:
        return FINDINGS.index(canonical)
    except ValueError:
        raise ValueError(
            f"unknown finding {name!r}; expected one of: {', '.join(FINDINGS)} (or {NO_FINDING!r})"
        ) from None
