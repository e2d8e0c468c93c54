"""BatchNorm across scales: shared vs per-scale BatchNorm in the multi-scale ResNet's shared trunk.

With one trunk shared by every scale, `batchnorm: shared` (the paper) updates one set of
BatchNorm running statistics with the activations of every scale, so in eval mode each scale is
normalised with a blend that neither scale trained with; `batchnorm: per_scale` gives every
scale its own BatchNorm (affine parameters and running statistics) on the shared convolutions.

For each variant and seed this script trains the default configuration (the phantom:
`multiscale_resnet.model` and `training` as `kedro run` resolves them in conf/base, only
`multiscale_resnet.model.batchnorm` and `training.seed` changed) with `rare_cxr.training.fit` on
the image cache and augmentation policy that a default `kedro run` builds, then measures the
validation macro AUROC of the best checkpoint (the one `predict` uses) twice (and the same on
the test split, as an independent second read: the phantom's validation split is small):

* eval mode  -- BatchNorm with its running statistics (what prediction and reporting use);
* train mode -- BatchNorm with the statistics of each validation batch (`eval_batch_size`
  images, cache order; no gradients, on a copy of the model so nothing is changed).

The project folder is a temporary copy of the project (conf/ and pyproject.toml, an empty src/
and data/, as tests/conftest.py::make_project builds it); unless its image cache exists, the
script first runs `kedro run --pipelines phantom,data_processing,augmentation` there. The
checkout's data/ is never read or written.

Usage:
  .venv/bin/python bench/bench_batchnorm.py [--project DIR] [--seeds 42 43 44]
        [--variants shared per_scale] [--epochs N] [--quick] [--output results.jsonl]

JSON lines on stdout (and appended to --output), one per (variant, seed) and one summary per
variant; a table on stderr.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import emit, format_table, machine_info  # noqa: E402

from rare_cxr.models import build_model  # noqa: E402
from rare_cxr.pipelines.training.nodes import make_augmenter  # noqa: E402
from rare_cxr.training import fit  # noqa: E402
from rare_cxr.training.engine import predict_probabilities, to_batch  # noqa: E402
from rare_cxr.training.metrics import validation_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAYERS = (
    "01_raw",
    "02_intermediate",
    "03_primary",
    "05_model_input",
    "06_models",
    "07_model_output",
    "08_reporting",
)


def prepare_project(project: Path) -> None:
    """A temporary copy of the project with the default run's image cache (built if missing)."""
    if not (project / "pyproject.toml").is_file():
        project.mkdir(parents=True, exist_ok=True)
        (project / "src").mkdir(exist_ok=True)
        shutil.copy(ROOT / "pyproject.toml", project / "pyproject.toml")
        shutil.copytree(ROOT / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
        (project / "conf" / "local").mkdir()
        for env in ("base", "nih"):
            for layer in LAYERS:
                (project / "data" / env / layer).mkdir(parents=True, exist_ok=True)
    if not (project / "data" / "base" / "05_model_input" / "image_cache" / "meta.json").is_file():
        kedro = Path(sys.executable).with_name("kedro")
        print(f"building the default run's image cache in {project} ...", file=sys.stderr)
        subprocess.run(
            [str(kedro), "run", "--pipelines", "phantom,data_processing,augmentation"],
            cwd=project,
            env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1"},
            check=True,
        )


def load_inputs(project: Path) -> tuple[dict[str, Any], dict[str, Any], Any, Any]:
    """(model spec, training params, image cache, augmentation policy) as `kedro run` sees them."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")  # no network calls from a benchmark
    bootstrap_project(project)
    with KedroSession.create(project_path=project) as session:
        context = session.load_context()
        params = context.params
        catalog = context.catalog
        return (
            dict(params["multiscale_resnet"]["model"]),
            dict(params["training"]),
            catalog.load("image_cache"),
            catalog.load("augmentation_policy"),
        )


def macro_auroc_train_mode(model: torch.nn.Module, images: np.ndarray, labels, batch: int) -> float:
    """Validation macro AUROC with BatchNorm on batch statistics (a copy of the model)."""
    probe = copy.deepcopy(model).train()
    probs = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = to_batch(images[start : start + batch], torch.device("cpu"), False)
            probs.append(torch.sigmoid(probe(x)).numpy())
    return validation_metrics(np.concatenate(probs), labels)["val_macro_auroc"]


def run_one(
    spec: dict[str, Any], training: dict[str, Any], cache: Any, policy: Any, seed: int
) -> dict[str, Any]:
    params = {
        **training,
        "seed": seed,
        "n_seeds": 1,
        "device": "cpu",
        "progress_bar": False,
        "resume": False,
    }
    start = time.perf_counter()
    result = fit(spec, cache, make_augmenter(policy), params)
    seconds = time.perf_counter() - start
    model = build_model(result.metadata["model_spec"], load_weights=False)
    model.load_state_dict(result.state_dict)
    row: dict[str, Any] = {
        "batchnorm": spec["batchnorm"],
        "seed": seed,
        "best_epoch": int(result.metadata["epoch"]),
        "epochs_trained": len(result.history),
    }
    batch = int(training["eval_batch_size"])
    # val: the split early stopping chose the epoch on; test: an independent second read
    for split in ("val", "test"):
        part = cache.split(split)
        labels = np.asarray(part.labels, dtype=np.float32)
        probs, _ = predict_probabilities(model, part.images, torch.device("cpu"), batch_size=batch)
        row[f"{split}_macro_auroc_eval_mode"] = validation_metrics(probs, labels)["val_macro_auroc"]
        row[f"{split}_macro_auroc_train_mode"] = macro_auroc_train_mode(
            model, part.images, labels, batch
        )
        row[f"n_{split}"] = len(labels)
    row["train_seconds"] = round(seconds, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=None, help="temporary project copy")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--variants", nargs="+", default=["shared", "per_scale"])
    parser.add_argument("--epochs", type=int, default=None, help="override training.epochs")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, first seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds = 1, args.seeds[:1]

    project = args.project or Path(tempfile.mkdtemp(prefix="rare-cxr-bn-")) / "project"
    prepare_project(project.resolve())
    spec, training, cache, policy = load_inputs(project.resolve())
    if args.epochs is not None:
        training["epochs"] = args.epochs
    machine = machine_info()
    rows = []
    for seed in args.seeds:  # seeds outer: an interrupted run still has paired results
        for variant in args.variants:
            row = run_one({**spec, "batchnorm": variant}, training, cache, policy, seed)
            row = {"bench": "batchnorm", **row, "scales": spec["scales"], "machine": machine}
            emit([row], args.output)
            rows.append(row)
    summary = []
    modes = [(split, mode) for split in ("val", "test") for mode in ("eval", "train")]
    for variant in args.variants:
        mine = [r for r in rows if r["batchnorm"] == variant]
        for split, mode in modes:
            values = np.array([r[f"{split}_macro_auroc_{mode}_mode"] for r in mine])
            summary.append(
                {
                    "batchnorm": variant,
                    "split": split,
                    "mode": mode,
                    "seeds": len(values),
                    "mean": f"{values.mean():.4f}",
                    "sd": f"{values.std(ddof=1):.4f}" if len(values) > 1 else "",
                    "per seed": " ".join(f"{v:.4f}" for v in values),
                }
            )
    for split, mode in modes:
        if len(args.variants) == 2:  # paired by seed: second variant minus first
            key = f"{split}_macro_auroc_{mode}_mode"
            first, second = (
                np.array([r[key] for r in rows if r["batchnorm"] == v]) for v in args.variants
            )
            diff = second - first
            summary.append(
                {
                    "batchnorm": f"{args.variants[1]} - {args.variants[0]}",
                    "split": split,
                    "mode": mode,
                    "seeds": len(diff),
                    "mean": f"{diff.mean():+.4f}",
                    "sd": f"{diff.std(ddof=1):.4f}" if len(diff) > 1 else "",
                    "per seed": " ".join(f"{v:+.4f}" for v in diff),
                }
            )
    emit([{"bench": "batchnorm_summary", "rows": summary, "machine": machine}], args.output)
    print(
        format_table(summary, ["batchnorm", "split", "mode", "seeds", "mean", "sd", "per seed"]),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
