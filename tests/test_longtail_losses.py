"""The long-tail losses of `training.loss.name` (docs/training.md, "Long-tail methods").

Each loss is checked on one 3 x 4 toy batch (3 images, 4 findings; the losses take any number
of findings) against a value computed by hand from the paper's formula: written out below in
plain numpy, independent of the implementation, and pinned as a number (computed once with
that numpy code) so that the formula itself cannot drift with the implementation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rare_cxr.training.config import validate_training_params
from rare_cxr.training.engine import predict_probabilities, result_settings
from rare_cxr.training.losses import (
    LOSS_KEYS,
    build_loss,
    class_balanced_weights,
    ldam_margins,
    prior_log_odds,
)

Z = np.array([[2.0, -1.0, 0.5, -3.0], [-0.5, 1.5, -2.0, 0.0], [1.0, -2.5, 3.0, -1.0]])
Y = np.array([[1, 0, 0, 1], [0, 1, 0, 0], [1, 0, 1, 0]], dtype=float)
# the training split: 100 images, 40 / 10 / 5 / 1 positives of the four findings
N_POS = np.array([40.0, 10.0, 5.0, 1.0])
N_NEG = 100.0 - N_POS
P = 1.0 / (1.0 + np.exp(-Z))


def train_labels() -> np.ndarray:
    labels = np.zeros((100, 4), np.float32)
    for k, n in enumerate(N_POS.astype(int)):
        labels[:n, k] = 1.0
    return labels


def loss_value(epoch: int = 0, mask: list[float] | None = None, **loss) -> float:
    cfg = validate_training_params({"epochs": 8, "loss": loss})["loss"]
    criterion = build_loss(cfg, train_labels())
    criterion.start_epoch(epoch)
    if mask is not None:
        criterion.set_mask(torch.tensor(mask))
    return criterion(torch.tensor(Z, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32))


def bce(p: np.ndarray, y: np.ndarray, w_pos=1.0, w_neg=1.0) -> np.ndarray:
    return -(w_pos * y * np.log(p) + w_neg * (1 - y) * np.log(1 - p))


def effective_number_weights(beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Cui et al.: (1 - beta) / (1 - beta^n) for the 8 (finding, class) cells, summing to 8."""
    counts = np.concatenate([N_POS, N_NEG])
    a = (1 - beta) / (1 - beta**counts)
    a = a / a.sum() * 8
    return a[:4], a[4:]


# ------------------------------------------------------------------ the paper's balanced BCE


def test_bce_with_balanced_pos_weight_matches_the_hand_value():
    w = np.minimum(N_NEG / N_POS, 100.0)  # 1.5, 9, 19, 99
    expected = bce(P, Y, w_pos=w).mean()
    assert expected == pytest.approx(25.681662817056687, rel=1e-12)
    assert loss_value(name="bce") == pytest.approx(expected, rel=1e-5)
    # the cap: 99 -> 10 for the rarest finding
    capped = bce(P, Y, w_pos=np.minimum(N_NEG / N_POS, 10.0)).mean()
    assert loss_value(name="bce", pos_weight_cap=10.0) == pytest.approx(capped, rel=1e-5)


def test_focal_matches_the_hand_value():
    w = np.minimum(N_NEG / N_POS, 100.0)
    p_t = np.where(Y == 1, P, 1 - P)
    expected = ((1 - p_t) ** 2 * bce(P, Y) * np.where(Y == 1, w, 1.0)).mean()
    assert expected == pytest.approx(22.885558635832073, rel=1e-12)
    assert loss_value(name="focal", focal_gamma=2.0) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------ class-balanced (Cui et al.)


def test_class_balanced_matches_the_hand_value():
    w_pos, w_neg = effective_number_weights(0.99)
    # e.g. the rarest finding's positive cell: (1 - .99) / (1 - .99^1) = 1, the largest alpha
    assert w_pos[3] == pytest.approx(5.67441294, rel=1e-8)
    expected = bce(P, Y, w_pos=w_pos, w_neg=w_neg).mean()
    assert expected == pytest.approx(1.4865955894377556, rel=1e-12)
    assert loss_value(name="class_balanced", cb_beta=0.99) == pytest.approx(expected, rel=1e-5)


def test_class_balanced_weights_go_from_plain_to_inverse_frequency_and_skip_empty_cells():
    w_pos, w_neg = class_balanced_weights(N_POS, N_NEG, 0.0)
    assert w_pos.tolist() == w_neg.tolist() == [1.0] * 4  # beta = 0: no re-weighting
    w_pos, w_neg = class_balanced_weights(N_POS, N_NEG, 1 - 1e-9)  # beta -> 1: 1 / n
    ratio = (w_pos / w_neg).numpy()
    np.testing.assert_allclose(ratio, N_NEG / N_POS, rtol=1e-4)
    w_pos, w_neg = class_balanced_weights(np.array([0.0, 5.0]), np.array([10.0, 5.0]), 0.9)
    assert w_pos[0] == 1.0  # no positive: never occurs in training
    present = np.array([w_neg[0], w_pos[1], w_neg[1]])
    assert present.sum() == pytest.approx(3.0)  # the present cells sum to their number


