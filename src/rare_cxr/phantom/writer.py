"""The NIH ChestX-ray14 file formats, byte for byte, for phantom data.

What NIH's files look like (checked against the real release in ../shared/data):
* `Data_Entry_2017_v2020.csv`: the header below (two names contain commas, so 9 names give
  11 fields per row), findings `|`-joined alphabetically or `No Finding`, a final newline;
* `train_val_list.txt` / `test_list.txt`: sorted image names, one per line, *no* final newline;
* `BBox_List_2017.csv`: `Image Index,Finding Label,Bbox [x,y,w,h],,,` then 6 fields per row,
  pixel coordinates of the distributed image, `Infiltrate` for Infiltration, a final newline.
"""

from __future__ import annotations

from collections.abc import Iterable

from rare_cxr.findings import NO_FINDING
from rare_cxr.phantom.cohort import ImagePlan

DATA_ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
# The bounding-box list spells one finding differently from the label table.
BBOX_SPELLING = {"Infiltration": "Infiltrate"}
# Detector field of view: NIH films span ~35-43 cm; the phantom's image is its "original".
FIELD_OF_VIEW_MM = 360.0


def finding_labels(findings: Iterable[str]) -> str:
    names = sorted(findings)
    return "|".join(names) if names else NO_FINDING


def data_entry_csv(plans: Iterable[ImagePlan], size: int) -> str:
    spacing = repr(FIELD_OF_VIEW_MM / size)
    rows = [DATA_ENTRY_HEADER]
    for plan in sorted(plans, key=lambda p: p.image_id):
        rows.append(
            ",".join(
                [
                    plan.image_id,
                    finding_labels(plan.recorded),
                    str(plan.follow_up),
                    str(plan.patient_id),
                    str(plan.age),
                    plan.sex,
                    plan.view,
                    str(size),
                    str(size),
                    spacing,
                    spacing,
                ]
            )
        )
    return "\n".join(rows) + "\n"


def image_list(image_ids: Iterable[str]) -> str:
    return "\n".join(sorted(image_ids))


def _number(value: float) -> str:
    return repr(round(float(value), 3))


def bbox_csv(boxes: Iterable[tuple[str, str, float, float, float, float]]) -> str:
    """Rows of `(image_id, finding, x, y, w, h)`."""
    rows = [BBOX_HEADER]
    for image, finding, x, y, w, h in boxes:
        label = BBOX_SPELLING.get(finding, finding)
        rows.append(",".join([image, label, _number(x), _number(y), _number(w), _number(h)]))
    return "\n".join(rows) + "\n"


def expert_labels_csv(plans: Iterable[ImagePlan], size: int, test_ids: set[str]) -> str:
    """The Google 2019 expert-relabel file (`google2019_nih-chest-xray-labels.csv`) for the
    phantom: `Set Id` `test` for the images in `test_ids`, `val` for the others (train_val).

    Why from the *planted* findings: the experts stand in for a better reference than NIH's
    report mining, and the phantom knows the truth; with `phantom.label_noise > 0` Data_Entry
    (and this file's `Finding Labels`, a copy of it, as in the real file) is noisy while the
    four YES/NO columns are not -- exactly the situation the expert comparison measures.
    The mapping of the 14 findings is `rare_cxr.evaluation.expert.NIH_SOURCES` (one rule for
    the writer and the evaluation); Fracture has no NIH finding and is always NO.

    Layout as the real file: its header, Data_Entry's 11 fields written as `data_entry_csv`
    writes them, then the 4 findings and the set; test rows then val rows, each sorted by
    image id; `\\r\\n` line ends and no final newline.
    """
    from rare_cxr.evaluation.expert import EXPERT_HEADER, FILE_FINDINGS, NIH_SOURCES

    spacing = repr(FIELD_OF_VIEW_MM / size)
    ordered = sorted(plans, key=lambda p: (p.image_id not in test_ids, p.image_id))
    rows = [EXPERT_HEADER]
    for plan in ordered:
        planted = set(plan.findings)
        expert = [
            "YES" if planted.intersection(NIH_SOURCES[name]) else "NO" for name in FILE_FINDINGS
        ]
        rows.append(
            ",".join(
                [
                    plan.image_id,
                    finding_labels(plan.recorded),
                    str(plan.follow_up),
                    str(plan.patient_id),
                    str(plan.age),
                    plan.sex,
                    plan.view,
                    str(size),
                    str(size),
                    spacing,
                    spacing,
                    *expert,
                    "test" if plan.image_id in test_ids else "val",
                ]
            )
        )
    return "\r\n".join(rows)
