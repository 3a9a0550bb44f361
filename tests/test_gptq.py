import torch

from fxq.adaround import AdaRoundQuantizer
from fxq.gptq import float_target_correction, gptq_rows, rounded_quantizer
from fxq.quantizers import QSpec, WeightQuantizer


def _correlated_inputs(d: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)
    return (torch.randn(n, d, generator=g) @ mix + 0.5).double()  # a mean, as after a folded BN


def test_gptq_lowers_the_output_error_of_round_to_nearest():
    torch.manual_seed(0)
    x = _correlated_inputs(48, 2000, seed=1)
    w = torch.randn(16, 48, dtype=torch.float64)
    scale = w.abs().amax(1, keepdim=True) / 7
    h = (x.T @ x)[None]
    ints, start = gptq_rows(w[None], scale[None], h, -8, 7)
    rtn = torch.clamp(torch.round(w / scale), -8, 7)
    err_gptq = ((w - ints[0] * scale) @ x.T).pow(2).sum()
    err_rtn = ((w - rtn * scale) @ x.T).pow(2).sum()
    assert err_gptq < 0.7 * err_rtn  # measured 0.55
    assert ints.min() >= -8 and ints.max() <= 7 and torch.equal(ints, ints.round())
    # each integer is its column's compensated value rounded half up, inside the grid
    assert torch.equal(torch.clamp(torch.floor(start / scale + 0.5), -8, 7), ints)


def test_gptq_without_act_order_and_with_dead_inputs():
    x = _correlated_inputs(12, 500, seed=2)
    x[:, 3] = 0  # an input that is always zero
    w = torch.randn(4, 12, dtype=torch.float64)
    scale = w.abs().amax(1, keepdim=True) / 7
    ints, _ = gptq_rows(w[None], scale[None], (x.T @ x)[None], -8, 7, act_order=False)
    assert torch.all(ints[0, :, 3] == 0)
    rtn = torch.clamp(torch.round(w / scale), -8, 7)
    assert ((w - ints[0] * scale) @ x.T).pow(2).sum() < ((w - rtn * scale) @ x.T).pow(2).sum()


def test_rounded_quantizer_is_exactly_the_given_integers():
    w = torch.randn(8, 5)
    spec = QSpec(bits=4, signed=True, symmetric=True, per_channel=True, axis=0)
    base = WeightQuantizer(spec, w, "layer")
    s = base._scale_view(w)
    start = (torch.floor(w / s) + 0.5) * s  # every value exactly on a tie: the hardest case
    ints = torch.floor(w / s).clamp(spec.qmin, spec.qmax)  # ... rounded down anyway
    q = rounded_quantizer(base, ints, start)
    assert isinstance(q, AdaRoundQuantizer) and q.hard
    assert torch.equal(q.int_weight(w), ints.to(torch.int32))
    assert torch.allclose(q(w), ints * s)
    ceil = (torch.floor(start / s) + 1).clamp(spec.qmin, spec.qmax)  # the same ties rounded up
    up = rounded_quantizer(base, ceil, start)
    assert torch.equal(up.int_weight(w), ceil.to(torch.int32))


def _halves(x_float, x):
    n = x.shape[0] // 2
    h = torch.stack([x[:n].T @ x[:n], x[n:].T @ x[n:]])[:, None]
    m = torch.stack([x_float[:n].T @ x[:n], x_float[n:].T @ x[n:]])[:, None]
    return h, m


def test_float_targets_compensate_for_error_in_the_inputs():
    x_float = _correlated_inputs(24, 3000, seed=3)
    g = torch.Generator().manual_seed(4)
    x = x_float * 0.9 + 0.05 * torch.randn(x_float.shape, generator=g, dtype=torch.float64) + 0.1  # upstream error
    w = torch.randn(8, 24, dtype=torch.float64)
    scale = w.abs().amax(1, keepdim=True) / 7
    h, m = _halves(x_float, x)
    change, t = float_target_correction(w[None], h, m)
    assert float(t.min()) > 0.9  # 1,500 rows per half for 24 inputs: the change carries over
    plain, _ = gptq_rows(w[None], scale[None], h.sum(0), -8, 7)
    aimed, _ = gptq_rows(w[None] + change, scale[None], h.sum(0), -8, 7)

    def error(ints):
        return (w @ x_float.T - (ints[0] * scale) @ x.T).pow(2).sum()

    assert error(aimed) < 0.5 * error(plain)


