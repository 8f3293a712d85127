"""Int8 adapter weights: each row within half a step of its value, and the delta they give."""

import pytest
import torch

from loraplex.kernels import cpu as cpu_kernel
from loraplex.lora.quantize import INT8_MAX, dequantize, quantize, quantize_into


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", [True, False])
def test_quantizing_into_a_slot_gives_the_bytes_of_quantize(dtype, kernel, monkeypatch):
    """Activation writes an adapter's int8 form straight into its slot (the CPU kernel in one
    pass where it is built, PyTorch elsewhere): the same bytes as quantize, nothing outside."""
    if not kernel:
        monkeypatch.setattr(cpu_kernel, "is_available", lambda *args: False)
    elif not cpu_kernel.is_available(dtype, torch.device("cpu")):
        pytest.skip("no CPU kernel here")
    gen = torch.Generator().manual_seed(2)
    a = (torch.randn(3, 4, 70, generator=gen) * 0.05).to(dtype)  # 70: a tail past 16-wide loops
    b_t = (torch.randn(3, 4, 33, generator=gen) * 0.01).to(dtype)
    a[2, 1] = 0
    a_buffer = torch.zeros(3, 2, 8, 70, dtype=torch.int8)  # [layers, slots, n * r, in]
    b_buffer = torch.zeros(3, 2, 4, 33, dtype=torch.int8)
    scales = torch.zeros(3, 2, 8)
    quantize_into(a, b_t, a_buffer[:, 1, 4:], b_buffer[:, 1], scales[:, 1, 4:])
    a_q, b_q, want_scales = quantize(a, b_t)
    assert torch.equal(a_buffer[:, 1, 4:], a_q) and torch.equal(b_buffer[:, 1], b_q)
    assert torch.equal(scales[:, 1, 4:], want_scales)
    assert not a_buffer[:, 0].any() and not a_buffer[:, 1, :4].any() and not scales[:, 0].any()


def test_the_row_quantizer_refuses_bad_layouts():
    if not cpu_kernel.is_available(torch.float32, torch.device("cpu")):
        pytest.skip("no CPU kernel here")
    src = torch.randn(2, 3, 16)
    with pytest.raises(cpu_kernel.KernelError, match="layout"):
        cpu_kernel.quantize_rows(src, torch.zeros(2, 3, 16), torch.zeros(2, 3))  # not int8
    with pytest.raises(cpu_kernel.KernelError, match="layout"):
        cpu_kernel.quantize_rows(src, torch.zeros(2, 3, 16, dtype=torch.int8), torch.zeros(3, 2))
