"""Random augmentation of whole training batches, on the training device.

The random half of the input transform (the image cache is the deterministic half). It runs
on batches already on the GPU, so no CPU worker ever touches pixels during training.

Why not a `torchvision.transforms.v2.Compose` applied to the batch: v2 transforms treat a
batched tensor as *one* image and draw *one* set of random parameters for the whole batch
(every image of the batch rotated by the same angle, flipped together, equally brightened),
which removes most of the augmentation's variance and correlates the gradients of a batch.
Per-sample v2 calls in a Python loop would fix that at the cost of B small kernel launches per
op. So here:

* geometry (rotation, scale, translation, horizontal flip) is one 2x3 matrix per sample,
  applied to the whole batch by a single `F.affine_grid` + `F.grid_sample` (one resampling,
  not four);
* photometry (brightness, contrast, gamma) uses the formulas of
  `torchvision.transforms.v2.functional.adjust_brightness/adjust_contrast/adjust_gamma`,
  vectorised with a per-sample factor (tests check equality with the torchvision functions);
* Gaussian noise has a per-sample standard deviation drawn from [0, noise_std].

Policy keys (`params:augmentation`, validated by `validate_policy`) are documented in
`conf/base/parameters_augmentation.yml` and `docs/augmentation.md`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from rare_cxr.parameters import Params, check

PADDING_MODES = ("zeros", "border", "reflection")

Range = Annotated[list[float], Field(strict=False, min_length=2, max_length=2)]


class AugmentationPolicy(Params):
    """`params:augmentation`. Unknown keys are rejected: a typo such as `rotation_degree` would
    otherwise silently disable an augmentation. Ranges are `[min, max]`."""

    enabled: bool = True
    rotation_degrees: float = Field(0.0, ge=0.0, le=180.0)
    scale: Range = Field(default_factory=lambda: [1.0, 1.0])
    # a fraction of the image side
    translate: float = Field(0.0, ge=0.0, le=0.5)
    hflip_probability: float = Field(0.0, ge=0.0, le=1.0)
    brightness: Range = Field(default_factory=lambda: [1.0, 1.0])
    contrast: Range = Field(default_factory=lambda: [1.0, 1.0])
    gamma: Range = Field(default_factory=lambda: [1.0, 1.0])
    noise_std: float = Field(0.0, ge=0.0)
    padding_mode: Literal[PADDING_MODES] = "zeros"  # type: ignore[valid-type]

    @field_validator("scale", "brightness", "contrast", "gamma")
    @classmethod
    def _ordered_positive(cls, value: list[float]) -> list[float]:
        low, high = value
        if low <= 0:
            raise ValueError(f"min must be > 0, got {low}")
        if low > high:
            raise ValueError(f"min ({low}) must be <= max ({high})")
        return [float(low), float(high)]


DEFAULT_POLICY: dict[str, Any] = AugmentationPolicy().model_dump()


def validate_policy(params: Mapping[str, Any] | AugmentationPolicy | None) -> dict[str, Any]:
    """Check `params:augmentation` and return the complete policy (defaults filled in) as the
    plain dict that `augmentation_policy.json` stores; errors name the key."""
    return check(AugmentationPolicy, params, "augmentation").model_dump()


class BatchAugmenter:
    """`augment(batch, generator=None)`: float [B, C, H, W] in [0, 1] → same shape and device.

    Each sample gets its own random parameters. With a seeded `torch.Generator` the result is
    reproducible. Every random number (affine and photometric parameters, the noise image) is
    drawn directly on the batch's device, so a GPU batch never waits for a host-side draw or a
    host-to-device copy: the generator must live on the batch's device
    (`torch.Generator(device=batch.device)`; a CPU generator for a CPU batch). Without one,
    torch's default generator of that device is used. A given seed gives the same draws on
    every run on the same device type, but different draws on CPU and GPU (different RNG
    algorithms).
    """

    def __init__(self, policy: Mapping[str, Any]) -> None:
        self.policy = validate_policy(policy)
        p = self.policy
        self.geometric = (
            p["rotation_degrees"] > 0
            or p["scale"] != [1.0, 1.0]
            or p["translate"] > 0
            or p["hflip_probability"] > 0
        )
        self.photometric = (
            p["brightness"] != [1.0, 1.0]
            or p["contrast"] != [1.0, 1.0]
            or (p["gamma"] != [1.0, 1.0])
        )
        self.gamma = p["gamma"] != [1.0, 1.0]
        self.enabled = p["enabled"] and (self.geometric or self.photometric or p["noise_std"] > 0)

    def __repr__(self) -> str:
        return f"BatchAugmenter({self.policy})"

    def __call__(
        self, batch: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if batch.ndim != 4:
            raise ValueError(
                f"augment expects a [B, C, H, W] batch, got shape {tuple(batch.shape)}"
            )
        if not self.enabled or batch.shape[0] == 0:
            return batch
        dtype = batch.dtype
        x = batch.float()
        n = x.shape[0]
        params = self.sample_parameters(n, generator, x.device)  # checks the generator
        if self.geometric:
            x = self._geometry(x, params)
        if self.photometric:
            # in place on the batch's own float copy: no extra full-size tensor per op
            # (measured 1.33x on the whole augmenter, docs/benchmarks.md)
            if x is batch:
                x = x.clone()
            adjust_brightness(x, params["brightness"], inplace=True)
            adjust_contrast(x, params["contrast"], inplace=True)
            if self.gamma:  # x ** 1 == x and the range is already [0, 1]: skip the identity
                adjust_gamma(x, params["gamma"], inplace=True)
        if self.policy["noise_std"] > 0:
            # drawn where the batch is: no full-resolution host tensor, no copy
            noise = torch.randn(x.shape, generator=generator, device=x.device)
            noise.mul_(params["noise_std"].view(-1, 1, 1, 1))
            x = x + noise if x is batch else x.add_(noise)
        return x.clamp_(0.0, 1.0).to(dtype)

    def sample_parameters(
        self, n: int, generator: torch.Generator | None, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Independent per-sample draws (exposed so tests and the preview can inspect them).

        Drawn on `device`, which must be the generator's device when a generator is given.
        """
        p = self.policy
        device = torch.device(device)
        _check_generator(generator, device)
        # a fixed number of draws per sample keeps a seeded run reproducible across policies
        u = torch.rand((n, 8), generator=generator, device=device)

        def uniform(column: int, low: float, high: float) -> torch.Tensor:
            return low + (high - low) * u[:, column]

        return {
            "angle": uniform(0, -p["rotation_degrees"], p["rotation_degrees"]),
            "scale": uniform(1, *p["scale"]),
            "tx": uniform(2, -p["translate"], p["translate"]),
            "ty": uniform(3, -p["translate"], p["translate"]),
            "flip": u[:, 4] < p["hflip_probability"],
            "brightness": uniform(5, *p["brightness"]),
            "contrast": uniform(6, *p["contrast"]),
            "gamma": uniform(7, *p["gamma"]),
            "noise_std": p["noise_std"] * torch.rand((n,), generator=generator, device=device),
        }

    def _geometry(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        theta = affine_matrices(
            params["angle"],
            params["scale"],
            params["tx"],
            params["ty"],
            params["flip"],
            height=x.shape[-2],
            width=x.shape[-1],
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(
            x,
            grid,
            mode="bilinear",
            padding_mode=self.policy["padding_mode"],
            align_corners=False,
        )


def affine_matrices(
    angle_deg: torch.Tensor,
    scale: torch.Tensor,
    tx: torch.Tensor,
    ty: torch.Tensor,
    flip: torch.Tensor,
    *,
    height: int,
    width: int,
) -> torch.Tensor:
    """[B, 2, 3] matrices for `affine_grid` (they map *output* to *input* coordinates).

    The forward image transform is: flip, scale, rotate (counter-clockwise on screen) about
    the centre, then shift by (tx, ty) fractions of the side. Its inverse is built in pixel
    units and converted to affine_grid's normalised [-1, 1] coordinates, so rotation stays
    a rotation on non-square images.
    """
    rad = torch.deg2rad(angle_deg)
    cos, sin = torch.cos(rad), torch.sin(rad)
    sign = torch.where(flip, -1.0, 1.0).to(scale.dtype)
    half_w, half_h = width / 2.0, height / 2.0
    # forward in pixels (y down): p_out = R(angle) S F p_in + t ; R for an on-screen CCW turn
    # inverse: p_in = F S^-1 R(-angle) (p_out - t)
    inv_scale = 1.0 / scale
    a11 = sign * inv_scale * cos
    a12 = sign * inv_scale * -sin
    a21 = inv_scale * sin
    a22 = inv_scale * cos
    t_x = tx * width
    t_y = ty * height
    b1 = -(a11 * t_x + a12 * t_y)
    b2 = -(a21 * t_x + a22 * t_y)
    # normalised coords: p = D n with D = diag(half_w, half_h) → n_in = D^-1 A D n_out + D^-1 b
    theta = torch.stack(
        [
            torch.stack([a11, a12 * half_h / half_w, b1 / half_w], dim=-1),
            torch.stack([a21 * half_w / half_h, a22, b2 / half_h], dim=-1),
        ],
        dim=1,
    )
    return theta


def _per_sample(factor: torch.Tensor) -> torch.Tensor:
    return factor.view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """torchvision's adjust_brightness (scale, clamp to [0, 1]) with a factor per sample."""
    x = x if inplace else x.clone()
    return x.mul_(_per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """torchvision's adjust_contrast for grey images: blend each image with its own mean."""
    grey = x if x.shape[1] == 1 else x.mean(dim=1, keepdim=True)
    mean = grey.mean(dim=(-3, -2, -1), keepdim=True)
    f = _per_sample(factor)
    x = x if inplace else x.clone()
    return x.mul_(f).add_((1.0 - f) * mean).clamp_(0.0, 1.0)


def adjust_gamma(x: torch.Tensor, gamma: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """torchvision's adjust_gamma (gain 1): x ** gamma per sample, clamped to [0, 1]."""
    x = x if inplace else x.clone()
    return x.clamp_(0.0, 1.0).pow_(_per_sample(gamma)).clamp_(0.0, 1.0)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """`cuda` and `cuda:0` are the same device when one of them has no index."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    """Random numbers are drawn on the batch's device only: a generator elsewhere would need a
    host<->device copy per draw, which is exactly what a GPU data path must not wait for."""
    if generator is not None and not _same_device(generator.device, device):
        raise ValueError(
            f"augment: the generator is on {generator.device} but the batch is on {device}; "
            f"pass torch.Generator(device={str(device)!r}) (random numbers are drawn on the "
            "batch's device)"
        )
