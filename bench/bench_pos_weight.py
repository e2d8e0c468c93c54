"""pos_weight capped at 100 vs the uncapped balanced weight, on a small synthetic problem.

Why: the paper trains with balanced class weights (BCE `pos_weight` = negatives / positives),
which gives NIH's Hernia ~613 on the official train_val list; `training.loss.pos_weight_cap`
(100 in conf/base) lowers it. docs/training.md ("Class weights") decides conf/nih's value from
these figures.

The problem: 32 Gaussian features, two findings -- a common one (~10%, depends on features 0-3)
and a rare one (~0.2%, Hernia-like, depends on features 4-7, noisier) -- learnt by one shared
hidden layer (64 ReLU units) and a 2-way head, BCE with the common finding's balanced weight and
the rare finding's either capped at 100 or balanced, Adam (lr 1e-3, weight decay 1e-4), batch
64, 3 epochs over 100,000 training rows. Per seed: test AUROC of both findings on 200,000 fresh
rows, the median gradient norm of the shared layer in batches with a rare positive over batches
without one, the largest step's gradient norm over the median, and the mean predicted rare
probability against its prevalence (calibration).

Usage:
  .venv/bin/python bench/bench_pos_weight.py [--seeds 0 1 2] [--quick] [--output results.jsonl]

JSON lines on stdout (and appended to --output); a table on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import emit, format_table, machine_info  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

CAP = 100.0


def make(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Features `[n, 32]` and labels `[n, 2]` (common ~10%, rare ~0.2%)."""
    x = rng.normal(size=(n, 32)).astype(np.float32)
    common = (x[:, :4].sum(1) + rng.normal(scale=2.0, size=n)) > 2.6
    rare = (x[:, 4:8].sum(1) + rng.normal(scale=3.0, size=n)) > 10.4
    return x, np.stack([common, rare], 1).astype(np.float32)


def run(cap: float | None, seed: int, *, n_train: int, n_test: int, epochs: int) -> dict[str, Any]:
    """One training with the rare finding's pos_weight capped at `cap` (None = uncapped)."""
    rng = np.random.default_rng(seed)
    xtr, ytr = make(n_train, rng)
    xte, yte = make(n_test, np.random.default_rng(10_000 + seed))
    neg_pos = (len(ytr) - ytr.sum(0)) / np.maximum(ytr.sum(0), 1)
    weights = neg_pos if cap is None else np.minimum(neg_pos, cap)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(weights, dtype=torch.float32))
    x, y = torch.from_numpy(xtr), torch.from_numpy(ytr)
    norms, with_rare = [], []
    for epoch in range(epochs):
        order = torch.from_numpy(np.random.default_rng(seed * 100 + epoch).permutation(len(x)))
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            opt.zero_grad()
            loss_fn(net(x[idx]), y[idx]).backward()
            norms.append(float(net[0].weight.grad.norm()))  # the shared layer
            with_rare.append(bool(y[idx, 1].any()))
            opt.step()
    with torch.no_grad():
        p = torch.sigmoid(net(torch.from_numpy(xte))).numpy()
    norms_a, rare_a = np.array(norms), np.array(with_rare)
    return {
        "case": "uncapped" if cap is None else f"cap {cap:g}",
        "seed": seed,
        "rare_pos_weight": float(weights[1]),
        "rare_train_positives": int(ytr[:, 1].sum()),
        "auroc_rare": float(roc_auc_score(yte[:, 1], p[:, 1])),
        "auroc_common": float(roc_auc_score(yte[:, 0], p[:, 0])),
        "grad_rare_batches_over_others": float(
            np.median(norms_a[rare_a]) / np.median(norms_a[~rare_a])
        ),
        "grad_max_over_median": float(norms_a.max() / np.median(norms_a)),
        "mean_p_rare": float(p[:, 1].mean()),
        "prevalence_rare": float(yte[:, 1].mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="smoke sizes (seconds)")
    parser.add_argument("--output", default=None, help="append JSON lines here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sizes = (
        {"n_train": 20_000, "n_test": 20_000, "epochs": 1}
        if args.quick
        else {"n_train": 100_000, "n_test": 200_000, "epochs": 3}
    )
    machine = machine_info()
    rows = [
        {**run(cap, seed, **sizes), "quick": args.quick, "machine": machine}
        for cap in (CAP, None)
        for seed in args.seeds
    ]
    emit(rows, args.output)
    columns = [
        "case",
        "seed",
        "rare_pos_weight",
        "auroc_rare",
        "auroc_common",
        "grad_rare_batches_over_others",
        "grad_max_over_median",
        "mean_p_rare",
        "prevalence_rare",
    ]
    print(format_table(rows, columns), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
