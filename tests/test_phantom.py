"""The synthetic phantom: determinism, the NIH layout byte for byte, prevalences, boxes, guard."""

from __future__ import annotations

import csv
import hashlib
import io
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rare_cxr.datasets import ImageFolderDataset, RawTextDataset
from rare_cxr.findings import FINDING_ALIASES, FINDINGS, NIH_PREVALENCE, NO_FINDING
from rare_cxr.ownership import PHANTOM_MARKER
from rare_cxr.phantom import (
    lesion_boxes,
    prevalences,
    render_image,
    sample_cohort,
    split_patients,
    validate_params,
)
from rare_cxr.phantom.writer import BBOX_HEADER, DATA_ENTRY_HEADER
from rare_cxr.pipelines.phantom.nodes import generate_phantom

TINY = {"n_patients": 12, "images_per_patient": [1, 3], "image_size": 64, "seed": 7}
NIH_NAME = re.compile(r"^(\d{8})_(\d{3})\.png$")


def write_phantom(root: Path, params: dict) -> dict:
    """Run the node and save its outputs the way the catalog does (NIH file names)."""
    data_entry, train_val, test, bbox, expert, images, summary = generate_phantom(params)
    for name, text in (
        ("Data_Entry_2017_v2020.csv", data_entry),
        ("train_val_list.txt", train_val),
        ("test_list.txt", test),
        ("BBox_List_2017.csv", bbox),
        ("google2019_nih-chest-xray-labels.csv", expert),
    ):
        RawTextDataset(filepath=str(root / name)).save(text)
    ImageFolderDataset(str(root)).save(images)
    return summary


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != PHANTOM_MARKER  # the marker records its creation time
    }


@pytest.fixture(scope="module")
def tiny_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantom") / "a"
    write_phantom(root, TINY)
    return root


