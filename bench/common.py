"""Small helpers shared by the bench/ scripts: machine description, JSON lines, a text table.

Every result line carries the machine it was measured on, because a figure without its CPU
model, core count and GPU is not comparable with anything.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo; `platform` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (affinity-aware, unlike os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, GPU and library versions, for every result line."""
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["gpu"] = None
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    return info


def emit(
    records: Iterable[Mapping[str, Any]],
    path: str | os.PathLike | None = None,
    stream: TextIO | None = sys.stdout,
) -> None:
    """Write records as JSON lines to `stream` and append them to `path` (if given)."""
    lines = [json.dumps(dict(r), sort_keys=False, default=str) for r in records]
    if stream is not None:
        for line in lines:
            print(line, file=stream)
    if path is not None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("a") as handle:
            handle.write("".join(line + "\n" for line in lines))


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain aligned text table (markdown-compatible) of `columns` from `rows`."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"
        return "" if value is None else str(value)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)
    ]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    out = [line, rule]
    out += [
        "| " + " | ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)) + " |" for b in body
    ]
    return "\n".join(out)


def env_parameters(env: str) -> dict[str, Any]:
    """`params:` of a Kedro environment (`base`, `nih`) as `kedro run --env <env>` resolves them
    (the project's own config-loader settings: conf/base soft-merged with conf/<env>)."""
    from kedro.config import OmegaConfigLoader

    from rare_cxr.settings import CONFIG_LOADER_ARGS

    root = Path(__file__).resolve().parents[1]
    loader = OmegaConfigLoader(
        conf_source=str(root / "conf"), **{**CONFIG_LOADER_ARGS, "default_run_env": env}
    )
    return dict(loader["parameters"])


class SyntheticSplit:
    """One split of a synthetic in-memory image cache with `ImageCache.split()`'s API (images,
    labels, and a table of image and patient ids): what the training benchmarks feed `fit`."""

    def __init__(self, images: Any, labels: Any) -> None:
        import numpy as np
        import pandas as pd

        self.images, self.labels = images, labels
        self.table = pd.DataFrame(
            {
                "image_id": [f"{i:08d}_000.png" for i in range(len(images))],
                "patient_id": np.arange(len(images)),
            }
        )
