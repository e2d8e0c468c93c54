"""BatchAugmenter: per-sample independence, determinism, identity, range, torchvision parity."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from rare_cxr.augment import DEFAULT_POLICY, BatchAugmenter, validate_policy

STRONG = {
    "rotation_degrees": 20.0,
    "scale": [0.8, 1.2],
    "translate": 0.1,
    "hflip_probability": 0.5,
    "brightness": [0.7, 1.3],
    "contrast": [0.7, 1.3],
    "gamma": [0.7, 1.3],
    "noise_std": 0.05,
}


def _batch(n: int = 6, size: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, size, size), generator=g)


def test_shape_dtype_range_preserved() -> None:
    augment = BatchAugmenter(STRONG)
    x = _batch()
    y = augment(x, generator=torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    half = augment(x.half())
    assert half.dtype == torch.float16 and half.shape == x.shape


def test_independent_parameters_per_sample() -> None:
    augment = BatchAugmenter(STRONG)
    params = augment.sample_parameters(16, torch.Generator().manual_seed(0), torch.device("cpu"))
    for key in ("angle", "scale", "tx", "ty", "brightness", "contrast", "gamma"):
        assert params[key].unique().numel() == 16, key
    assert 0 < int(params["flip"].sum()) < 16
    # the same image repeated comes out different in every row
    x = _batch(1).repeat(8, 1, 1, 1)
    y = augment(x, generator=torch.Generator().manual_seed(0))
    flat = y.flatten(1)
    for i in range(8):
        for j in range(i + 1, 8):
            assert not torch.allclose(flat[i], flat[j])


def test_seeded_generator_is_deterministic() -> None:
    augment = BatchAugmenter(STRONG)
    x = _batch()
    a = augment(x, generator=torch.Generator().manual_seed(7))
    b = augment(x, generator=torch.Generator().manual_seed(7))
    c = augment(x, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("policy", [{**STRONG, "enabled": False}, {}])
def test_identity_when_disabled_or_empty(policy: dict) -> None:
    x = _batch()
    y = BatchAugmenter(policy)(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(y, x, rtol=0, atol=0)


def test_geometry_matches_torchvision_per_sample() -> None:
    """One batched grid_sample == torchvision's flip + affine with each sample's parameters."""
    augment = BatchAugmenter(
        {**STRONG, "brightness": [1, 1], "contrast": [1, 1], "gamma": [1, 1], "noise_std": 0.0}
    )
    x = torch.rand((5, 1, 32, 48), generator=torch.Generator().manual_seed(3))
    params = augment.sample_parameters(5, torch.Generator().manual_seed(4), x.device)
    y = augment(x, generator=torch.Generator().manual_seed(4))
    for i in range(5):
        xi = TF.horizontal_flip(x[i]) if params["flip"][i] else x[i]
        ref = TF.affine(
            xi,
            angle=-float(params["angle"][i]),  # torchvision's affine turns clockwise
            translate=[float(params["tx"][i]) * 48, float(params["ty"][i]) * 32],
            scale=float(params["scale"][i]),
            shear=[0.0, 0.0],
            interpolation=TF.InterpolationMode.BILINEAR,
        )
        # compare away from borders, where padding conventions differ
        torch.testing.assert_close(y[i, :, 12:20, 18:30], ref[:, 12:20, 18:30], atol=1e-4, rtol=0)


def test_photometry_matches_torchvision_per_sample() -> None:
    policy = {"brightness": [0.6, 1.4], "contrast": [0.6, 1.4], "gamma": [0.6, 1.4]}
    augment = BatchAugmenter(policy)
    x = _batch(4)
    params = augment.sample_parameters(4, torch.Generator().manual_seed(5), x.device)
    y = augment(x, generator=torch.Generator().manual_seed(5))
    for i in range(4):
        ref = TF.adjust_brightness(x[i], float(params["brightness"][i]))
        ref = TF.adjust_contrast(ref, float(params["contrast"][i]))
        ref = TF.adjust_gamma(ref, float(params["gamma"][i]))
        torch.testing.assert_close(y[i], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"rotation_degrees": -1}, "augmentation.rotation_degrees"),
        ({"scale": [0.0, 1.1]}, "augmentation.scale"),
        ({"scale": [1.2, 1.1]}, "augmentation.scale"),
        ({"scale": 1.1}, "augmentation.scale"),
        ({"translate": 0.6}, "augmentation.translate"),
        ({"hflip_probability": 1.5}, "augmentation.hflip_probability"),
        ({"brightness": [1.2, 0.8]}, "augmentation.brightness"),
        ({"contrast": [-0.1, 1.0]}, "augmentation.contrast"),
        ({"gamma": ["a", 1.0]}, "augmentation.gamma"),
        ({"noise_std": -0.1}, "augmentation.noise_std"),
        ({"enabled": "yes"}, "augmentation.enabled"),
        ({"padding_mode": "wrap"}, "augmentation.padding_mode"),
        ({"rotation_degree": 5}, "rotation_degree"),
    ],
)
def test_invalid_policy_names_the_key(override: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        validate_policy({**STRONG, **override})


def test_validated_policy_is_complete_plain_dict() -> None:
    policy = validate_policy({"rotation_degrees": 5})
    assert set(policy) == set(DEFAULT_POLICY)
    assert policy["rotation_degrees"] == 5.0 and policy["scale"] == [1.0, 1.0]
    assert validate_policy(policy) == policy  # idempotent: the JSON round trip is stable


# ---------------------------------------------------------------- where the draws happen


def test_every_draw_is_made_on_the_batch_device_with_the_given_generator(monkeypatch) -> None:
    """No host-side draw and no copy: each torch.rand/randn call names the batch's device and
    the caller's generator (the training engine passes one on the training device)."""
    gen = torch.Generator().manual_seed(0)
    x = _batch()
    calls: list[tuple[str, torch.device, object]] = []
    for name in ("rand", "randn"):
        real = getattr(torch, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, torch.device(kwargs["device"]), kwargs.get("generator")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch, name, spy)
    BatchAugmenter(STRONG)(x, generator=gen)
    assert [c[0] for c in calls] == ["rand", "rand", "randn"]  # parameters, noise std, noise
    assert all(device == x.device and g is gen for _, device, g in calls)


