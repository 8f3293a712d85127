"""Int8 adapter weights: each row within half a step of its value, and the delta they give."""

import torch

from loraplex.lora.quantize import INT8_MAX, dequantize, quantize


def test_rows_round_to_within_half_a_step_and_zero_rows_stay_zero():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, 40, generator=gen)  # [layers, r, in]
    b_t = torch.randn(3, 4, 24, generator=gen) * 0.01  # [layers, r, out]: another magnitude
    a[1, 2] = 0  # a padded rank row
    b_t[0, 3] = 0
    a_q, b_q, scales = quantize(a, b_t)
    assert a_q.dtype == b_q.dtype == torch.int8 and scales.dtype == torch.float32
    assert a_q.shape == a.shape and b_q.shape == b_t.shape and scales.shape == (3, 4)
    assert a_q.abs().max() == INT8_MAX and b_q.abs().max() == INT8_MAX  # absmax per row
    a_step = a.abs().amax(-1, keepdim=True) / INT8_MAX
    b_step = b_t.abs().amax(-1, keepdim=True) / INT8_MAX
    assert ((a_q.float() * a_step - a).abs() <= a_step / 2 + 1e-7).all()
    assert ((b_q.float() * b_step - b_t).abs() <= b_step / 2 + 1e-9).all()
    assert not a_q[1, 2].any() and scales[1, 2] == 0 and scales[0, 3] == 0
    # The scales carry both rows' steps: the dequantized pair gives the quantized delta.
    a_hat, b_hat = dequantize(a_q, b_q, scales)
    x = torch.randn(40, generator=gen)
    want = (a_q.float() * a_step @ x)[..., None] * (b_q.float() * b_step)  # [layers, r, out]
    got = (a_hat @ x)[..., None] * b_hat
    torch.testing.assert_close(got.sum(1), want.sum(1))


def test_the_rounding_stays_below_bf16s_own_on_a_layer_output():
    """What lora_dtype="int8" costs on a rank-16 delta of the default model's shape: about 1% of
    the delta (bf16 weights: 0.24%), which on a layer output the delta is 5% of stays below
    the output's own rounding to bf16."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(16, 576, generator=gen) * 576**-0.5
    b_t = torch.randn(16, 1536, generator=gen) * 16**-0.5
    x = torch.randn(64, 576, generator=gen)
    delta = x @ a.T @ b_t
    a_hat, b_hat = dequantize(*quantize(a, b_t))
    error = x @ a_hat.T @ b_hat - delta
    assert error.norm() / delta.norm() < 0.015
    y = torch.randn(64, 1536, generator=gen)
    y *= 20 * delta.norm() / y.norm()  # the base output, 20 times the delta
    assert error.norm() < (y.bfloat16().float() - y).norm()
