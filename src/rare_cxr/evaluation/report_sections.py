"""The analysis sections of report.html, in reading order: each a title, what its table says
(plain text, escaped by the template) and the table. The tables come from the reporting nodes;
this module only chooses the columns shown and the rounding, and says how to read them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import pandas as pd

from rare_cxr.evaluation.longtail import read_group_table


class Section(NamedTuple):
    title: str
    explanation: str
    table: pd.DataFrame


PAIRED = (
    "Each model minus its reference on the same test patients (paired patient bootstrap "
    "for the macro rows, every resample averaging one fixed set of findings — "
    "resamples_dropped counts those that lost a finding's positives; per finding, the "
    "patient-clustered paired DeLong test of Obuchowski (1997), Holm-corrected across "
    "findings in p_holm). The patient is the unit: follow-up films of one patient are "
    "not independent, and an image-level DeLong test would be far too sure. With several "
    "seeds, seed s of one model is paired with seed s of the other and the differences "
    "are averaged over seeds; the tests are CONDITIONAL ON THE TRAINED WEIGHTS: their "
    "intervals and p-values carry the test-sampling error of these trainings, not the "
    "variation between retrainings, which is seed_sd (sd of the per-seed differences). "
    "Read a difference as real only if its interval excludes 0 (p_holm < 0.05 for a "
    "finding) and, with several seeds, the per-seed dots of the seed figure agree. "
    "A finding row with reliable = False has fewer than reporting.min_positives "
    "positive test patients (test_positive_patients): its p-value and interval are not "
    "to be trusted, however small. Overlapping marginal intervals in Table 1 do not "
    "mean 'no difference', and separate ones do not prove one."
)
LESION_SIZE = (
    "Where the pyramid helps: each model minus its reference on the localised findings, split "
    "by the size of the planted lesion (the area of the image's largest box of the finding, in "
    "the box list's pixels; size_bin 1 = the smallest third of that finding's boxed positive "
    "test images). Each bin's positives are ranked against every negative test image, so the "
    "AUROCs of one finding differ only in which lesions they must find. Paired patient "
    "bootstrap (seed s with seed s, the same resamples for both models), conditional on the "
    "trained weights like the paired comparison; a bin with few positive_patients says little."
)
LONG_TAIL = (
    "Findings grouped by training prevalence (reporting.long_tail); group means of "
    "AUROC, AUPRC — named mAP, as the CXR-LT challenges do: the mean over the "
    "group's findings of the average precision — and balanced accuracy (0.5 = a "
    "model that says 'absent' everywhere), with 95% patient-bootstrap intervals of "
    "the group mean; the row 'all' averages every finding (the challenges' overall "
    "mAP; equal to Table 1's macro AUPRC). Every resample averages the group's "
    "findings defined on test, and <metric>_resamples_dropped counts the resamples "
    "that lost one of them."
)
METHOD_COMPARISON = (
    "What a long-tail method (a loss, a decoupled head; docs/training.md) is meant to change, "
    "each model minus its reference on the same test patients: mAP over all findings and over "
    "the tail findings (the mean AUPRC, the CXR-LT challenges' score), the tail's mean AUROC, "
    "and the macro expected calibration error of the raw scores (lower is better). Paired "
    "patient bootstrap (the same resamples for both models; seed s with seed s), Holm-adjusted "
    "across the models compared on one metric (p_holm); better = the side the difference "
    "favours where p_holm < 1 - confidence, else neither. Tail: fewer training positives than "
    "reporting.long_tail.tail_max."
)
RANKING = (
    "The CXR-LT challenges rank entries by mAP (the mean over findings of the average "
    "precision, AUPRC); here the models are ranked by the mean over the TAIL findings "
    "of the AUPRC (mAP) and of the AUROC, best first. A rank is not a finding: each "
    "model is compared with the leader (rank 1) by the paired patient bootstrap of the "
    "tail mean (same test patients and resamples for both; seed s paired with seed s, "
    "seeds = how many), Holm-adjusted across the models (p_holm); "
    "differs_from_leader = p_holm < 1 - confidence. Models whose difference is not "
    "significant share the lead in all but name. value and its interval are the "
    "primary seed's (long_tail.csv); resamples_dropped counts resamples that drew no "
    "positive patient of a tail finding."
)
LONG_TAIL_FINDINGS = (
    "reliable = at least {min_positives} positive test PATIENTS "
    "(test_positive_patients; test_positives counts films); cells of findings with "
    "fewer are estimates from a handful of cases and their intervals are not to be "
    "trusted (reporting.min_positives)."
)
SUBGROUPS = (
    "Per-finding rows are in subgroups.csv. View (AP/PA) is confounded with "
    "illness in NIH: AP films come from sicker, often bedridden patients."
)
UNDERDIAGNOSIS = (
    "Seyyed-Kalantari et al. (Nat Med 2021) found chest X-ray classifiers predict "
    "'no finding' for sick patients of some groups more often. Here: a film is called "
    "abnormal when any of the 14 findings is at or above its validation threshold; "
    "underdiagnosis_rate = sick films (at least one positive label) called normal / "
    "sick films, per subgroup (reporting.subgroups: sex as recorded, age bands; "
    "'unknown' = missing or implausible) and overall (all); gap = subgroup - overall "
    "(positive: underdiagnosed more often). Intervals: the patient bootstrap over all "
    "test patients, the subgroup's and the overall rate computed in the same resample "
    "(so the gap's interval is paired); where the rate's bootstrap degenerates (0, 1, "
    "or few sick patients) the interval column names the binomial interval used. "
    "reliable: at least reporting.min_positives sick patients in the subgroup."
)
CALIBRATION = (
    "Expected calibration error (ECE) per finding on test: the images in bins by "
    "predicted probability (reporting.calibration: 15 equal-mass bins by default), "
    "ECE = sum over bins of (share of images) x |observed positive rate - mean "
    "probability|; 0 = a probability means what it says. Raw: the model's scores. "
    "Calibrated: sigmoid(logit(p) / T) with one temperature T per finding fitted on "
    "the VALIDATION split (minimum negative log-likelihood; T > 1 softens "
    "overconfident scores; empty T: no validation positive, the calibrated score is "
    "the raw one). Temperature scaling keeps the order of the scores: AUROC, AUPRC and "
    "the decisions are unchanged. Intervals: the patient bootstrap (ece_delta = "
    "calibrated - raw, paired in each resample); ECE is biased upwards, and for a "
    "well-calibrated finding its interval can lie above the estimate. reliable: at "
    "least {min_positives} positive test patients. The model bundle carries the "
    "temperatures: inference writes <finding>_calibrated next to each raw probability."
)
CALIBRATION_COLUMNS = [
    "model",
    "finding",
    "test_positive_patients",
    "reliable",
    "temperature",
    "ece_raw",
    "ece_raw_ci_low",
    "ece_raw_ci_high",
    "ece_calibrated",
    "ece_calibrated_ci_low",
    "ece_calibrated_ci_high",
    "ece_delta",
    "ece_delta_ci_low",
    "ece_delta_ci_high",
    "test_nll_raw",
    "test_nll_calibrated",
]
EXPERT = (
    "The same test images scored against NIH's text-mined labels and against "
    "radiologists' labels for 4 findings: Pneumothorax; Nodule or mass = max(Nodule, "
    "Mass); Airspace opacity = max(Consolidation, Infiltration, Pneumonia, Edema); "
    "Fracture has no NIH finding. A gap between the two AUROCs is what label noise "
    "does to the measured numbers. On the phantom the expert file holds the planted "
    "truth and phantom.label_noise perturbs only NIH-style labels."
)
LOCALISATION = (
    "Per model, CAM layer (one per scale for the multi-scale model) and finding: "
    "hit_rate = hits / ALL boxed positives (pointing game: the Grad-CAM maximum "
    "inside the box), an all-zero or non-finite map counting as a miss; undecided = "
    "such maps; hit_rate_decided = hits / decided boxes only (higher: it leaves out "
    "the images where the model looked nowhere). energy = mean share of the map "
    "inside the box. 95% patient-bootstrap intervals (hit_ci_* for hit_rate)."
)
CLASS_WEIGHTS = (
    "Balanced class weights (the paper): BCE pos_weight = negatives / positives of each "
    "finding in the training split, capped at training.loss.pos_weight_cap. 'capped' "
    "lists the findings whose balanced weight exceeds the cap, with that uncapped "
    "weight (from the training split's label counts in the data section); they trained "
    "with the cap instead. docs/training.md says why the cap exists."
)


def _present(table: pd.DataFrame | None) -> bool:
    return table is not None and bool(len(table))


def analysis_sections(
    tables: Mapping[str, pd.DataFrame | None], min_positives: int
) -> list[Section]:
    """The sections whose table is present and not empty, in reading order. `tables` by the
    report node's input names (`paired_comparison`, `lesion_size_delta`, `long_tail`, ...,
    `class_weights`)."""
    t = dict(tables)
    candidates: list[tuple[str, str, Any, Any]] = [
        ("Paired comparison", PAIRED, t.get("paired_comparison"), _round3),
        (
            "Paired comparison by planted lesion size",
            LESION_SIZE,
            t.get("lesion_size_delta"),
            _round3,
        ),
        (
            "Long tail: head / medium / tail findings",
            LONG_TAIL,
            t.get("long_tail"),
            lambda df: read_group_table(df).round(3),
        ),
        (
            "Long tail: ranking by tail mAP and tail AUROC",
            RANKING,
            t.get("long_tail_ranking"),
            _round3,
        ),
        (
            "Long-tail methods: each model against its reference",
            METHOD_COMPARISON,
            t.get("method_comparison"),
            lambda df: df.round(4),
        ),
        (
            "Per finding: balanced accuracy, specificity, sensitivity at fixed specificity",
            LONG_TAIL_FINDINGS.format(min_positives=min_positives),
            t.get("long_tail_findings"),
            _round3,
        ),
        (
            "Subgroups: macro AUROC by sex, view and age band",
            SUBGROUPS,
            t.get("subgroups"),
            lambda df: df[df["finding"] == "macro"].round(3),
        ),
        (
            "Underdiagnosis by sex and age (the 'any finding' decision)",
            UNDERDIAGNOSIS,
            t.get("underdiagnosis"),
            _round3,
        ),
        (
            "Calibration: raw and temperature-scaled probabilities",
            CALIBRATION.format(min_positives=min_positives),
            t.get("calibration"),
            lambda df: df[CALIBRATION_COLUMNS].round(4),
        ),
        (
            "Expert labels (Google 2019) against NIH's labels",
            EXPERT,
            t.get("expert_labels"),
            _round3,
        ),
        ("Localisation on every boxed test image", LOCALISATION, t.get("localisation"), _round3),
        ("Class weights (training.loss)", CLASS_WEIGHTS, t.get("class_weights"), lambda df: df),
    ]
    return [
        Section(title, text, shown(table))
        for title, text, table, shown in candidates
        if _present(table)
    ]


def _round3(df: pd.DataFrame) -> pd.DataFrame:
    return df.round(3)
