import pytest
import torch

from qtool import kernels
from qtool.core.affine import quantize_int
from qtool.qtypes import get_qtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_reference_qlinear_equals_dense_matmul_on_dequantized_weight(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g)
    x = torch.randn(3, 64, generator=g).to(dtype)
    qw = quantize_int(w, get_qtype("int4"), strategy="group", group_size=32)
    y = kernels.get("qlinear")(x, qw)
    assert torch.equal(y, x @ qw.dequantize(torch.float32).to(dtype).T)


def test_unknown_op_names_the_available_ones():
    with pytest.raises(KeyError, match="qlinear"):
        kernels.get("nope")