# ------------------------------------------------------------------ ASL (Ridnik et al.)


def test_asl_matches_the_hand_value():
    p_m = np.maximum(P - 0.05, 0.0)  # the probability shift of negatives
    expected = -(Y * (1 - P) ** 1 * np.log(P) + (1 - Y) * p_m**4 * np.log(1 - p_m)).mean()
    assert expected == pytest.approx(0.26365869756779087, rel=1e-12)
    value = loss_value(name="asl", asl_gamma_pos=1.0, asl_gamma_neg=4.0, asl_clip=0.05)
    assert value == pytest.approx(expected, rel=1e-5)
    # gamma = 0 and no clip is plain BCE
    plain = loss_value(name="asl", asl_gamma_pos=0.0, asl_gamma_neg=0.0, asl_clip=0.0)
    assert plain == pytest.approx(bce(P, Y).mean(), rel=1e-5)


def test_asl_discards_easy_negatives_and_keeps_finite_gradients():
    cfg = validate_training_params({"loss": {"name": "asl", "asl_gamma_neg": 0.5}})["loss"]
    criterion = build_loss(cfg, train_labels())
    # a negative with p <= clip contributes exactly 0; a saturated positive stays finite
    z = torch.tensor([[-4.0, 40.0, -40.0, 0.0]], requires_grad=True)
    y = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    elements = criterion.elementwise(z, y)
    assert elements[0, 0].item() == 0.0 and elements[0, 2].item() == 0.0
    criterion(z, y).backward()
    assert torch.isfinite(z.grad).all()


# ------------------------------------------------------------------ logit adjustment (Menon)


def test_logit_adjusted_matches_the_hand_value():
    pi = N_POS / 100.0
    offset = np.log(pi / (1 - pi))  # log(40/60), log(10/90), log(5/95), log(1/99)
    # e.g. image 1, finding 1: 2.0 - 0.4055 = 1.5945, -log(sigmoid(1.5945)) =
    # log(1 + e^-1.5945) = log(1.20300) = 0.18482
    p_adjusted = 1.0 / (1.0 + np.exp(-(Z + offset)))
    assert bce(p_adjusted, Y)[0, 0] == pytest.approx(0.18482, abs=1e-5)
    expected = bce(p_adjusted, Y).mean()
    assert expected == pytest.approx(0.8733122006094285, rel=1e-12)
    assert loss_value(name="logit_adjusted", la_tau=1.0) == pytest.approx(expected, rel=1e-5)
    half = bce(1.0 / (1.0 + np.exp(-(Z + 0.5 * offset))), Y).mean()
    assert loss_value(name="logit_adjusted", la_tau=0.5) == pytest.approx(half, rel=1e-5)
    # no positive (or no negative): no prior to adjust by
    assert prior_log_odds(np.array([0.0, 3.0]), np.array([5.0, 0.0])).tolist() == [0.0, 0.0]


def test_logit_adjustment_is_not_in_the_predictions():
    """Predictions are the sigmoid of the model's raw logit, whatever the loss."""

    class Fixed(nn.Module):
        def forward(self, x):
            return x.mean(dim=(1, 2, 3))[:, None] * torch.arange(1.0, 5.0) - 1.0

    images = np.random.default_rng(0).integers(0, 255, (6, 4, 4)).astype(np.uint8)
    cfg = validate_training_params({"loss": {"name": "logit_adjusted"}})["loss"]
    probs, _ = predict_probabilities(
        Fixed(),
        images,
        torch.device("cpu"),
        labels=np.zeros((6, 4), np.float32),
        criterion=build_loss(cfg, train_labels()),
    )
    raw = torch.sigmoid(Fixed()(torch.tensor(images)[:, None].float() / 255)).numpy()
    np.testing.assert_allclose(probs, raw, rtol=1e-6)


# ------------------------------------------------------------------ LDAM-DRW (Cao et al.)


