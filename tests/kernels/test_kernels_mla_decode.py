"""Absorbed MLA decode attention: the Triton kernel vs the pure-torch reference at odd shapes (left
padding, masked slots, causal verify steps, split-K over the slots), and the model decoding with
the kernel gives the torch path's tokens."""

import pytest
import torch

from model import Transformer, load_model_args
from model.generate import sample
from sputnik_kernels.mla_decode import mla_decode, mla_decode_reference, mla_decode_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 runs on CPU too: under the interpreter the kernel takes its tl.dots in fp32 (same values)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
B, H, C, R, S = 3, 5, 48, 16, 37
PADS = [0, 5, 20]  # left padding per row; row 2's first 16-slot block (and split) is all padding


def inputs(T, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q_BTHL = torch.randn(B, T, H, C + R, generator=g)
    cache_BSL = torch.randn(B, S + 3, C + R, generator=g)[:, :S]  # a prefix of a longer buffer, as in MLA
    slots = torch.arange(S)
    valid_BS = slots.unsqueeze(0) >= torch.tensor(PADS).unsqueeze(1)
    causal_TS = slots.unsqueeze(0) <= (S - T + torch.arange(T)).unsqueeze(1)
    mask_BTS = valid_BS.unsqueeze(1) & causal_TS.unsqueeze(0)
    return q_BTHL.to(DEVICE, dtype), cache_BSL.to(DEVICE, dtype), mask_BTS.to(DEVICE)


def close(got, q, cache, mask, tol):
    ref = mla_decode_reference(q.float(), cache.float(), C, 0.2, mask)  # fp32 truth from the same inputs
    assert got.shape == ref.shape and got.dtype == q.dtype
    return torch.allclose(got.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("T", [1, 3, 4])  # T*H = 5, 15, 20 query rows: one or two blocks of 16
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(T, splits, dtype):
    q, cache, mask = inputs(T, dtype)
    with torch.no_grad():
        masked = mla_decode_triton(q, cache, C, 0.2, mask, splits=splits, block_s=16)
        causal = mla_decode_triton(q, cache, C, 0.2, None, splits=splits, block_s=16)  # no mask: causal, queries last
    assert close(masked, q, cache, mask, TOL[dtype])
    assert close(causal, q, cache, None, TOL[dtype])
    if T > 1:  # the causal default is the explicit causal mask without padding
        full = torch.ones(B, T, S, dtype=torch.bool, device=DEVICE).tril(S - T)
        assert torch.allclose(mla_decode_reference(q, cache, C, 0.2, None).float(), mla_decode_reference(q, cache, C, 0.2, full).float())


def test_generate_style_mask_views(monkeypatch):
    """generate()'s decode mask is valid_BS[:, None, :S]: a strided, broadcast view, read as it is."""
    monkeypatch.setenv("SPUTNIK_KERNELS", "triton")
    q, cache, _ = inputs(1, torch.float32, seed=1)
    valid_BS = torch.arange(S + 4, device=DEVICE).unsqueeze(0) >= torch.tensor(PADS, device=DEVICE).unsqueeze(1)
    step_mask = valid_BS[:, None, :S]
    with torch.no_grad():
        got = mla_decode(q, cache, C, 0.2, step_mask)
    assert close(got, q, cache, step_mask, TOL[torch.float32])


def test_dispatch_and_errors(monkeypatch):
    q, cache, mask = inputs(2, torch.float32)
    monkeypatch.setenv("SPUTNIK_KERNELS", "torch")
    assert torch.equal(mla_decode(q, cache, C, 0.2, mask), mla_decode_reference(q, cache, C, 0.2, mask))
    with pytest.raises(ValueError, match="do not match"):
        mla_decode(q, cache[..., :-1], C, 0.2, mask)
    with pytest.raises(ValueError, match="is torch.float32 but the cache is torch.float64"):
        mla_decode(q, cache.double(), C, 0.2, mask)
    with pytest.raises(ValueError, match="mask must be bool"):
        mla_decode(q, cache, C, 0.2, mask.float())
    monkeypatch.setenv("SPUTNIK_KERNELS", "triton")
    with pytest.raises(AssertionError, match="no_grad"):  # inference only: no backward
        mla_decode(q.requires_grad_(), cache, C, 0.2, mask)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Transformer(load_model_args("tiny", vocab=97, init_std=0.08)).to(DEVICE).eval()


def test_generate_with_kernel_matches_torch_path(tiny, monkeypatch):
    """Greedy decoding of left-padded prompts: the same tokens, log-probs to float rounding.
    (SPUTNIK_KERNELS=triton runs every kernel interpreted: few tokens.)"""
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    runs = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("SPUTNIK_KERNELS", mode)
        runs[mode] = sample(tiny, prompts, max_new_tokens=4, temperature=0, record_experts=False)
    assert runs["triton"].tokens == runs["torch"].tokens
    for a, b in zip(runs["triton"].logprobs, runs["torch"].logprobs):
        assert torch.allclose(a, b, atol=1e-4)


def test_cached_verify_step_equals_uncached_forward(tiny, monkeypatch):
    """A multi-token verify step (T=3 new tokens, no mask: causal against the cache) gives the
    uncached forward's logits at those positions."""
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24, 25, 26, 27]], device=DEVICE)
    monkeypatch.setenv("SPUTNIK_KERNELS", "torch")
    with torch.no_grad():
        full = tiny(tokens)
    monkeypatch.setenv("SPUTNIK_KERNELS", "triton")
    with torch.no_grad():
        caches = tiny.new_caches(2, 8)
        tiny(tokens[:, :5], caches=caches)
        step = tiny(tokens[:, 5:], start_pos=5, caches=caches)
    assert torch.allclose(step, full[:, 5:], atol=1e-4)
