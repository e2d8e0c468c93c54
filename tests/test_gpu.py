"""CUDA-only checks: AMP (bf16 and fp16 + GradScaler), channels_last, torch.compile, prediction
and batch augmentation on the GPU.

Marked `gpu` and skipped, with the reason shown by `pytest -rs`, where CUDA is absent. On a CUDA
machine: `pytest -m gpu` (or `bash bench/gpu_check.sh`, which runs it first). Tiny images and
resnet18 keep every test to seconds, torch.compile's first compilation aside.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from rare_cxr.augment import BatchAugmenter
from rare_cxr.findings import FINDINGS
from rare_cxr.training import engine as engine_module
from rare_cxr.training import fit
from rare_cxr.training.engine import amp_dtype, predict_probabilities, to_batch

NO_CUDA = "no CUDA device: the gpu tests need one (run `bash bench/gpu_check.sh` on a GPU machine)"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA),
]

SPEC = {
    "name": "gpu_test",
    "architecture": "multiscale_resnet",
    "backbone": "resnet18",
    "scales": [32, 64],
    "pretrained": "none",
}
POLICY = {
    "rotation_degrees": 7.0,
    "scale": [0.92, 1.08],
    "translate": 0.04,
    "brightness": [0.9, 1.1],
    "contrast": [0.9, 1.1],
    "gamma": [0.9, 1.1],
    "noise_std": 0.01,
}


class _Split:
    def __init__(self, images: np.ndarray, labels: np.ndarray, offset: int) -> None:
        self.images, self.labels = images, labels.astype(np.float32)
        self.table = pd.DataFrame(
            {
                "image_id": [f"{offset + i:08d}_000.png" for i in range(len(images))],
                "patient_id": np.arange(offset, offset + len(images)),
            }
        )
        for k, finding in enumerate(FINDINGS):
            self.table[finding] = labels[:, k].astype(np.int8)


class _Cache:
    """In-memory image cache with the `rare_cxr.image_cache.ImageCache` API."""

    def __init__(self, size: int = 64, counts: dict[str, int] | None = None) -> None:
        rng = np.random.default_rng(0)
        counts = counts or {"train": 64, "val": 32, "test": 16}
        self.size, self.findings, self.split_names = size, list(FINDINGS), list(counts)
        self._splits, offset = {}, 0
        for name, n in counts.items():
            labels = (rng.random((n, len(FINDINGS))) < 0.3).astype(np.float32)
            labels[:2, :] = [[0.0] * len(FINDINGS), [1.0] * len(FINDINGS)]  # both classes
            images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
            self._splits[name] = _Split(images, labels, offset)
            offset += n

    def split(self, name: str) -> _Split:
        return self._splits[name]


def _params(**overrides: Any) -> dict[str, Any]:
    return {
        "epochs": 1,
        "patience": 1,
        "batch_size": 16,
        "eval_batch_size": 32,
        "device": "cuda",
        "amp": True,
        "channels_last": True,
        "resume": False,
        "progress_bar": False,
        "schedule": {"name": "cosine", "warmup_epochs": 0},
        **overrides,
    }


def _record_training_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Wrap the engine's `build_model` so every training-mode forward of the model `fit` builds
    records its input layout, the autocast state and the output dtype."""
    calls: list[dict[str, Any]] = []
    real_build = engine_module.build_model

    def build(spec: Any, *args: Any, **kwargs: Any) -> torch.nn.Module:
        model = real_build(spec, *args, **kwargs)

        def pre(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if module.training:
                x = inputs[0]
                calls.append(
                    {
                        "device": x.device.type,
                        "channels_last": x.is_contiguous(memory_format=torch.channels_last),
                        "autocast": torch.is_autocast_enabled("cuda"),
                        "autocast_dtype": torch.get_autocast_dtype("cuda"),
                    }
                )

        def post(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if module.training and calls:
                calls[-1]["output_dtype"] = output.dtype

        model.register_forward_pre_hook(pre)
        model.register_forward_hook(post)
        return model

    monkeypatch.setattr(engine_module, "build_model", build)
    return calls


def test_amp_dtype_is_bf16_where_supported_else_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert amp_dtype({"amp": "auto"}, cuda) == expected
    assert amp_dtype({"amp": False}, cuda) is None
    assert amp_dtype({"amp": True}, torch.device("cpu")) is None  # AMP is a CUDA feature here
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert amp_dtype({"amp": "auto"}, cuda) == torch.float16


def test_to_batch_converts_on_cuda_into_channels_last() -> None:
    images = np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8)
    x = to_batch(images, torch.device("cuda"), channels_last=True)
    assert x.device.type == "cuda" and x.dtype == torch.float32 and x.shape == (4, 1, 8, 8)
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x.cpu(), torch.from_numpy(images).float().div(255).unsqueeze(1))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fit_on_cuda_trains_with_amp_and_channels_last(
    precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    if precision == "fp16":  # the pre-Ampere path: fp16 autocast + GradScaler
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    calls = _record_training_calls(monkeypatch)
    result = fit(SPEC, _Cache(), BatchAugmenter(POLICY), _params())
    assert result is not None
    row = result.history.iloc[-1]
    assert np.isfinite(row["train_loss"]) and np.isfinite(row["val_loss"])
    assert row["img_per_s"] > 0
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    assert len(calls) == 4  # 64 train images / batch 16
    for call in calls:
        assert call["device"] == "cuda" and call["channels_last"]
        assert call["autocast"] and call["autocast_dtype"] == dtype
        assert call["output_dtype"] == dtype  # the head's matmul ran in reduced precision
    # the returned weights are on the CPU, loadable anywhere, and finite
    assert all(t.device.type == "cpu" for t in result.state_dict.values())
    assert all(torch.isfinite(t).all() for t in result.state_dict.values() if t.is_floating_point())


def test_predict_on_cuda_matches_cpu() -> None:
    from rare_cxr.pipelines.training.nodes import combine_seeds, predict

    cache = _Cache()
    result = fit(SPEC, cache, None, _params(amp=False))
    assert result is not None
    checkpoint, _ = combine_seeds([42], [result])
    common = {"eval_batch_size": 8, "tta_hflip": True}
    on_cpu = predict(checkpoint, cache, {**common, "device": "cpu"})
    on_gpu = predict(checkpoint, cache, {**common, "device": "cuda", "amp": False})
    on_gpu_amp = predict(checkpoint, cache, {**common, "device": "cuda", "amp": "auto"})
    assert list(on_gpu.columns) == list(on_cpu.columns)
    assert set(on_cpu["split"]) == {"val", "test"}
    findings = list(FINDINGS)
    # fp32 on the GPU (cuDNN may use TF32 convolutions) and AMP: the same probabilities
    np.testing.assert_allclose(on_gpu[findings], on_cpu[findings], atol=5e-3)
    np.testing.assert_allclose(on_gpu_amp[findings], on_cpu[findings], atol=3e-2)


def test_predict_probabilities_on_cuda_channels_last_bf16() -> None:
    from rare_cxr.models import build_model

    model = build_model(SPEC).eval()
    images = np.random.default_rng(1).integers(0, 256, (10, 64, 64), dtype=np.uint8)
    reference, _ = predict_probabilities(model, images, torch.device("cpu"), batch_size=4)
    cuda_model = model.to("cuda").to(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    probs, _ = predict_probabilities(
        cuda_model, images, torch.device("cuda"), batch_size=4, dtype=dtype, channels_last=True
    )
    assert probs.shape == (10, len(FINDINGS)) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, reference, atol=3e-2)


def test_batch_augmenter_on_cuda_is_reproducible_and_in_range() -> None:
    augmenter = BatchAugmenter(POLICY)
    x = torch.rand(8, 1, 64, 64, device="cuda")

    def run(seed: int) -> torch.Tensor:
        return augmenter(x, generator=torch.Generator(device="cuda").manual_seed(seed))

    first, again, other = run(0), run(0), run(1)
    assert first.device.type == "cuda" and first.shape == x.shape
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0
    assert not torch.equal(first, x)  # it did augment


def test_fit_on_cuda_with_torch_compile() -> None:
    # last in the file: the first compilation takes the longest (tens of seconds)
    # fixed batch shapes (64 = 4 x 16): one compilation, no recompiles
    result = fit(SPEC, _Cache(), BatchAugmenter(POLICY), _params(compile=True))
    assert result is not None
    assert np.isfinite(result.history.iloc[-1]["train_loss"])
    # the state dict is the plain model's (no `_orig_mod.` prefix from the compiled wrapper)
    assert not any(k.startswith("_orig_mod.") for k in result.state_dict)
