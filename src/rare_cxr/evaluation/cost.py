"""What a model costs: parameters, GFLOPs per image, measured inference throughput.

The paper compares accuracy only; a multi-scale model runs its trunk once per scale, so the
comparison is honest only next to its compute. FLOPs come from PyTorch's own dispatcher-level
counter (`torch.utils.flop_counter.FlopCounterMode`), which counts a multiply-add as 2 FLOPs,
at the model's input size (the image-cache size). The model resizes the input to each scale
inside; that interpolation is NOT counted (the counter gives it 0 FLOPs, checked in
tests/test_reference_checks.py): the figure is every scale's trunk plus the head, which is
what dominates.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    """All parameters (trainable or not): what the checkpoint has to store."""
    return int(sum(p.numel() for p in model.parameters()))


def gflops_per_image(model: nn.Module, input_size: int) -> float:
    """Forward GFLOPs for one `[1, 1, S, S]` image (multiply-add = 2 FLOPs)."""
    model.eval()
    x = torch.zeros(1, 1, int(input_size), int(input_size))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops()) / 1e9


def inference_throughput(
    model: nn.Module,
    input_size: int,
    *,
    batch_size: int = 8,
    n_batches: int = 3,
    warmup_batches: int = 1,
    device: str = "cpu",
) -> float:
    """Measured images/s of `model` in eval mode on random inputs (after warm-up batches)."""
    model = model.to(device).eval()
    x = torch.rand(int(batch_size), 1, int(input_size), int(input_size), device=device)
    with torch.inference_mode():
        for _ in range(int(warmup_batches)):
            model(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(int(n_batches)):
            model(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return float(batch_size * n_batches / elapsed) if elapsed > 0 else float("nan")


def device_label(device: str) -> str:
    """What the img/s were measured on: `cpu`, or `cuda (NVIDIA H100 80GB HBM3)`."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def model_cost(model: nn.Module, input_size: int, **throughput_args: Any) -> dict[str, Any]:
    """The cost block of table 1 for one model."""
    gflops = gflops_per_image(model, input_size)  # on the CPU, before the model moves
    device = str(throughput_args.get("device", "cpu"))
    return {
        "params": count_parameters(model),
        "gflops": gflops,
        "img_per_s": inference_throughput(model, input_size, **throughput_args),
        "device": device_label(device),
        "input_size": int(input_size),
        "scales": [int(s) for s in getattr(model, "scales", [input_size])],
        "flop_convention": "multiply-add = 2 FLOPs (torch.utils.flop_counter)",
    }
