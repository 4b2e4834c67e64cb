"""MoE dispatch kernels vs their pure-torch references at odd shapes with empty experts: routing
metadata, permute / unpermute (with the routing-weight gradient), grouped GEMM (outputs, dx, dw),
and the whole expert MLP against a per-token loop."""

import pytest
import torch
import torch.nn.functional as F

from sputnik_kernels.moe import (grouped_mm, grouped_mm_reference, permute, permute_reference, routing_metadata, unpermute,
                         unpermute_reference)
from sputnik_kernels.swiglu import swiglu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def route(T, k, E, used, seed):
    """[T, k] distinct expert ids per token, drawn only from `used` (the other experts get no tokens)."""
    g = torch.Generator().manual_seed(seed)
    used = torch.tensor(used)
    return torch.stack([used[torch.randperm(len(used), generator=g)[:k]] for _ in range(T)]).to(DEVICE)


def close(a, b, tol, scale=1.0):
    return torch.allclose(a.float(), b.float(), atol=tol * scale, rtol=tol)


def test_routing_metadata():
    ids = route(37, 3, 7, used=[0, 2, 3, 6], seed=0)
    m = routing_metadata(ids, 7, block=16)
    counts = torch.bincount(ids.flatten(), minlength=7)
    assert m.counts_E.dtype == m.offsets_E.dtype == m.padded_offsets_E.dtype == torch.int32
    assert torch.equal(m.counts_E.long(), counts) and torch.equal(m.offsets_E.long(), counts.cumsum(0))
    assert counts[1] == counts[4] == counts[5] == 0
    # expert-sorted, stable (token order within an expert), and pos inverts pair
    assert torch.equal(ids.flatten()[m.pair_P], ids.flatten().sort(stable=True).values)
    assert torch.equal(m.pair_P, ids.flatten().argsort(stable=True))
    assert torch.equal(m.token_P, m.pair_P // 3)
    assert torch.equal(m.pos_P[m.pair_P], torch.arange(37 * 3, device=DEVICE))
    padded = torch.diff(m.padded_offsets_E.long(), prepend=torch.zeros(1, dtype=torch.long, device=DEVICE))
    assert torch.equal(padded % 16, torch.zeros_like(padded))
    assert ((padded >= counts) & (padded - counts < 16)).all()


GEMM_CASES = {
    "odd": ([40, 0, 50, 0, 33], 77, 45),  # M=123, experts 1 and 3 empty
    "first_last_empty": ([0, 64, 31, 0], 33, 70),
    "one_expert": ([123], 77, 45),
    "no_rows": ([0, 0, 0], 20, 17),
}


@pytest.mark.parametrize("case", GEMM_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_mm_matches_reference(case, dtype, monkeypatch):
    monkeypatch.setenv("SPUTNIK_KERNELS", "triton")
    counts, K, N = GEMM_CASES[case]
    M, E = sum(counts), len(counts)
    offsets = torch.tensor(counts).cumsum(0).to(DEVICE, torch.int32)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype).requires_grad_(True)
    w = (torch.randn(E, K, N, generator=g) / K**0.5).to(DEVICE, dtype).requires_grad_(True)
    dy = torch.randn(M, N, generator=g).to(DEVICE, dtype)
    y = grouped_mm(x, w, offsets)
    y.backward(dy)
    x2, w2 = x.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    ref = grouped_mm_reference(x2, w2, offsets)
    ref.backward(dy.float())
    tol = TOL[dtype]
    assert y.shape == (M, N) and y.dtype == dtype
    assert close(y, ref, tol) and close(x.grad, x2.grad, tol)
    assert close(w.grad, w2.grad, tol, scale=max(counts) ** 0.5)
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.equal(w.grad[e], torch.zeros_like(w.grad[e]))  # zero-token experts: dw = 0


@pytest.mark.parametrize("K, N", [(32, 16), (77, 45)])  # torch._grouped_mm on CPU / the segment loop
def test_grouped_mm_torch_path_matches_reference(K, N, monkeypatch):
    monkeypatch.setenv("SPUTNIK_KERNELS", "torch")
    counts = [0, 40, 0, 50, 33, 0]
    offsets = torch.tensor(counts).cumsum(0).to(DEVICE, torch.int32)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(sum(counts), K, generator=g).to(DEVICE).requires_grad_(True)
    w = torch.randn(len(counts), K, N, generator=g).to(DEVICE).requires_grad_(True)
    dy = torch.randn(sum(counts), N, generator=g).to(DEVICE)
    y = grouped_mm(x, w, offsets)
    y.backward(dy)
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = grouped_mm_reference(x2, w2, offsets)
    ref.backward(dy)
    assert torch.allclose(y, ref, atol=1e-5) and torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert torch.allclose(w.grad, w2.grad, atol=1e-4) and w.grad[[0, 2, 5]].abs().max() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_permute_unpermute_match_reference(dtype, monkeypatch):
    monkeypatch.setenv("SPUTNIK_KERNELS", "triton")
    T, k, E, D = 41, 3, 6, 45
    meta = routing_metadata(route(T, k, E, used=[1, 2, 4, 5], seed=1), E)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, D, generator=g).to(DEVICE, dtype).requires_grad_(True)
    y = torch.randn(T * k, D, generator=g).to(DEVICE, dtype).requires_grad_(True)
    wts = torch.rand(T, k, generator=g).to(DEVICE, dtype).requires_grad_(True)
    dx_p, d_out = torch.randn(T * k, D, generator=g).to(DEVICE, dtype), torch.randn(T, D, generator=g).to(DEVICE, dtype)

    xp = permute(x, meta)
    out = unpermute(y, meta, wts)
    torch.autograd.backward([xp, out], [dx_p, d_out])
    x2, y2, w2 = (t.detach().float().requires_grad_(True) for t in (x, y, wts))
    xp_ref = permute_reference(x2, meta)
    out_ref = unpermute_reference(y2, meta, w2)
    torch.autograd.backward([xp_ref, out_ref], [dx_p.float(), d_out.float()])

    tol = TOL[dtype]
    assert torch.equal(xp.float(), xp_ref) and close(out, out_ref, tol)
    assert close(x.grad, x2.grad, tol) and close(y.grad, y2.grad, tol)
    assert close(wts.grad, w2.grad, tol, scale=D**0.5)  # d(weights): a dot product over D