def test_float_target_change_is_shrunk_where_it_would_only_fit_noise():
    # as many inputs as rows: the least-squares change fits the calibration rows exactly and
    # says nothing about other rows
    g = torch.Generator().manual_seed(5)
    x_float = _correlated_inputs(64, 160, seed=6)
    x = x_float + 0.01 * torch.randn(x_float.shape, generator=g, dtype=torch.float64)
    w = torch.randn(8, 64, dtype=torch.float64)
    h, m = _halves(x_float, x)
    change, t = float_target_correction(w[None], h, m)
    fresh = _correlated_inputs(64, 4000, seed=7)
    fresh_q = fresh + 0.01 * torch.randn(fresh.shape, generator=g, dtype=torch.float64)
    err_before = (w @ fresh.T - w @ fresh_q.T).pow(2).sum()
    err_after = (w @ fresh.T - (w + change[0]) @ fresh_q.T).pow(2).sum()
    assert float(t.mean()) < 0.5
    assert err_after <= 1.05 * err_before


def test_a_free_bias_column_absorbs_the_mean_error():
    x = _correlated_inputs(16, 2000, seed=8)  # inputs with a mean of 0.5
    w = torch.randn(6, 16, dtype=torch.float64)
    b = torch.randn(6, 1, dtype=torch.float64)
    scale = w.abs().amax(1, keepdim=True) / 7
    ones = torch.ones(x.shape[0], 1, dtype=torch.float64)
    xa = torch.cat([x, ones], 1)
    ints, start = gptq_rows(torch.cat([w, b], 1)[None], torch.cat([scale.expand_as(w), torch.ones_like(b)], 1)[None],
                            (xa.T @ xa)[None], -8, 7, free_last=True)
    q, new_bias = ints[0, :, :-1] * scale, start[0, :, -1:]
    assert torch.equal(ints[0, :, -1:], new_bias)  # the bias column is not rounded
    mean_error = (w @ x.T + b - (q @ x.T + new_bias)).mean(1)
    plain, _ = gptq_rows(w[None], scale[None], (x.T @ x)[None], -8, 7)
    plain_mean_error = (w @ x.T - (plain[0] * scale) @ x.T).mean(1)
    assert float(mean_error.abs().max()) < 0.1 * float(plain_mean_error.abs().max())


def test_grouped_convolution_gets_one_hessian_per_group():
    import torch.nn.functional as F
    from torch import nn

    from fxq import ops
    from fxq.capture import capture
    from fxq.gptq import layer_statistics

    conv = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=3, bias=False).eval()
    x = torch.randn(2, 6, 7, 7, generator=torch.Generator().manual_seed(9))
    gm = capture(conv, (x,))
    node = next(n for n in gm.graph.nodes if ops.is_op(n, ops.CONV_OPS))
    hessian, cross = layer_statistics(node, [x, x], conv.weight.shape, 3, chunk=2)  # chunks of 2, then 1 group
    assert hessian.shape == (2, 3, 18, 18) and cross is None
    for g in range(3):
        cols = F.unfold(x[:, 2 * g:2 * g + 2], 3, padding=1, stride=2)  # [N, 18, L]
        want = torch.einsum("nil,njl->ij", cols, cols).double()
        assert torch.allclose(hessian[0, g], want, rtol=1e-5, atol=1e-4)
        assert torch.allclose(hessian[1, g], want, rtol=1e-5, atol=1e-4)  # the odd batch: the same x
