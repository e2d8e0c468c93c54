"""Who is in the phantom and what they have — labels, anatomy, poses, lesions; no pixels.

Label logic never needs pixels (a project principle), so everything a label, a split or a
box depends on is sampled here, cheaply; `render.py` turns one `ImagePlan` into pixels later,
lazily. That separation also lets the tests check prevalences on thousands of patients
without rendering a single image.

Determinism: every random stream is a `numpy.random.SeedSequence(seed, spawn_key=...)` keyed
by *what* it is for (patient, image, finding), never by draw order, so a patient's films are
identical whatever else is generated, in whatever order or process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rare_cxr.findings import FINDINGS, NIH_PREVALENCE
from rare_cxr.phantom.anatomy import Anatomy, Pose, sample_anatomy, sample_pose
from rare_cxr.phantom.lesions import MODELS, Lesion
from rare_cxr.phantom.params import MAX_PREVALENCE, PhantomParams
from rare_cxr.stratification import iterative_stratification

# Stream ids (first element of a spawn key).
_PATIENT, _IMAGE, _RENDER, _SPLIT, _CHRONIC_LESION, _ACUTE_LESION, _FORCE = range(1, 8)

# Chronic findings persist across a patient's follow-ups (same lesion, same place); acute ones
# come and go. Persistence rho keeps each image's marginal prevalence exactly p: with
# probability rho the patient has one state for all films, otherwise each film draws its own.
CHRONIC = frozenset(
    {"Cardiomegaly", "Emphysema", "Fibrosis", "Hernia", "Mass", "Nodule", "Pleural_Thickening"}
)
PERSISTENCE = {name: (0.9 if name in CHRONIC else 0.4) for name in FINDINGS}

AP_PROBABILITY = 0.4  # NIH: 40 % of films are AP
MALE_PROBABILITY = 0.565  # NIH: 56.5 % male


def rng_for(seed: int, *key: int) -> np.random.Generator:
    """An independent generator for one purpose (see module docstring)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def prevalences(params: PhantomParams) -> dict[str, float]:
    """Per-image probability of each finding: NIH's, scaled, capped at MAX_PREVALENCE."""
    return {
        name: min(MAX_PREVALENCE, NIH_PREVALENCE[name] * params.prevalence_scale)
        for name in FINDINGS
    }


@dataclass(frozen=True)
class ImagePlan:
    """Everything about one film except its pixels."""

    image_id: str
    patient_id: int
    follow_up: int
    age: int
    sex: str
    view: str
    findings: tuple[str, ...]  # what is planted (truth), FINDINGS order
    recorded: tuple[str, ...]  # what the label table says (after label noise)
    anatomy: Anatomy  # already modified by the findings
    pose: Pose
    lesions: tuple[Lesion, ...]
    seed: int


def image_id(patient_id: int, follow_up: int) -> str:
    return f"{patient_id:08d}_{follow_up:03d}.png"


def _noisy_labels(
    truth: tuple[str, ...], p: dict[str, float], rate: float, rng: np.random.Generator
) -> tuple[str, ...]:
    """Report-mining style noise: a positive is missed with probability `rate`; a negative is
    reported with probability rate*p/(1-p), which keeps each recorded prevalence at p."""
    draws = rng.random(len(FINDINGS))
    if rate == 0:
        return truth
    recorded = []
    for name, u in zip(FINDINGS, draws, strict=True):
        if name in truth:
            keep = u >= rate
        else:
            keep = u < min(1.0, rate * p[name] / max(1e-12, 1 - p[name]))
        if keep:
            recorded.append(name)
    return tuple(recorded)


