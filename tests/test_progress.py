"""Progress bars (`rare_cxr.progress`): predict and the bootstraps show one, counting what they
do; the convention (TTY, RARE_CXR_PROGRESS, rank 0) holds; log records stay on their own lines.

The bars are forced on with RARE_CXR_PROGRESS=1 (pytest's captured stderr is not a terminal),
and every bar closed is recorded through a spy on the real bar class.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import numpy as np
import pytest
import torch
from test_training import TINY_SPEC, blob_cache

from rare_cxr import progress as progress_module
from rare_cxr.evaluation import bootstrap, paired
from rare_cxr.findings import FINDINGS
from rare_cxr.models import build_model
from rare_cxr.pipelines.training.nodes import predict
from rare_cxr.progress import bars_enabled, progress


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Force bars on, and record (desc, n, total) of every bar when it closes."""
    monkeypatch.setenv("RARE_CXR_PROGRESS", "1")
    monkeypatch.delenv("RANK", raising=False)
    closed: list[dict[str, Any]] = []
    original = progress_module._Bar.close

    def spy(self: Any) -> None:
        if not getattr(self, "_recorded", False) and not self.disable:
            self._recorded = True
            closed.append({"desc": self.desc, "n": self.n, "total": self.total})
        original(self)

    monkeypatch.setattr(progress_module._Bar, "close", spy)
    return closed


def _segments(text: str) -> list[str]:
    """What a terminal shows line by line: a bar redraws itself after a carriage return."""
    return [s.strip() for s in re.split(r"[\r\n]", text) if s.strip()]


def test_predict_node_shows_one_bar_per_split_counting_its_batches(bars, capsys):
    cache = blob_cache(n_train=4, n_val=6, n_test=10)
    torch.manual_seed(0)
    model = build_model(TINY_SPEC)
    checkpoint = {
        "state_dict": model.state_dict(),
        "metadata": {
            "model_spec": dict(TINY_SPEC),
            "findings": list(FINDINGS),
            "train_params": {"seed": 0},
            "training_id": "t0",
        },
    }
    training = {"device": "cpu", "eval_batch_size": 4, "progress_bar": True}
    out = predict(checkpoint, cache, training)
    assert len(out) == 16
    assert {(b["desc"], b["n"], b["total"]) for b in bars} == {
        ("tiny predict val", 2, 2),
        ("tiny predict test", 3, 3),
    }
    err = capsys.readouterr().err
    assert "tiny predict test" in err and "batch" in err

    bars.clear()
    predict(checkpoint, cache, {**training, "progress_bar": False})
    assert bars == []
    assert "tiny predict" not in capsys.readouterr().err


def _bootstrap_inputs(n: int = 40) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    y = (rng.random((n, len(FINDINGS))) < 0.4).astype(int)
    score = np.clip(y * 0.3 + rng.random(y.shape) * 0.7, 0, 1)
    ref = rng.random(y.shape)
    thresholds = np.full(len(FINDINGS), 0.5)
    patients = np.arange(n) // 2
    return y, score, ref, thresholds, patients


def test_patient_bootstrap_and_paired_bootstrap_count_every_resample(bars, capsys):
    y, score, ref, t, patients = _bootstrap_inputs()
    # 250 resamples = blocks of 200 and 50: the bar must count resamples, not blocks
    bootstrap.bootstrap_intervals(
        y, score, t, patients, n_resamples=250, seed=1, progress_desc="m bootstrap"
    )
    paired.paired_bootstrap_macro(
        y, score, ref, t, t, patients, n_resamples=30, progress_desc="m vs r paired bootstrap"
    )
    assert [(b["desc"], b["n"], b["total"]) for b in bars] == [
        ("m bootstrap", 250, 250),
        ("m vs r paired bootstrap", 30, 30),
    ]
    assert "resample" in capsys.readouterr().err
    # no description, no bar: direct calls (tests, scripts) stay silent
    bars.clear()
    bootstrap.bootstrap_intervals(y, score, t, patients, n_resamples=20)
    assert bars == []


def test_bars_follow_the_convention(monkeypatch, capsys):
    monkeypatch.delenv("RARE_CXR_PROGRESS", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert not sys.stderr.isatty()
    assert not bars_enabled()  # captured stderr is a pipe: no bar in logs
    monkeypatch.setenv("RARE_CXR_PROGRESS", "1")
    assert bars_enabled()
    monkeypatch.setenv("RANK", "1")  # torchrun's rank 1: never, even when forced
    assert not bars_enabled()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("RARE_CXR_PROGRESS", "0")
    assert not bars_enabled()
    with progress(total=3, desc="hidden") as bar:
        bar.update(3)
    assert "hidden" not in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["stream", "kedro-rich"])
def test_log_records_are_written_above_an_open_bar(bars, capsys, kind):
    if kind == "stream":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    else:
        from kedro.logging import RichHandler
        from rich.console import Console

        handler = RichHandler(console=Console(file=sys.stderr, width=200))
    logger = logging.getLogger("rare_cxr.test_progress")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        with progress(total=3, desc="bar under test", unit="step") as bar:
            bar.update()
            logger.info("epoch 1 finished")
            bar.update()
        assert "emit" not in vars(handler)  # the handler is itself again once the bar is gone
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    lines = _segments(capsys.readouterr().err)
    assert any("epoch 1 finished" in line for line in lines)
    # on the bar's line, the record would read "bar under test: 33%|...]epoch 1 finished"
    assert not [line for line in lines if "epoch 1 finished" in line and "%|" in line], lines
