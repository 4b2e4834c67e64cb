"""RMSNorm Triton kernel vs the pure-torch reference at odd shapes: output and both gradients."""

import pytest
import torch

from sputnik_kernels import rmsnorm
from sputnik_kernels.rmsnorm import rmsnorm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("shape", [(5, 123), (2, 7, 123), (3, 64), (1, 1000)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(shape, dtype, monkeypatch):
    monkeypatch.setenv("SPUTNIK_KERNELS", "triton")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_(True)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(DEVICE, dtype).requires_grad_(True)
    dy = torch.randn(*shape, generator=g).to(DEVICE, dtype)
    y = rmsnorm(x, w, 1e-6)
    y.backward(dy)
    x2, w2 = x.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    ref = rmsnorm_reference(x2, w2)
    ref.backward(dy.float())
    tol = TOL[dtype]
    assert torch.allclose(y.float(), ref, atol=tol, rtol=tol)
    assert torch.allclose(x.grad.float(), x2.grad, atol=tol, rtol=tol)
    assert torch.allclose(w.grad.float(), w2.grad, atol=tol * shape[0], rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_path_matches_reference_with_grads(dtype, monkeypatch):
    # The torch path uses torch's rms_norm; it must keep the reference's fp32 statistics.
    monkeypatch.setenv("SPUTNIK_KERNELS", "torch")
    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(6, 300, generator=g)).to(dtype).requires_grad_(True)
    w = (1 + 0.1 * torch.randn(300, generator=g)).to(dtype).requires_grad_(True)
    dy = torch.randn(6, 300, generator=g).to(dtype)
    y = rmsnorm(x, w, 1e-6)
    y.backward(dy)
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = rmsnorm_reference(x2, w2, 1e-6)
    ref.backward(dy)
    assert y.dtype == dtype and torch.equal(y, ref)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(x.grad.float(), x2.grad.float(), atol=tol, rtol=tol)
    assert torch.allclose(w.grad.float(), w2.grad.float(), atol=tol * 6, rtol=tol)


def test_dispatch_and_errors(monkeypatch):
    x, w = torch.randn(3, 8), torch.ones(8)
    monkeypatch.setenv("SPUTNIK_KERNELS", "torch")
    assert torch.equal(rmsnorm(x, w), rmsnorm_reference(x, w))
    monkeypatch.setenv("SPUTNIK_KERNELS", "fast")
    with pytest.raises(ValueError, match="SPUTNIK_KERNELS"):
        rmsnorm(x, w)
    monkeypatch.setenv("SPUTNIK_KERNELS", "torch")
    with pytest.raises(ValueError, match="last dimension 8 but weight has 7"):
        rmsnorm(x, torch.ones(7))
