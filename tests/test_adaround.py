"""AdaRound building blocks: h(alpha) starts at the fractional part, hard rounding lands on the
grid, the regularizer pushes h to {0, 1}, and learning the rounding beats rounding to nearest on
a layer's output."""
import torch

from fxq.adaround import AdaRoundQuantizer, alpha_for, beta_schedule, rectified_sigmoid, rounding_loss
from fxq.quantizers import QSpec, WeightQuantizer

W4 = QSpec(bits=4, signed=True, symmetric=True, per_channel=True, axis=0)


def _quantizer(w):
    return AdaRoundQuantizer(WeightQuantizer(W4, w, "layer"), w)


def test_initial_h_equals_the_fractional_part():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    q = _quantizer(w)
    scaled = w / q.scale[:, None]
    torch.testing.assert_close(rectified_sigmoid(q.alpha), scaled - torch.floor(scaled), atol=1e-5, rtol=0)
    # soft forward at initialization reproduces the float weight (inside the clipping range)
    inside = (scaled >= W4.qmin) & (scaled <= W4.qmax - 1)
    torch.testing.assert_close(q(w)[inside], w[inside], atol=1e-5, rtol=0)


def test_alpha_for_inverts_the_rectified_sigmoid():
    f = torch.linspace(0.01, 0.99, 50)
    torch.testing.assert_close(rectified_sigmoid(alpha_for(f)), f, atol=1e-6, rtol=0)


def test_hard_rounding_lands_on_the_grid_and_matches_int_weight():
    torch.manual_seed(1)
    w = torch.randn(4, 9)
    q = _quantizer(w)
    with torch.no_grad():
        q.alpha.normal_()
    q.harden()
    out = q(w)
    ints = out / q.scale[:, None]
    torch.testing.assert_close(ints, torch.round(ints), atol=1e-5, rtol=0)
    torch.testing.assert_close(q.int_weight(w).float(), torch.round(ints), atol=0, rtol=0)
    assert int(q.int_weight(w).min()) >= W4.qmin and int(q.int_weight(w).max()) <= W4.qmax
    assert set(torch.unique(q.int_weight(w) - q.floor.int()).tolist()) <= {0, 1}


def test_regularizer_decreases_as_h_moves_to_zero_or_one():
    w = torch.randn(2, 4)
    q = _quantizer(w)
    before = float(q.regularizer(2.0).detach())
    with torch.no_grad():
        q.alpha.mul_(10)  # push every h towards 0 or 1
    assert float(q.regularizer(2.0).detach()) < before


def test_beta_schedule_has_warmup_then_anneals_20_to_2():
    assert beta_schedule(0, 100) is None and beta_schedule(19, 100) is None
    assert beta_schedule(20, 100) == 20.0
    assert abs(beta_schedule(100, 100) - 2.0) < 1e-9
    assert rounding_loss([], 5.0, 0.01).item() == 0.0


def test_learned_rounding_beats_round_to_nearest_on_layer_output():
    torch.manual_seed(2)
    w = torch.randn(16, 32) * 0.5
    x = 1.0 + 0.2 * torch.randn(256, 32)  # mostly-mean inputs: rounding errors add up coherently
    target = x @ w.t()
    nearest = WeightQuantizer(W4, w, "layer")
    err_nearest = float(((x @ nearest(w).t()) - target).pow(2).mean())
    q = _quantizer(w)
    opt = torch.optim.Adam([q.alpha], lr=1e-2)
    steps = 1000
    for step in range(steps):
        rec = ((x @ q(w).t()) - target).pow(2).sum(1).mean()
        loss = rec + rounding_loss([q], beta_schedule(step, steps), 3e-2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    q.harden()
    err_learned = float(((x @ q(w).t()) - target).pow(2).mean())
    assert err_learned < 0.5 * err_nearest