def expert_mlp(x, ids, wts, w1, w3, w2):
    """The routed-expert MLP composed from the dispatch kernels."""
    meta = routing_metadata(ids, w1.shape[0])
    xp = permute(x, meta)
    h = swiglu(grouped_mm(xp, w1, meta.offsets_E), grouped_mm(xp, w3, meta.offsets_E))
    return unpermute(grouped_mm(h, w2, meta.offsets_E), meta, wts)


def per_token_loop(x, ids, wts, w1, w3, w2):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            h = F.silu(x[t] @ w1[e]) * (x[t] @ w3[e])
            out[t] += wts[t, j] * (h @ w2[e])
    return out


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_expert_mlp_matches_per_token_loop(kernels, monkeypatch):
    monkeypatch.setenv("SPUTNIK_KERNELS", kernels)
    T, k, E, D, I = 37, 3, 5, 45, 29
    ids = route(T, k, E, used=[0, 2, 3, 4], seed=4)  # expert 1 gets no tokens
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, D, generator=g)
    wts = torch.rand(T, k, generator=g)
    w1, w3 = torch.randn(E, D, I, generator=g) / D**0.5, torch.randn(E, D, I, generator=g) / D**0.5
    w2 = torch.randn(E, I, D, generator=g) / I**0.5
    leaves = [t.to(DEVICE).requires_grad_(True) for t in (x, wts, w1, w3, w2)]
    ref_leaves = [t.to(DEVICE).requires_grad_(True) for t in (x, wts, w1, w3, w2)]
    dy = torch.randn(T, D, generator=g).to(DEVICE)

    y = expert_mlp(leaves[0], ids, *leaves[1:])
    y.backward(dy)
    ref = per_token_loop(ref_leaves[0], ids, *ref_leaves[1:])
    ref.backward(dy)
    assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(["x", "weights", "w1", "w3", "w2"], leaves, ref_leaves):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-5), name
    assert torch.equal(leaves[2].grad[1], torch.zeros_like(leaves[2].grad[1]))


def test_bad_shapes_are_errors():
    x, w = torch.ones(6, 4), torch.ones(3, 4, 2)
    with pytest.raises(ValueError, match="one end row per expert"):
        grouped_mm(x, w, torch.tensor([2, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="w \\[E, K, N\\]"):
        grouped_mm(x, torch.ones(3, 5, 2), torch.tensor([2, 4, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="cast one"):
        grouped_mm(x, w.double(), torch.tensor([2, 4, 6], dtype=torch.int32))
    meta = routing_metadata(torch.tensor([[0, 1], [2, 1]]), 3)
    with pytest.raises(ValueError, match="permute: x must be \\[2, D\\]"):
        permute(torch.ones(3, 4), meta)
    with pytest.raises(ValueError, match="weights must be \\[2, 2\\]"):
        unpermute(torch.ones(4, 4), meta, torch.ones(2, 3))
