"""SwiGLU Triton kernel vs the pure-torch reference at odd shapes: output and both gradients."""

import pytest
import torch

from sputnik_kernels import swiglu
from sputnik_kernels.swiglu import swiglu_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("shape", [(5, 123, 123), (7, 1), (1025,)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(shape, dtype, monkeypatch):
    monkeypatch.setenv("SPUTNIK_KERNELS", "triton")
    g = torch.Generator().manual_seed(1)
    gate = (3 * torch.randn(*shape, generator=g)).to(DEVICE, dtype).requires_grad_(True)
    up = torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_(True)
    dy = torch.randn(*shape, generator=g).to(DEVICE, dtype)
    y = swiglu(gate, up)
    y.backward(dy)
    g2, u2 = gate.detach().float().requires_grad_(True), up.detach().float().requires_grad_(True)
    ref = swiglu_reference(g2, u2)
    ref.backward(dy.float())
    tol = TOL[dtype]
    assert torch.allclose(y.float(), ref, atol=tol, rtol=tol)
    assert torch.allclose(gate.grad.float(), g2.grad, atol=tol, rtol=tol)
    assert torch.allclose(up.grad.float(), u2.grad, atol=tol, rtol=tol)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        swiglu(torch.ones(3), torch.ones(4))
