"""Fused linear cross-entropy: hidden states x output head -> loss (and gradients) without ever
holding the [tokens, vocab] logits, by working on chunks of tokens.

`fused_linear_cross_entropy(h, w, targets, ignore_index)` returns the mean loss over non-ignored
tokens; like Liger-Kernel, the gradients for h and w are computed chunk by chunk during the forward
pass and only scaled in the backward. `fused_linear_logprobs(h, w, targets)` returns each token's
log-probability of its target (GRPO); its backward recomputes each chunk's softmax.

Implementation: per chunk of tokens, a torch matmul gives the chunk's fp32 logits (peak extra
memory chunk x vocab); the Triton kernel `_ce_rows` then does each row's cross-entropy in one
program (after Liger-Kernel): an online max / sum-exp pass over the vocabulary in blocks, the loss
lse - logit[target], and a second pass that overwrites the logits with the gradient
(softmax - onehot) * scale in place, so no second chunk x vocab buffer exists. The torch path does
the same with torch ops (and keeps torch.softmax's rounding for fp32 weights). `reference_*` are
the naive materialising versions used in tests.

Test: `pytest tests/kernels/test_kernels_cross_entropy.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sputnik_kernels.dispatch import use_triton

CHUNK = 1024  # tokens per chunk: chunk x vocab fp32 logits at a time
BLOCK_V = 4096  # vocabulary columns per step of the Triton kernel (at most)


def reference_cross_entropy(h, w, targets, ignore_index=-100):
    return F.cross_entropy((h @ w.t()).float(), targets, ignore_index=ignore_index)


def reference_logprobs(h, w, targets):
    return torch.log_softmax((h @ w.t()).float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@triton.jit
def _ce_rows(LOGITS, stride, TARGETS, SCALE, LOSS, n_cols, ignore_index, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """One row: LOSS = lse - logit[target] (0 for ignored rows); with WRITE_GRAD the row of LOGITS
    becomes (softmax - onehot(target)) * SCALE[row], in place."""
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride
    target = tl.load(TARGETS + row)
    valid = target != ignore_index
    t_safe = tl.where(valid, target, 0)
    m = float("-inf")
    d = 0.0
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        x = tl.load(ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    x_t = tl.load(ptr + t_safe).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - x_t, 0.0))
    if WRITE_GRAD:
        scale = tl.load(SCALE + row)
        for off in range(0, n_cols, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where((cols == t_safe) & valid, 1.0, 0.0)
            tl.store(ptr + cols, g * scale, mask=mask)


def _rows_triton(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """Per-row loss of an fp32 logits chunk; with `scale`, the chunk becomes its gradient in place."""
    n, v = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss
    block = min(BLOCK_V, triton.next_power_of_2(v))
    _ce_rows[(n,)](logits, logits.stride(0), targets.contiguous(), scale if scale is not None else loss, loss, v, ignore_index,
                   WRITE_GRAD=scale is not None, BLOCK=block)
    return loss


def _softmax(logits: torch.Tensor, lse: torch.Tensor, exact: bool) -> torch.Tensor:
    """Softmax of an fp32 logits chunk. For low-precision weights (GPU) in place, so one chunk x
    vocab buffer is live instead of two; fp32 weights keep torch.softmax's exact rounding (training
    runs are compared bit for bit across versions)."""
    if exact:
        return torch.softmax(logits, dim=-1)
    return logits.sub_(lse).exp_()


def _accumulate(grad_w: torch.Tensor, g: torch.Tensor, hc: torch.Tensor) -> None:
    """grad_w += g.T @ hc. In the weight's dtype for bf16/fp16 weights: a low-precision GEMM per
    chunk (fp32 inside the tensor cores) instead of an fp32 GEMM, several times faster on a GPU."""
    if grad_w.dtype == torch.float32:
        grad_w += g.t() @ hc.float()
    else:
        grad_w.addmm_(g.t().to(grad_w.dtype), hc.to(grad_w.dtype))


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets, ignore_index):
        valid = targets != ignore_index
        n_valid = valid.sum().clamp(min=1)
        grad_h = torch.zeros_like(h) if h.requires_grad else None
        grad_w = torch.zeros(w.shape, dtype=w.dtype, device=w.device) if w.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.size(0), CHUNK):
            hc, tc, vc = h[s : s + CHUNK], targets[s : s + CHUNK], valid[s : s + CHUNK]
            logits = (hc @ w.t()).float()  # (chunk, V)
            if use_triton(logits):
                scale = vc.float() / n_valid  # d loss / d logits = (softmax - onehot) * valid / count
                total += _rows_triton(logits, tc, scale, ignore_index).sum()
                g = logits
            else:
                lse = torch.logsumexp(logits, dim=-1)
                t_safe = tc.clamp(min=0)
                total += ((lse - logits.gather(-1, t_safe.unsqueeze(-1)).squeeze(-1)) * vc).sum()
                # d loss_i / d logits = softmax - onehot, for valid tokens, divided by the count
                g = _softmax(logits, lse.unsqueeze(-1), exact=w.dtype == torch.float32)
                g.scatter_add_(-1, t_safe.unsqueeze(-1), -torch.ones_like(lse).unsqueeze(-1))
                g *= (vc.float() / n_valid).unsqueeze(-1)
            if grad_h is not None:
                grad_h[s : s + CHUNK] = (g.to(w.dtype) @ w).to(h.dtype)
            if grad_w is not None:
                _accumulate(grad_w, g, hc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w.dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.w_dtype) if grad_w is not None else None
        return gh, gw, None, None


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets):
        out = torch.empty(h.size(0), dtype=torch.float32, device=h.device)
        for s in range(0, h.size(0), CHUNK):
            logits = (h[s : s + CHUNK] @ w.t()).float()
            if use_triton(logits):
                out[s : s + CHUNK] = -_rows_triton(logits, targets[s : s + CHUNK], None, -1)
            else:
                out[s : s + CHUNK] = logits.gather(-1, targets[s : s + CHUNK].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(h, w, targets)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, w, targets = ctx.saved_tensors
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(w.shape, dtype=w.dtype, device=w.device) if ctx.needs_input_grad[1] else None
        for s in range(0, h.size(0), CHUNK):
            hc = h[s : s + CHUNK]
            logits = (hc @ w.t()).float()
            # d logp_i / d logits = onehot - softmax, times the incoming gradient
            if use_triton(logits):
                _rows_triton(logits, targets[s : s + CHUNK], -grad_out[s : s + CHUNK].float().contiguous(), -1)
                g = logits
            else:
                g = _softmax(logits, torch.logsumexp(logits, dim=-1, keepdim=True), exact=w.dtype == torch.float32).neg_()
                g.scatter_add_(-1, targets[s : s + CHUNK].unsqueeze(-1), torch.ones_like(g[:, :1]))
                g *= grad_out[s : s + CHUNK].float().unsqueeze(-1)
            if grad_h is not None:
                grad_h[s : s + CHUNK] = (g.to(w.dtype) @ w).to(h.dtype)
            if grad_w is not None:
                _accumulate(grad_w, g, hc)
        return grad_h, (grad_w.to(w.dtype) if grad_w is not None else None), None


def _check(h, w, targets):
    if h.dim() != 2 or w.dim() != 2 or h.size(1) != w.size(1) or targets.shape != h.shape[:1]:
        raise ValueError(f"expected h [N, D], w [V, D], targets [N]; got {tuple(h.shape)}, {tuple(w.shape)}, {tuple(targets.shape)}")


def fused_linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of softmax(h @ w.T) against targets, ignoring `ignore_index`."""
    _check(h, w, targets)
    return _FusedLinearCE.apply(h, w, targets, ignore_index)


def fused_linear_logprobs(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(h @ w.T)[i, targets[i]] for every row: [N] float32."""
    _check(h, w, targets)
    return _FusedLinearLogprobs.apply(h, w, targets)
