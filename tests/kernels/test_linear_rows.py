"""linear_rows (kernels/linear_rows.py) against F.linear, and its refusals."""

import pytest
import torch
import torch.nn.functional as F

from loraplex.kernels import linear_rows
from loraplex.kernels.cpu import KernelError
from tests.kernels.test_cpu import needs_compiler

pytestmark = needs_compiler


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16])
@pytest.mark.parametrize("in_features", [64, 577])  # 577: a tail past the last 16 columns
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(dtype, rows, in_features, bias):
    gen = torch.Generator().manual_seed(rows * in_features)
    out_features = 1031  # not a multiple of the 4 rows a block reads
    x = torch.randn(rows, in_features + 7, generator=gen).to(dtype)[:, :in_features]  # strided
    weight = torch.randn(out_features, in_features, generator=gen).to(dtype)
    b = torch.randn(out_features, generator=gen).to(dtype) if bias else None
    got = linear_rows.linear(x, weight, b)
    # The exact sums of the (rounded) inputs in float64, then rounded once as the kernel does.
    exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
    assert got.dtype == dtype and got.shape == (rows, out_features)
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-4)
    else:  # one rounding to bf16 (2^-8 relative) of sums of ~sqrt(577) size
        torch.testing.assert_close(got.double(), exact, rtol=8e-3, atol=0.05)
        want = F.linear(x, weight, b)
        assert (got != want).float().mean() < 0.05  # PyTorch differs only where sums round apart


def test_takes_a_few_rows_only():
    assert linear_rows.takes(torch.zeros(linear_rows.MAX_ROWS, 8))
    assert not linear_rows.takes(torch.zeros(linear_rows.MAX_ROWS + 1, 8))
    assert not linear_rows.takes(torch.zeros(4, 8).t())  # columns not contiguous


@pytest.mark.parametrize("case", ["dtype", "shape", "bias", "rows"])
def test_refuses_tensors_it_cannot_take(case):
    x, weight, bias = torch.zeros(2, 8), torch.zeros(5, 8), None
    if case == "dtype":
        weight = weight.to(torch.bfloat16)
    elif case == "shape":
        weight = torch.zeros(5, 9)
    elif case == "bias":
        bias = torch.zeros(4)
    else:
        x = torch.zeros(linear_rows.MAX_ROWS + 1, 8)
    with pytest.raises(KernelError, match="linear_rows"):
        linear_rows.linear(x, weight, bias)