# --- parameters -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"n_patients": -3}, "phantom.n_patients: expected a value >= 1, got -3"),
        ({"n_patients": True}, "phantom.n_patients: expected an integer, got True"),
        ({"image_size": 16}, "phantom.image_size: expected a value >= 32, got 16"),
        (
            {"images_per_patient": [3, 1]},
            "phantom.images_per_patient: expected 1 <= min <= max <= 1000, got [3, 1]",
        ),
        (
            {"images_per_patient": "two"},
            "phantom.images_per_patient: expected a positive integer (the maximum) or a [min, max]",
        ),
        ({"prevalence_scale": 0}, "phantom.prevalence_scale: expected a value > 0.0, got 0"),
        ({"label_noise": 1.0}, "phantom.label_noise: expected a value < 1.0, got 1.0"),
        ({"test_fraction": -0.1}, "phantom.test_fraction: expected a value >= 0.0, got -0.1"),
        ({"seed": "x"}, "phantom.seed: expected an integer, got 'x'"),
        ({"enabled": "yes"}, "phantom.enabled: expected true or false, got 'yes'"),
        ({"n_patient": 5}, "phantom.n_patient: unknown key (did you mean 'n_patients'?)"),
    ],
)
def test_invalid_parameters_name_the_key(override: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        generate_phantom({**TINY, **override})


def test_images_per_patient_accepts_a_maximum() -> None:
    params = validate_params({"images_per_patient": 2})
    assert (params.min_images, params.max_images) == (1, 2)


# --- determinism ------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files(tiny_phantom: Path, tmp_path: Path) -> None:
    write_phantom(tmp_path / "b", TINY)
    first, second = digest(tiny_phantom), digest(tmp_path / "b")
    assert len(first) > 10
    assert first == second


def test_films_do_not_depend_on_generation_order() -> None:
    params = validate_params(TINY)
    plans = sample_cohort(params)
    forward = [render_image(p, 64).tobytes() for p in plans]
    backward = [render_image(p, 64).tobytes() for p in reversed(plans)][::-1]
    assert forward == backward


def test_another_seed_gives_another_dataset() -> None:
    a = generate_phantom(TINY)
    b = generate_phantom({**TINY, "seed": 8})
    assert a[0] != b[0]
    first = sorted(a[5])[0]
    assert a[5][first]().tobytes() != b[5][first]().tobytes()


# --- NIH layout -------------------------------------------------------------------------


def test_nih_layout(tiny_phantom: Path) -> None:
    entry = (tiny_phantom / "Data_Entry_2017_v2020.csv").read_text()
    lines = entry.split("\n")
    assert lines[0] == DATA_ENTRY_HEADER
    assert entry.endswith("\n")
    rows = [line.split(",") for line in lines[1:-1]]
    assert rows and all(len(row) == 11 for row in rows)

    images = sorted(p.name for p in (tiny_phantom / "images").iterdir())
    assert [row[0] for row in rows] == images
    for name, labels, follow_up, patient, age, sex, view, w, h, sx, sy in rows:
        match = NIH_NAME.match(name)
        assert match, name
        assert int(match[1]) == int(patient) and int(match[2]) == int(follow_up)
        found = labels.split("|")
        assert labels == NO_FINDING or (found == sorted(found) and set(found) <= set(FINDINGS))
        assert 1 <= int(age) <= 99 and sex in {"M", "F"} and view in {"PA", "AP"}
        assert (int(w), int(h)) == (64, 64) and float(sx) == float(sy) > 0
        with Image.open(tiny_phantom / "images" / name) as img:
            assert img.mode == "L" and img.size == (64, 64)

    train_val = (tiny_phantom / "train_val_list.txt").read_text()
    test = (tiny_phantom / "test_list.txt").read_text()
    for text in (train_val, test):
        assert text and not text.endswith("\n")
        assert text.split("\n") == sorted(text.split("\n"))
    train_ids, test_ids = train_val.split("\n"), test.split("\n")
    assert sorted(train_ids + test_ids) == images
    patient = {name: name[:8] for name in images}
    assert not {patient[i] for i in train_ids} & {patient[i] for i in test_ids}


def test_bbox_list_matches_planted_findings(tiny_phantom: Path) -> None:
    text = (tiny_phantom / "BBox_List_2017.csv").read_text()
    assert text.split("\n")[0] == BBOX_HEADER
    assert "Infiltration" not in text
    rows = list(csv.reader(io.StringIO(text)))[1:]
    assert rows and all(len(row) == 6 for row in rows)
    boxed: dict[str, set[str]] = {}
    for image, label, *numbers in rows:
        x, y, w, h = map(float, numbers)
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 64 and y + h <= 64
        boxed.setdefault(image, set()).add(FINDING_ALIASES.get(label, label))
    entries = list(
        csv.reader(io.StringIO((tiny_phantom / "Data_Entry_2017_v2020.csv").read_text()))
    )
    planted = {row[0]: set(row[1].split("|")) - {NO_FINDING} for row in entries[1:]}
    assert boxed == {k: v for k, v in planted.items() if v}


def test_lesions_have_their_own_scale() -> None:
    """A Nodule is a few px at 256 (below resolution at 64), a Mass several times larger."""
    params = validate_params({"n_patients": 300, "image_size": 256, "prevalence_scale": 3})
    widths: dict[str, list[float]] = {"Nodule": [], "Mass": [], "Cardiomegaly": []}
    for plan in sample_cohort(params)[:300]:
        for name, _, _, w, _ in lesion_boxes(plan, 256):
            if name in widths:
                widths[name].append(w)
    assert 2 <= np.median(widths["Nodule"]) <= 6
    assert np.median(widths["Mass"]) > 3 * np.median(widths["Nodule"])
    assert np.median(widths["Cardiomegaly"]) > 0.5 * 256 * 0.8  # CTR > 0.5 of the rib cage


# --- labels without pixels --------------------------------------------------------------


def test_prevalences_follow_nih_scaled_and_capped() -> None:
    params = validate_params(
        {"n_patients": 1000, "prevalence_scale": 4.0, "min_patients_per_finding": 0}
    )
    expected = prevalences(params)
    assert expected["Infiltration"] == 0.5  # capped
    assert expected["Hernia"] == pytest.approx(4 * NIH_PREVALENCE["Hernia"])
    plans = sample_cohort(params)  # no pixels rendered
    n = len(plans)
    for name in FINDINGS:
        observed = sum(name in p.findings for p in plans) / n
        p = expected[name]
        # films of one patient are correlated: allow 4 sd with patients as the unit
        assert abs(observed - p) <= 4 * math.sqrt(p * (1 - p) / params.n_patients), name


def test_label_noise_changes_labels_not_prevalence() -> None:
    params = validate_params(
        {"n_patients": 1000, "label_noise": 0.2, "min_patients_per_finding": 0}
    )
    plans = sample_cohort(params)
    n = len(plans)
    assert sum(p.recorded != p.findings for p in plans) > 0.2 * n
    for name in ("Infiltration", "Effusion", "Atelectasis"):
        recorded = sum(name in p.recorded for p in plans) / n
        planted = sum(name in p.findings for p in plans) / n
        assert abs(recorded - planted) < 0.03, name


def test_follow_ups_share_anatomy_and_chronic_findings() -> None:
    params = validate_params({"n_patients": 200, "images_per_patient": [3, 3]})
    plans = sample_cohort(params)
    by_patient: dict[int, list] = {}
    for plan in plans:
        by_patient.setdefault(plan.patient_id, []).append(plan)
    persistent = 0
    for films in by_patient.values():
        assert len({f.anatomy.thorax_half_width for f in films}) == 1
        assert len({(f.sex, f.patient_id) for f in films}) == 1
        for name in ("Nodule", "Mass"):
            lesions = [lesion for f in films for lesion in f.lesions if lesion.finding == name]
            if len(lesions) == 3 and lesions[0] == lesions[1] == lesions[2]:
                persistent += 1
    assert persistent >= 5


def test_rare_findings_get_a_minimum_of_patients() -> None:
    params = validate_params({"n_patients": 20, "min_patients_per_finding": 2})
    plans = sample_cohort(params)
    for name in FINDINGS:
        assert len({p.patient_id for p in plans if name in p.findings}) >= 2, name


def test_split_is_patient_level_and_never_empty() -> None:
    params = validate_params({"n_patients": 3, "test_fraction": 0.01})
    assert len(split_patients(params, sample_cohort(params))) == 1


def test_test_list_holds_every_finding_with_two_or_more_patients() -> None:
    params = validate_params({"n_patients": 60, "min_patients_per_finding": 3})
    plans = sample_cohort(params)
    test = split_patients(params, plans)
    assert abs(len(test) - round(params.test_fraction * 60)) <= 3
    for name in FINDINGS:
        patients = {p.patient_id for p in plans if name in p.recorded}
        if len(patients) >= 2:
            assert patients & test, f"{name} has no positive patient in the test list"
            assert patients - test, f"{name} has no positive patient in train/val"


# --- environments and Kedro -------------------------------------------------------------


def test_disabled_generator_refuses_before_writing() -> None:
    with pytest.raises(ValueError, match=r"kedro run --env nih --pipelines nih"):
        generate_phantom({"enabled": False})


@pytest.mark.slow
def test_nih_environment_refuses_to_generate(kedro_project) -> None:
    with pytest.raises(ValueError, match=r"phantom.enabled is false"):
        kedro_project.run(pipeline="phantom", env="nih")
    assert not any(kedro_project.data("01_raw", env="nih").iterdir())  # nothing written


@pytest.mark.slow
def test_kedro_run_pipeline_phantom(kedro_project) -> None:
    kedro_project.run(
        pipeline="phantom",
        # what `--params phantom.n_patients=8,...` becomes (the CLI nests dotted keys)
        params={"phantom": {"n_patients": 8, "image_size": 64, "images_per_patient": 2}},
    )
    root = kedro_project.data("01_raw", "phantom")
    for name in ("Data_Entry_2017_v2020.csv", "train_val_list.txt", "test_list.txt"):
        assert (root / name).is_file(), name
    assert (root / "BBox_List_2017.csv").read_text().startswith(BBOX_HEADER)
    images = list((root / "images").glob("*.png"))
    rows = (root / "Data_Entry_2017_v2020.csv").read_text().strip().split("\n")[1:]
    assert len(images) == len(rows) >= 8
    reports = kedro_project.data("08_reporting", "phantom").rglob("summary.json")
    summaries = [p for p in reports if p.is_file()]  # versioned: summary.json/<version>/
    assert len(summaries) == 1 and '"synthetic": true' in summaries[0].read_text()


def test_boxed_images_keeps_the_boxes_of_that_many_films_drawn_with_the_seed() -> None:
    """`boxed_images` (conf/rehearsal: NIH's 880) caps the films listed in BBox_List, keeping
    all boxes of each kept film; the draw is seeded, and null keeps every film's boxes."""

    def boxed(**over: object) -> list[list[str]]:
        params = {"n_patients": 60, "images_per_patient": [1, 3], "image_size": 64, **over}
        rows = list(csv.reader(io.StringIO(generate_phantom(params)[3])))[1:]
        return rows

    every = boxed()
    films = {r[0] for r in every}
    assert len(films) > 10
    capped = boxed(boxed_images=10)
    assert len({r[0] for r in capped}) == 10 and {r[0] for r in capped} <= films
    for film in {r[0] for r in capped}:  # a kept film keeps all of its boxes
        assert [r for r in capped if r[0] == film] == [r for r in every if r[0] == film]
    assert boxed(boxed_images=10) == capped
    assert boxed(boxed_images=10, seed=7) != capped
    assert boxed(boxed_images=10_000) == every
