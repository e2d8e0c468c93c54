"""A synthetic chest-radiograph phantom in the NIH ChestX-ray14 file layout.

SYNTHETIC DATA: nothing here comes from a patient. The generator exists so that `kedro run`
works on a fresh clone, on a CPU, in minutes, and so that the multi-scale model has a test bed
whose findings span known spatial scales. See docs/phantom.md.

Modules: `params` (validation), `anatomy` (normal chest), `lesions` (the 14 findings),
`cohort` (labels, patients, follow-ups, split: no pixels), `render` (pixels, boxes),
`writer` (NIH file formats).
"""

from rare_cxr.phantom.cohort import ImagePlan, prevalences, sample_cohort, split_patients
from rare_cxr.phantom.params import PhantomParams, validate_params
from rare_cxr.phantom.render import lesion_boxes, render_image

__all__ = [
    "ImagePlan",
    "PhantomParams",
    "lesion_boxes",
    "prevalences",
    "render_image",
    "sample_cohort",
    "split_patients",
    "validate_params",
]
