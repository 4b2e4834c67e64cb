"""Fused linear cross-entropy and log-probs vs the materialising reference: values and gradients,
odd shapes, several chunks, ignore_index; through the torch path and the Triton row kernel (the
interpreter on CPU), with vocabulary blocks smaller than the vocabulary and a partial last block."""

import pytest
import torch

import sputnik_kernels.cross_entropy as ce
from sputnik_kernels import fused_linear_cross_entropy, fused_linear_logprobs
from sputnik_kernels.cross_entropy import reference_cross_entropy, reference_logprobs


@pytest.fixture(autouse=True, params=["torch", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setattr(ce, "CHUNK", 7)  # force several chunks, the last one partial
    monkeypatch.setattr(ce, "BLOCK_V", 16)  # the vocabulary (37) in 3 blocks, the last one partial
    monkeypatch.setenv("SPUTNIK_KERNELS", request.param)
    return request.param


def inputs(n=23, d=13, v=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=g)
    return h, w, t


def grads(fn, h, w, *args, dy=None):
    h2, w2 = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    out = fn(h2, w2, *args)
    (out if dy is None else out * dy).sum().backward()
    return out.detach(), h2.grad, w2.grad


def test_cross_entropy_matches_reference_with_ignore_index():
    h, w, t = inputs()
    t[[0, 5, 22]] = -100
    a = grads(fused_linear_cross_entropy, h, w, t)
    b = grads(reference_cross_entropy, h, w, t)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-5)


def test_cross_entropy_scaled_upstream_gradient():
    h, w, t = inputs(seed=1)
    a = grads(lambda *z: 3.0 * fused_linear_cross_entropy(*z), h, w, t)
    b = grads(lambda *z: 3.0 * reference_cross_entropy(*z), h, w, t)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a, b))


def test_logprobs_match_reference_with_gradients():
    h, w, t = inputs(seed=2)
    dy = torch.randn(23)
    a = grads(fused_linear_logprobs, h, w, t, dy=dy)
    b = grads(reference_logprobs, h, w, t, dy=dy)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-5)


def test_shape_errors():
    h, w, t = inputs()
    with pytest.raises(ValueError, match="expected h"):
        fused_linear_cross_entropy(h, w[:, :5], t)
