"""DistributedDataParallel plumbing: `devices: N` spawns N workers, or `torchrun` launched us.

NCCL on CUDA, gloo on CPU. Every rank trains on its slice of each global batch (global batch =
`batch_size`, split evenly, so results match the single-process run up to float reduction
order); every rank evaluates the full validation split (cheap, and keeps early-stopping
decisions identical everywhere without communication); only rank 0 writes (resume state,
the returned checkpoint).
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_process_group(rank: int, world: int, device: torch.device) -> None:
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group(
        backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30)
    )


def all_finite(flag: bool, device: torch.device) -> bool:
    """True only if every rank's loss was finite (so all ranks stop together on NaN)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class AllReduceBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the *global* batch, for any backend.

    PyTorch's `SyncBatchNorm` is GPU-only; on CPU (gloo) DDP would otherwise normalise each
    rank's half-batch with its own statistics and drift away from the single-process run.
    Sum, sum of squares and count are all-reduced with the autograd-aware
    `torch.distributed.nn.functional.all_reduce`, so gradients flow through the global
    statistics exactly as in one big batch. Same parameters and buffers as `BatchNorm2d`
    (state dicts are interchangeable).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        import warnings

        from torch.distributed.nn.functional import all_reduce

        channels = x.shape[1]
        xf = x.float()
        count = torch.tensor([x.numel() / channels], dtype=torch.float32, device=x.device)
        with warnings.catch_warnings():
            # deprecated in favour of _functional_collectives, whose autograd support is
            # still private; this one is documented and differentiable
            warnings.simplefilter("ignore", FutureWarning)
            # two passes (mean, then squared deviations): E[x^2] - E[x]^2 loses most digits
            # when activations have a large mean, as a first layer on dark films does
            stats = all_reduce(torch.cat([xf.sum(dim=(0, 2, 3)), count]))
            total = stats[-1]
            mean = stats[:channels] / total
            centred = xf - mean[None, :, None, None]
            var = all_reduce((centred * centred).sum(dim=(0, 2, 3))) / total
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = (
                self.momentum
                if self.momentum is not None
                else 1.0 / float(self.num_batches_tracked)
            )
            unbiased = var * total / (total - 1).clamp_min(1.0)
            self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            self.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_sync_batchnorm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """GPU: PyTorch's SyncBatchNorm (fused kernels). CPU: `AllReduceBatchNorm2d`, in place."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in list(module.named_children()):
        if type(child) is torch.nn.BatchNorm2d:
            new = AllReduceBatchNorm2d(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
            )
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return module
