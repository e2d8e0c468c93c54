"""Size `conf/phantom_study` (issue 18 item 8): test patients needed to separate the ablation pair,
and what that costs on 2 CPU cores. Prints the arithmetic that docs/results.md quotes.

    python bench/power_ablation.py                       # the defaults: docs/results.md's figures
    python bench/power_ablation.py --delta 0.05 --patients 1000

Inputs (defaults, all from docs/results.md "The ablation pair, three seeds" and "Phantom results",
and the team's stack notes' CPU costs, measured on this project's 2-core machines, which
docs/benchmarks.md's img/s agree with):

* the paired macro ΔAUROC interval of the default run (seed 42): [-0.070, 0.080] on 33 test
  patients -> SE0 by `power.se_from_interval`;
* the per-seed differences +0.030, +0.206, -0.002 (seeds 42-44) -> the sd between retrainings;
* the default phantom: 160 patients, 331 films; 238 train / 26 validation films; test 33
  patients (test_fraction 0.2);
* training cost per image, 2 threads, resnet18, batch 16: 114 ms / 16 at 64 px and 335 ms / 16
  at 128 px, so the pyramid [64, 128] costs (114 + 335) / 16 = 28.1 ms and the single scale
  [128] 20.9 ms; a forward pass (validation, test) ~0.4 of a training step (the profile in
  docs/benchmarks.md: forward 9.2 s of 23.7 s forward + backward + Adam);
* 8 epochs (the maximum; early stopping can only shorten it), 3 seeds.

The estimate leaves out the phantom generation, the image cache and the reporting pipeline
(Grad-CAM on every boxed test image, bootstraps): not measured at this size.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rare_cxr.evaluation import power  # noqa: E402 -- after the path set-up, as bench/common

# the default run (docs/results.md)
FILMS_PER_PATIENT = 331 / 160
TRAIN_FILMS_PER_PATIENT = 238 / 160
VAL_FILMS_PER_PATIENT = 26 / 160
TEST_FILMS_PER_PATIENT = 67 / 160
# seconds per image of one training step, multi [64, 128] + single [128] (STACK-NOTES)
PAIR_TRAIN_S_PER_IMAGE = (114 + 335) / 16 / 1000 + 335 / 16 / 1000
FORWARD_SHARE = 0.4
# docs/phantom.md: a median 12 ms of CPU per 256-px film
RENDER_S_PER_FILM = 0.012
# docs/results.md: the default run's pipeline took 122 s on a quiet machine (160 patients, 1 seed)
DEFAULT_RUN_S, DEFAULT_PATIENTS = 122.0, 160


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--delta", type=float, default=0.03, help="ΔAUROC to detect (default 0.03)")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--power", type=float, default=0.80)
    p.add_argument(
        "--ci",
        type=float,
        nargs=2,
        default=(-0.070, 0.080),
        metavar=("LOW", "HIGH"),
        help="a 95%% paired interval",
    )
    p.add_argument("--test-patients", type=int, default=33, help="patients behind --ci")
    p.add_argument("--per-seed", type=float, nargs="+", default=(0.030, 0.206, -0.002))
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument(
        "--patients",
        type=int,
        default=None,
        help="phantom size to cost (default: the required one)",
    )
    return p.parse_args(argv)


def training_minutes(n_patients: int, seeds: int, epochs: int) -> float:
    """Upper bound on the pair's training + validation + test prediction, minutes."""
    per_epoch = (
        n_patients
        * (TRAIN_FILMS_PER_PATIENT + FORWARD_SHARE * VAL_FILMS_PER_PATIENT)
        * PAIR_TRAIN_S_PER_IMAGE
    )
    test = n_patients * TEST_FILMS_PER_PATIENT * FORWARD_SHARE * PAIR_TRAIN_S_PER_IMAGE
    return seeds * (epochs * per_epoch + test) / 60.0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    z = power.z_sum(a.alpha, a.power)
    se0 = power.se_from_interval(*a.ci)
    need = power.required_units(a.delta, se0, a.test_patients, a.alpha, a.power)
    sd = power.seed_sd(a.per_seed)
    seeds_needed = power.required_units(a.delta, sd, 1, a.alpha, a.power)
    patients = a.patients or 10 * math.ceil(need / a.test_fraction / 10)
    tested = round(patients * a.test_fraction)
    films = patients * FILMS_PER_PATIENT
    detectable = power.detectable_delta(tested, se0, a.test_patients, a.alpha, a.power)
    scaled = DEFAULT_RUN_S * patients / DEFAULT_PATIENTS * a.seeds / 60
    lines = [
        f"SE0 = ({a.ci[1]:+.3f} - {a.ci[0]:+.3f}) / (2 x 1.960) = {se0:.4f}"
        f" on {a.test_patients} test patients",
        f"z_(1-alpha/2) + z_power = {z:.4f} (alpha {a.alpha}, power {a.power})",
        f"test patients for ΔAUROC {a.delta}: {a.test_patients} x ({z:.4f} x {se0:.4f}"
        f" / {a.delta})^2 -> {need}",
        f"phantom patients: {need} / {a.test_fraction} rounded up to 10 -> {patients}"
        f" (~{films:,.0f} films, {tested} test patients)",
        f"detectable ΔAUROC with {tested} test patients: {detectable:.4f}",
        f"seed sd of the differences {list(a.per_seed)}: {sd:.4f};"
        f" seeds for ΔAUROC {a.delta} across retrainings: {seeds_needed}",
        f"pair training upper bound, {a.seeds} seeds x {a.epochs} epochs:"
        f" {training_minutes(patients, a.seeds, a.epochs):.1f} min",
        f"phantom rendering: {films:,.0f} films x 12 ms = {films * RENDER_S_PER_FILM / 60:.1f} min",
        f"cross-check, the measured default run scaled linearly in patients and seeds:"
        f" {DEFAULT_RUN_S:.0f} s x {patients}/{DEFAULT_PATIENTS} x {a.seeds} = {scaled:.1f} min",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
