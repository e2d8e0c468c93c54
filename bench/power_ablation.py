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
* the default phantom: 160 patients, 331 films (2.07 per patient); validation 10% of the
  train_val images (`split.val_fraction`);
* training cost per training film and epoch, measured on 2 cores on the first attempt at
  2,110 patients (2026-12-08): the multi-scale model [64, 128] at 13.7 img/s, validation
  included (233 s an epoch for ~3,140 training films); the single-scale [128] model scaled by
  the stack notes' step times, 335 / (114 + 335) of it. The stack notes' own per-step figures
  (114 ms and 335 ms per 16 images) gave 2.6x less and an estimate that did not hold;
* 8 epochs (the maximum; early stopping can only shorten it), 3 seeds.

The power of the paired test depends on the **test** patients only, the training cost on the
training films only: `--test-fraction` (the phantom's `test_fraction`) decides both from one
phantom size. The default 0.53 keeps ~3x the default run's training films and puts 424
patients in test.
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
VAL_FRACTION = 0.1  # conf/base split.val_fraction: share of the train_val images
# seconds per training film and epoch (validation included), measured (module doc)
MULTI_TRAIN_S_PER_IMAGE = 1 / 13.7
PAIR_TRAIN_S_PER_IMAGE = MULTI_TRAIN_S_PER_IMAGE * (1 + 335 / (114 + 335))
FORWARD_SHARE = 0.4  # a forward pass vs a training step (docs/benchmarks.md's profile)
# docs/phantom.md: a median 12 ms of CPU per 256-px film
RENDER_S_PER_FILM = 0.012


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
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.53,
        help="the phantom's test_fraction (default 0.53, conf/phantom_study)",
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument(
        "--patients",
        type=int,
        default=None,
        help="phantom size to cost (default: the required one)",
    )
    return p.parse_args(argv)


def training_minutes(n_patients: int, test_fraction: float, seeds: int, epochs: int) -> float:
    """Upper bound on the pair's training (validation included) + test prediction, minutes."""
    train_val = n_patients * (1 - test_fraction) * FILMS_PER_PATIENT
    per_epoch = train_val * (1 - VAL_FRACTION) * PAIR_TRAIN_S_PER_IMAGE
    test = n_patients * test_fraction * FILMS_PER_PATIENT * FORWARD_SHARE * PAIR_TRAIN_S_PER_IMAGE
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
    train_films = patients * (1 - a.test_fraction) * FILMS_PER_PATIENT * (1 - VAL_FRACTION)
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
        f"training films: ~{train_films:,.0f} (the default run: 238)",
        f"pair training upper bound, {a.seeds} seeds x {a.epochs} epochs:"
        f" {training_minutes(patients, a.test_fraction, a.seeds, a.epochs):.1f} min",
        f"phantom rendering: {films:,.0f} films x 12 ms = {films * RENDER_S_PER_FILM / 60:.1f} min",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
