"""Record what a default run produces, and compare two recordings: the check that a refactor is
behaviour-identical ("the outputs of a recorded default run are identical before and after").

    python scripts/output_digest.py record before.json     # on the commit before the change
    python scripts/output_digest.py record after.json      # on the commit after it
    python scripts/output_digest.py compare before.json after.json

`record` runs the real `kedro run` (default pipeline) in a fresh temporary copy of this checkout's
`conf/` with small, deterministic settings (one thread, `training.deterministic: true`), then
digests the latest version of every output under `data/base/`:

* tables (CSV, parquet) and JSON: every value, with the columns and keys that change from run to
  run by nature left out (run ids, training ids, timings, creation dates, file versions);
* checkpoints, training states and model bundles: every tensor, bit for bit;
* report.html, model cards and the inference report: the *set* of numbers they print (their
  layout may change; the numbers they show may not);
* figures: only that they exist (pixels depend on matplotlib's font cache).

`compare` lists every difference and exits 1 if there is any. A run takes about 5 minutes on 2
idle CPU cores (longer on a loaded machine).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "phantom": {"n_patients": 40, "image_size": 64},
    "image_cache": {"size": 64, "workers": 1},
    "augmentation_preview": {"scales": [16, 32]},
    "multiscale_resnet": {"model": {"scales": [32, 64]}},
    "resnet_single_scale": {"model": {"scales": [64]}},
    "training": {
        "epochs": 2,
        "batch_size": 16,
        "device": "cpu",
        "deterministic": True,
        "loader_threads": 0,
        "progress_bar": False,
    },
    "reporting": {"bootstrap": {"n_resamples": 50}, "cost": {"batch_size": 2, "n_batches": 1}},
    "tracking": {"enabled": False},
}
# Keys and columns whose values differ between two identical runs by nature.
VOLATILE = re.compile(
    r"(^|_)(run_id|training_id|checkpoint_version|bundle_version|version|created|started|"
    r"finished|seconds|elapsed|img_per_s|img/s|duration|timestamp|git_commit|pid|host|"
    r"command|project_path|manifest|build_seconds|source_fingerprint|path)($|_)",
    re.IGNORECASE,
)
NUMBER = re.compile(r"(?<![\w.])-?\d+\.\d+(?:e-?\d+)?")
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}[.:]\d{2}[.:]\d{2}[.\d]*Z?")


TRAINING_ID = re.compile(r"^[0-9a-f]{12}$")  # uuid4().hex[:12], drawn per training


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in sorted(value.items()) if not VOLATILE.search(str(k))}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, str) and TRAINING_ID.match(value):
        return "<training id>"
    return value


def _table_digest(frame: Any) -> dict[str, Any]:
    keep = [c for c in frame.columns if not VOLATILE.search(str(c))]
    frame = frame[keep]
    values = frame.astype(str).to_csv(index=False).encode()
    return {
        "columns": [str(c) for c in keep],
        "rows": len(frame),
        "values": hashlib.sha256(values).hexdigest(),
    }


def _tensors_digest(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return hashlib.sha256(obj.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    if isinstance(obj, dict):
        return {str(k): _tensors_digest(v) for k, v in sorted(obj.items(), key=lambda i: str(i[0]))
                if not VOLATILE.search(str(k))}  # fmt: skip
    if isinstance(obj, list | tuple):
        return [_tensors_digest(v) for v in obj]
    return _clean(obj)


def _numbers(text: str, timings: set[str]) -> list[str]:
    """The numbers a document prints, but the measured timings (img/s) it shows."""
    return sorted(set(NUMBER.findall(TIMESTAMP.sub(" ", text))) - timings)


def _timings(data: Path) -> set[str]:
    """img/s values of the run's cost blocks, as documents print them (one decimal)."""
    found: set[str] = set()
    for path in (p for p in data.rglob("cost.json") if p.is_file()):
        value = json.loads(path.read_text()).get("img_per_s")
        if isinstance(value, int | float):
            found.add(f"{value:.1f}")
    return found