def sample_patient(
    params: PhantomParams, patient_id: int, forced: frozenset[str] = frozenset()
) -> list[ImagePlan]:
    """All films of one patient (shared anatomy, persistent chronic findings).

    `forced` findings are given to the patient as persistent (every film), used to guarantee
    a minimum number of positive patients per finding in small datasets.
    """
    p = prevalences(params)
    rng = rng_for(params.seed, _PATIENT, patient_id)
    base_anatomy = sample_anatomy(rng)
    age0 = int(np.clip(round(rng.normal(47, 17)), 1, 94))
    sex = "M" if rng.random() < MALE_PROBABILITY else "F"
    n_images = int(rng.integers(params.min_images, params.max_images + 1))
    years_per_film = rng.uniform(0.0, 0.6)
    persistent = rng.random(len(FINDINGS)) < np.array([PERSISTENCE[f] for f in FINDINGS])
    patient_state = rng.random(len(FINDINGS)) < np.array([p[f] for f in FINDINGS])
    for index, name in enumerate(FINDINGS):
        if name in forced:
            persistent[index] = patient_state[index] = True
    chronic_lesions: dict[str, Lesion] = {}
    for index, name in enumerate(FINDINGS):
        if persistent[index] and patient_state[index]:
            lesion_rng = rng_for(params.seed, _CHRONIC_LESION, patient_id, index)
            chronic_lesions[name] = MODELS[name].sample(lesion_rng, base_anatomy)

    plans = []
    for follow_up in range(n_images):
        img_rng = rng_for(params.seed, _IMAGE, patient_id, follow_up)
        pose = sample_pose(img_rng, AP_PROBABILITY)
        own_state = img_rng.random(len(FINDINGS)) < np.array([p[f] for f in FINDINGS])
        lesions = []
        for index, name in enumerate(FINDINGS):
            if persistent[index]:
                if patient_state[index]:
                    lesions.append(chronic_lesions[name])
            elif own_state[index]:
                lesion_rng = rng_for(params.seed, _ACUTE_LESION, patient_id, follow_up, index)
                lesions.append(MODELS[name].sample(lesion_rng, base_anatomy))
        truth = tuple(lesion.finding for lesion in lesions)
        recorded = _noisy_labels(truth, p, params.label_noise, img_rng)
        anatomy = base_anatomy
        for lesion in lesions:
            anatomy = MODELS[lesion.finding].modify(anatomy, lesion)
        plans.append(
            ImagePlan(
                image_id=image_id(patient_id, follow_up),
                patient_id=patient_id,
                follow_up=follow_up,
                age=min(99, age0 + int(follow_up * years_per_film)),
                sex=sex,
                view=pose.view,
                findings=truth,
                recorded=recorded,
                anatomy=anatomy,
                pose=pose,
                lesions=tuple(lesions),
                seed=params.seed,
            )
        )
    return plans


def sample_cohort(params: PhantomParams) -> list[ImagePlan]:
    """Every film of the phantom, sorted by image id (patients are numbered 1..n).

    A finding planted in fewer than `min_patients_per_finding` patients (Hernia, in a small
    phantom) is added, persistently, to patients drawn from a stream of its own until the
    minimum is met: without it a class could have no positives at all and its AUROC would be
    undefined. The bias is negligible once the data is large enough to meet the minimum alone.
    """
    by_patient = {pid: sample_patient(params, pid) for pid in range(1, params.n_patients + 1)}
    forced: dict[int, set[str]] = {}
    minimum = min(params.min_patients_per_finding, params.n_patients)
    for index, name in enumerate(FINDINGS):
        positive = {
            pid for pid, films in by_patient.items() if any(name in f.findings for f in films)
        }
        if len(positive) >= minimum:
            continue
        order = rng_for(params.seed, _FORCE, index).permutation(params.n_patients) + 1
        extra = [int(pid) for pid in order if int(pid) not in positive]
        for pid in extra[: minimum - len(positive)]:
            forced.setdefault(pid, set()).add(name)
    for pid, names in forced.items():
        by_patient[pid] = sample_patient(params, pid, frozenset(names))
    return [plan for pid in sorted(by_patient) for plan in by_patient[pid]]


def split_patients(params: PhantomParams, plans: Sequence[ImagePlan]) -> set[int]:
    """Patient ids of the official-style test list (patient-disjoint by construction).

    Stratified by patient over the recorded findings, as a curated test list would be, so that
    every finding present in at least two patients has a positive patient in the test list and
    in train/val (a random list of ~30 patients often misses Hernia, leaving its test AUROC
    undefined).
    """
    n = params.n_patients
    n_test = round(params.test_fraction * n)
    if params.test_fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    if n_test == 0:
        return set()
    counts = np.zeros((n, len(FINDINGS)))
    sizes = np.zeros(n)
    for plan in plans:
        row = plan.patient_id - 1
        sizes[row] += 1
        for name in plan.recorded:
            counts[row, FINDINGS.index(name)] += 1
    fraction = n_test / n
    seed = int(rng_for(params.seed, _SPLIT).integers(2**31))
    assignment = iterative_stratification(counts, sizes, (1 - fraction, fraction), seed)
    return {row + 1 for row in np.flatnonzero(assignment == 1).tolist()}


def render_seed_key(plan: ImagePlan) -> tuple[int, ...]:
    """Spawn key of a film's pixel noise (textures, quantum noise)."""
    return (_RENDER, plan.patient_id, plan.follow_up)