@pytest.mark.parametrize(
    ("scale", "plain", "reweighted"),
    [(1.0, 0.6445922469265403, 1.723083993734783), (2.0, 0.8767158063418963, 3.3438988107072785)],
)
def test_ldam_drw_matches_the_hand_value_before_and_after_drw(scale, plain, reweighted):
    counts = np.concatenate([N_POS, N_NEG])
    m = counts**-0.25
    m = m * 0.5 / m.max()  # C / n^(1/4), the largest margin 0.5 (the single positive)
    m_pos, m_neg = m[:4], m[4:]
    q = 1.0 / (1.0 + np.exp(-scale * (Z - m_pos * Y + m_neg * (1 - Y))))
    expected_plain = bce(q, Y).mean()
    w_pos, w_neg = effective_number_weights(0.99)
    expected_drw = bce(q, Y, w_pos=w_pos, w_neg=w_neg).mean()
    assert (expected_plain, expected_drw) == pytest.approx((plain, reweighted), rel=1e-12)
    loss = {
        "name": "ldam_drw",
        "ldam_max_margin": 0.5,
        "ldam_scale": scale,
        "drw_beta": 0.99,
        "drw_start_epoch": 2,
    }
    assert loss_value(epoch=1, **loss) == pytest.approx(expected_plain, rel=1e-5)
    assert loss_value(epoch=2, **loss) == pytest.approx(expected_drw, rel=1e-5)
    margins = ldam_margins(N_POS, N_NEG, 0.5)
    np.testing.assert_allclose(torch.cat(margins).numpy(), m, rtol=1e-6)


# ------------------------------------------------------------------ every loss


ALL = [
    {"name": "bce"},
    {"name": "focal"},
    {"name": "class_balanced"},
    {"name": "asl"},
    {"name": "logit_adjusted"},
    {"name": "ldam_drw", "drw_start_epoch": 0},
]


@pytest.mark.parametrize("loss", ALL, ids=lambda loss: loss["name"])
def test_every_loss_keeps_the_two_stage_mask(loss):
    """Masked findings contribute nothing; the mean is over the unmasked entries."""
    cfg = validate_training_params({"epochs": 8, "loss": loss})["loss"]
    criterion = build_loss(cfg, train_labels())
    z, y = torch.tensor(Z, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32)
    elements = criterion.elementwise(z, y)
    criterion.set_mask(torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert criterion(z, y).item() == pytest.approx(elements[:, [0, 2, 3]].mean().item(), rel=1e-6)


def test_only_the_selected_loss_keys_are_fingerprinted_and_old_fingerprints_are_kept():
    default = validate_training_params(None)
    # exactly what was fingerprinted before the long-tail keys existed: trainings finished
    # then are reused
    before = {k: v for k, v in default.items() if k != "crt"}
    before["loss"] = {k: default["loss"][k] for k in ("name", "balanced", "pos_weight_cap")}
    before["loss"]["focal_gamma"] = default["loss"]["focal_gamma"]
    for key in ("progress_bar", "resume", "reuse_finished", "device", "loader_threads"):
        before.pop(key)
    for key in ("resume_dir", "n_seeds", "tta_hflip", "eval_batch_size"):
        before.pop(key)
    # a later key, fingerprinted only when set (unset: the old fingerprints are kept too)
    before.pop("max_steps_per_epoch")
    assert result_settings(default) == before

    def settings(**loss):
        return result_settings(validate_training_params({"loss": loss}))

    assert settings(asl_gamma_neg=2.0) == settings()  # bce does not read it
    assert settings(name="asl", asl_gamma_neg=2.0) != settings(name="asl")
    for name, keys in LOSS_KEYS.items():
        assert set(settings(name=name)["loss"]) == {"name", *keys}
    # cRT settings count only when cRT is on
    off = result_settings(validate_training_params({"crt": {"lr": 0.5}}))
    assert off == result_settings(default)
    on = result_settings(validate_training_params({"crt": {"epochs": 2}}))
    assert on["crt"] == {"epochs": 2, "lr": None, "reinit_head": True}


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"loss": {"name": "cb"}}, r"training\.loss\.name: expected one of"),
        ({"loss": {"cb_beta": 1.0}}, r"training\.loss\.cb_beta: expected a value < 1"),
        ({"loss": {"asl_clip": -0.1}}, r"training\.loss\.asl_clip: expected a value >= 0"),
        ({"loss": {"la_tau": "1"}}, r"training\.loss\.la_tau: expected a number"),
        ({"loss": {"ldam_scale": 0}}, r"training\.loss\.ldam_scale: expected a value > 0"),
        (
            {"epochs": 3, "loss": {"name": "ldam_drw", "drw_start_epoch": 3}},
            r"training\.loss\.drw_start_epoch: 3 must be below the block's epochs \(3\)",
        ),
        ({"loss": {"asl_gama_neg": 1.0}}, r"training\.loss\.asl_gama_neg: unknown key"),
        ({"crt": {"epochs": -1}}, r"training\.crt\.epochs: expected a value >= 0"),
        ({"crt": {"lr": 0.0}}, r"training\.crt\.lr: expected a value > 0"),
    ],
)
def test_invalid_long_tail_params_name_the_key(over, message):
    with pytest.raises(ValueError, match=message):
        validate_training_params(over)