def digest_file(path: Path, timings: frozenset[str] = frozenset()) -> Any:
    import pandas as pd
    import torch

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _table_digest(pd.read_parquet(path))
    if suffix == ".csv":
        return _table_digest(pd.read_csv(path, dtype=str, keep_default_na=False))
    if suffix == ".json":
        return _clean(json.loads(path.read_text()))
    if suffix == ".pt":
        return _tensors_digest(torch.load(path, map_location="cpu", weights_only=True))
    if suffix in (".html", ".md"):
        return {"numbers": _numbers(path.read_text(errors="replace"), set(timings))}
    if suffix == ".npy":
        import numpy as np

        return hashlib.sha256(np.load(path, mmap_mode="r").tobytes()).hexdigest()
    return "exists"


def latest_outputs(data: Path) -> dict[str, Path]:
    """Every output file, a versioned one (`<name>/<version>/<name>`) by its latest version."""
    chosen: dict[str, Path] = {}
    for path in sorted(data.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        relative = path.relative_to(data)
        parts = relative.parts
        if "runs" in parts[:1] or "mlflow" in parts[:1] or "01_raw" in parts[:1]:
            continue
        versioned = len(parts) >= 3 and (
            parts[-1] == parts[-3] or TIMESTAMP.fullmatch(parts[-2]) is not None
        )
        # `<name>/<version>/<name>`: the version folder is left out of the key
        key = "/".join(parts[:-2] + parts[-1:] if versioned else parts)
        chosen[key] = path  # sorted: the last one seen is the latest version
    return chosen


def record(out: Path) -> None:
    import yaml

    with tempfile.TemporaryDirectory(prefix="rare-cxr-digest-") as tmp:
        project = Path(tmp) / "project"
        project.mkdir()
        for name in ("pyproject.toml", ".telemetry"):
            shutil.copy(ROOT / name, project / name)
        shutil.copytree(ROOT / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
        (project / "conf" / "local").mkdir()
        (project / "conf" / "local" / "parameters.yml").write_text(yaml.safe_dump(SETTINGS))
        (project / "src").mkdir()
        env = {
            **os.environ,
            "KEDRO_DISABLE_TELEMETRY": "1",
            "RARE_CXR_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        }
        kedro = str(Path(sys.executable).with_name("kedro"))
        done = subprocess.run(
            [kedro, "run"], cwd=project, env=env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            sys.exit(f"kedro run failed:\n{(done.stdout + done.stderr)[-4000:]}")
        data = project / "data" / "base"
        timings = frozenset(_timings(data))
        digest = {key: digest_file(path, timings) for key, path in latest_outputs(data).items()}
    out.write_text(json.dumps(digest, indent=1, sort_keys=True, default=str) + "\n")
    print(f"recorded {len(digest)} outputs in {out}")


def differences(before: Any, after: Any, where: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        found = []
        for key in sorted(set(before) | set(after)):
            here = f"{where}/{key}" if where else str(key)
            if key not in after:
                found.append(f"{here}: missing after")
            elif key not in before:
                found.append(f"{here}: new after")
            else:
                found += differences(before[key], after[key], here)
        return found
    if before != after:
        shown = json.dumps(before, default=str)[:120], json.dumps(after, default=str)[:120]
        return [f"{where}: {shown[0]} -> {shown[1]}"]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("record").add_argument("out", type=Path)
    compare = sub.add_parser("compare")
    compare.add_argument("before", type=Path)
    compare.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    if args.command == "record":
        record(args.out)
        return 0
    found = differences(json.loads(args.before.read_text()), json.loads(args.after.read_text()))
    out = io.StringIO()
    for line in found:
        print(line, file=out)
    print(out.getvalue(), end="")
    print(f"{len(found)} difference(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