def test_cpu_draw_order_is_pinned() -> None:
    """CPU runs reproduce earlier CPU runs: (n, 8) uniforms, then n noise levels, then noise."""
    augment = BatchAugmenter(STRONG)
    params = augment.sample_parameters(5, torch.Generator().manual_seed(3), torch.device("cpu"))
    ref = torch.Generator().manual_seed(3)
    u = torch.rand((5, 8), generator=ref)
    level = torch.rand((5,), generator=ref)
    torch.testing.assert_close(params["angle"], -20.0 + 40.0 * u[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(params["gamma"], 0.7 + 0.6 * u[:, 7], rtol=0, atol=1e-7)
    torch.testing.assert_close(params["noise_std"], 0.05 * level, rtol=0, atol=0)


def test_a_generator_on_another_device_is_refused() -> None:
    class Elsewhere:  # a generator's only attribute the check reads
        device = torch.device("cuda", 0)

    with pytest.raises(ValueError, match=r"generator is on cuda:0 but the batch is on cpu"):
        BatchAugmenter(STRONG)(_batch(), generator=Elsewhere())  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batch_with_a_cuda_generator_stays_on_the_gpu() -> None:
    augment = BatchAugmenter(STRONG)
    x = _batch(8, 64).cuda()
    a = augment(x, generator=torch.Generator(device="cuda").manual_seed(7))
    b = augment(x, generator=torch.Generator(device="cuda").manual_seed(7))
    assert a.device == x.device and a.shape == x.shape
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    with pytest.raises(ValueError, match="generator is on cpu"):
        augment(x, generator=torch.Generator().manual_seed(7))
