"""Static-shape decoding, one CUDA graph replay per token (issue 24, "GPU throughput").

The default sampler (model/generate.py) changes shapes at every token (the cache view grows by one
slot; finished rows leave the batch) and reads the stop check on the host after every token, so
each token pays a launch per kernel and a host sync. Here one decode step — the forward of every
row's last token against the latent cache, the next draw with that row's uniform number, its
log-prob, the stop bookkeeping — has fixed shapes and reads nothing back, so on CUDA it is
captured once as a torch.cuda.CUDAGraph and replayed per token; on CPU the same step runs eagerly
(what the tests exercise).

- Rows: the batch is padded to a row bucket (a power of two, or the decoder's row capacity);
  padding rows are born finished and write their outputs to a scratch row. At a stop check, when
  the unfinished rows fit a smaller bucket they move to the front of the buffers and decoding goes
  on with that bucket's graph. This takes the place of compact_fraction's compaction: it costs at
  most 2x the live rows and log2(rows) graphs, where compacting to every live count would need a
  graph per count.
- Cache: each layer's latent cache is one preallocated [rows, max_len, C+R] buffer. The step writes
  its token at a slot held on the device (`MLA.forward` with a tensor start_pos) and attends over a
  fixed view of the first S slots under a per-row mask (left padding, slots not yet written). S
  grows in blocks of `slot_block` (one graph per block), so attention reads about what the default
  path reads rather than the whole buffer from the first token.
- The step index, the slot and every per-row value (original row, padding, finished flag) are
  device tensors. The uniforms of every step are drawn before decoding, by the same calls on the
  same generator as the default path, so the step itself uses no RNG (with seed=None the global
  generator thus advances by max_new_tokens draws, where the default path stops at the last row).
- Stop check: read on the host every `check_every` tokens (the only sync); finished rows keep
  producing pad tokens until then, which are not returned.

Tokens equal the default path's: a row's draw depends only on its own logits and uniform (a
rounding-level difference in the logits could flip a draw only at a near-tie). Log-probs agree to
rounding (the padded batch and the longer masked cache view are other GEMM shapes). The
routed experts are recorded inside the step. Not supported: expert-parallel groups (their
all-to-all reads split sizes on the host) and exact mode (its MoE loops over the experts present):
`sample` refuses both.

A StaticDecoder keeps its buffers and graphs between calls: a rollout worker that makes one and
passes it to every `sample(..., decoder=)` captures each (rows, slots, sampling settings) once
(`static=True` alone makes a decoder, and captures, per call). The graphs read the weights where
they were at capture: updating them in place (load_state_dict) is seen; parameters replaced by new
tensors are noticed (data pointers compared each call) and the graphs captured again.

Test: `pytest tests/model/test_model_generate.py`; benchmark: `python benchmarks/model_generate.py --static`.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

from model.attention import LatentCache
from model.generate import Generation, prefill, sample_next, sampled_logprob
from model.transformer import Transformer


def row_bucket(n: int, cap: int) -> int:
    """Rows a batch of n live rows runs with: the next power of two, at most `cap`."""
    return min(cap, 1 << (n - 1).bit_length())


@dataclasses.dataclass
class _Bucket:
    """Views of the decoder's buffers for `rows` batch rows and `slots` cache slots: one step's shapes."""

    rows: int
    slots: int
    caches: list[LatentCache]  # [rows, slots, C+R] views of the full buffers
    tokens_B: torch.Tensor  # each row's last drawn token
    logits_BV: torch.Tensor  # the logits its next token is drawn from
    done_B: torch.Tensor  # finished (stop token drawn, or a padding row)
    row_B: torch.Tensor  # original row (the scratch row for padding rows)
    pad_B: torch.Tensor  # left padding of its prompt
    slots_S: torch.Tensor  # arange(slots)


class StaticDecoder:
    """Buffers and CUDA graphs for fixed-shape sampling of up to `rows` prompts with prompt + new
    tokens up to `max_len` (see the module docstring). check_every: tokens between stop checks;
    slot_block: granularity of the attended cache length; cuda_graph: capture and replay the step
    (default: on CUDA)."""

    def __init__(self, model: Transformer, *, rows: int, max_len: int, check_every: int = 8, slot_block: int = 128,
                 cuda_graph: bool | None = None):
        if rows < 1 or check_every < 1 or slot_block < 1:
            raise ValueError(f"StaticDecoder needs rows, check_every and slot_block >= 1 (got {rows}, {check_every}, {slot_block})")
        if not 1 <= max_len <= model.args.max_seq_len:
            raise ValueError(f"StaticDecoder max_len must be in [1, max_seq_len {model.args.max_seq_len}] (got {max_len})")
        device = model.embed.weight.device
        self.cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device (it is on {device})")
        self.model, self.rows, self.max_len = model, rows, max_len
        self.check_every, self.slot_block = check_every, slot_block
        R = rows + 1  # per original row, plus the scratch row (index `rows`) that padding rows write to
        self.caches = model.new_caches(rows, max_len)
        self.tokens_B = torch.zeros(rows, dtype=torch.long, device=device)
        self.logits_BV = torch.zeros(rows, model.args.vocab, dtype=model.head.weight.dtype, device=device)
        self.done_B = torch.zeros(rows, dtype=torch.bool, device=device)
        self.row_B = torch.zeros(rows, dtype=torch.long, device=device)
        self.pad_B = torch.zeros(rows, dtype=torch.long, device=device)
        self.slots_S = torch.arange(max_len, device=device)
        self.step_1 = torch.zeros(1, dtype=torch.long, device=device)  # index of the next token to draw
        self.prompt_1 = torch.zeros(1, dtype=torch.long, device=device)  # new token i sits at slot prompt + i
        self.uniform_NR = torch.zeros(max_len, R, device=device)  # [token index, original row]
        self.out_RN = torch.zeros(R, max_len, dtype=torch.long, device=device)
        self.logp_RN = torch.zeros(R, max_len, device=device)
        self.length_R = torch.zeros(R, dtype=torch.long, device=device)
        self.n_moe = len(model.main_moe_layers())
        K = model.args.n_activated_experts
        dtype = torch.uint8 if model.args.n_routed_experts <= 256 else torch.int16
        self.experts_LRSK = torch.zeros(self.n_moe, R, max_len, K, dtype=dtype, device=device) if self.n_moe else None
        self._stops: dict[int, torch.Tensor] = {}  # by count: a graph reads the one it was captured with
        self._stop_S = self._stops.setdefault(1, torch.full((1,), -1, dtype=torch.long, device=device))  # this call's stop ids
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graph else None
        self._weights: tuple[int, ...] = ()  # data pointers of the weights the graphs were captured with
        self._cfg: tuple = ()  # this call's (temperature, top_p, pad_id, stop count, record experts): baked into a graph
        self.shapes: list[tuple[int, int]] = []  # (rows, slots) of each step shape the last call ran, in order

    # --- one call --------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float, stop_token_ids,
               seed: int | None, pad_id: int, record_experts: bool) -> Generation:
        """`model.generate.sample` for the static path (called by it, after its checks)."""
        model = self.model
        if any(getattr(m, "exact", False) for m in model.modules()):
            raise ValueError("static decoding does not run in exact mode (its MoE loops over the experts present on the host); "
                             "use static=False")
        B, max_prompt = len(prompts), max(len(p) for p in prompts)
        if B > self.rows or max_prompt + max_new_tokens > self.max_len:
            raise ValueError(f"this StaticDecoder holds {self.rows} rows of {self.max_len} slots; the call needs {B} rows of "
                             f"{max_prompt + max_new_tokens} (longest prompt + max_new_tokens): make a larger one")
        device = self.step_1.device
        stops = list(stop_token_ids) or [-1]
        self._stop_S = self._stops.setdefault(len(stops), torch.empty(len(stops), dtype=torch.long, device=device))
        self._stop_S.copy_(torch.tensor(stops))
        self._cfg = (temperature, top_p, pad_id, len(stops), record_experts and self.n_moe > 0)
        weights = tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()))
        if weights != self._weights:
            self._graphs.clear()
            self._weights = weights
        if temperature > 0:  # the default path's draws: one call per token, one number per row
            generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
            for i in range(max_new_tokens):
                self.uniform_NR[i, :B] = torch.rand(B, generator=generator, device=device)

        rows = row_bucket(B, self.rows)
        self.out_RN.fill_(pad_id)
        self.length_R.fill_(max_new_tokens)
        self.step_1.zero_()
        self.prompt_1.fill_(max_prompt)
        self.row_B[:B] = torch.arange(B, device=device)
        self.pad_B[:B] = torch.tensor([max_prompt - len(p) for p in prompts], device=device)
        self.done_B[:B] = False
        self._pad_rows(B, rows)
        self.logits_BV[:B] = prefill(model, prompts, [LatentCache(c.buf_BSL[:B], c.kv_rank) for c in self.caches], pad_id=pad_id)
        if self._cfg[-1]:
            routed = model.routed_experts().view(self.n_moe, B, max_prompt, -1)
            self.experts_LRSK[:, :B, :max_prompt] = routed.to(self.experts_LRSK.dtype)

        self.shapes = []
        self._draw(self._bucket(rows, self._slots(max_prompt + 1)))  # token 0, from the prompt's logits
        for i in range(1, max_new_tokens):
            if i % self.check_every == 0:  # the only host read
                live = int((~self.done_B[:rows]).sum())
                if live == 0:
                    break
                if row_bucket(live, self.rows) < rows:
                    rows = self._step_down(rows, live, written=max_prompt + i - 1)
            self._run(self._bucket(rows, self._slots(max_prompt + i)))

        n = self.length_R[:B].tolist()
        out = self.out_RN[:B].cpu()
        return Generation(
            tokens=[out[b, : n[b]].tolist() for b in range(B)],
            logprobs=[self.logp_RN[b, : n[b]].to("cpu", copy=True) for b in range(B)],
            experts=[self.experts_LRSK[:, b, max_prompt - len(p) : max_prompt + n[b] - 1].to("cpu", copy=True)
                     for b, p in enumerate(prompts)] if self._cfg[-1] else None)

    def _slots(self, n: int) -> int:
        """Cache slots a step attends over when n of them are in use: n rounded up to slot_block."""
        return min(self.max_len, -(-n // self.slot_block) * self.slot_block)

    def _pad_rows(self, lo: int, hi: int) -> None:
        """Batch rows lo .. hi - 1 become padding: finished, no padding of their own, writing to the scratch row."""
        self.row_B[lo:hi] = self.rows
        self.pad_B[lo:hi] = 0
        self.done_B[lo:hi] = True

    def _step_down(self, rows: int, live: int, *, written: int) -> int:
        """Move the unfinished rows (their cache slots 0 .. written - 1 and per-row state) to the
        front, pad the rest of the smaller bucket: its size."""
        keep = (~self.done_B[:rows]).nonzero().squeeze(1)
        for c in self.caches:
            c.buf_BSL[:live, :written] = c.buf_BSL[keep, :written]  # the gather copies first: no overlap
        for t in (self.tokens_B, self.logits_BV, self.row_B, self.pad_B, self.done_B):
            t[:live] = t[keep]
        new = row_bucket(live, self.rows)
        self._pad_rows(live, new)
        return new

    def _bucket(self, rows: int, slots: int) -> _Bucket:
        key = (rows, slots)
        if key not in self._buckets:  # one object per shape: a graph (or a compiled step) sees the same views each time
            self._buckets[key] = _Bucket(
                rows, slots, [LatentCache(c.buf_BSL[:rows, :slots], c.kv_rank) for c in self.caches], self.tokens_B[:rows],
                self.logits_BV[:rows], self.done_B[:rows], self.row_B[:rows], self.pad_B[:rows], self.slots_S[:slots])
        return self._buckets[key]

    # --- the step ----------------------------------------------------------------------------

    def _run(self, b: _Bucket) -> None:
        """One step: eagerly, or as the CUDA graph of this shape and sampling settings (captured on
        first use)."""
        if not self.shapes or self.shapes[-1] != (b.rows, b.slots):
            self.shapes.append((b.rows, b.slots))
        if not self.cuda_graph:
            return self.step(b)
        key = (b.rows, b.slots, self._cfg)
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        # Warm-up on a side stream, as PyTorch's CUDA graph notes ask (Triton compiles its kernels,
        # cuBLAS makes its workspace): the warm-up is this token's real step. Capture only records
        # the kernels; the graph's first replay is the next token's step.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step(b)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # One memory pool for all of this decoder's graphs: they run one at a time on one stream,
        # and a step's results are copied into the decoder's own buffers before it ends.
        with torch.cuda.graph(graph, pool=self._pool):
            self.step(b)
        self._graphs[key] = graph

    def step(self, b: _Bucket) -> None:
        """Forward every row's last token at its slot, then draw the next (fixed shapes, no host
        read: what a CUDA graph captures). Slot of the last token: prompt + (tokens drawn) - 1."""
        pos_1 = self.prompt_1 + self.step_1 - 1
        seen_BS = (b.slots_S >= b.pad_B.unsqueeze(1)) & (b.slots_S <= pos_1)  # its prompt and its tokens so far
        positions_B1 = (pos_1 - b.pad_B).clamp(min=0).unsqueeze(1)
        logits = self.model(b.tokens_B.unsqueeze(1), start_pos=pos_1, caches=b.caches, positions_BT=positions_B1,
                            mask_BTS=seen_BS.unsqueeze(1))
        b.logits_BV.copy_(logits[:, -1])
        if self._cfg[-1]:
            self.experts_LRSK[:, b.row_B, pos_1] = self.model.routed_experts().to(self.experts_LRSK.dtype)
        self._draw(b)

    def _draw(self, b: _Bucket) -> None:
        """Draw token `step_1` of every row from its logits with its own uniform number (finished
        rows: pad_id), record it, its log-prob and stops, and count the step."""
        temperature, top_p, pad_id, _, _ = self._cfg
        i_1 = self.step_1
        u_B = self.uniform_NR.index_select(0, i_1).squeeze(0).index_select(0, b.row_B) if temperature > 0 else None
        nxt_B = sample_next(b.logits_BV, temperature=temperature, top_p=top_p, uniform_B=u_B)
        nxt_B = torch.where(b.done_B, pad_id, nxt_B)
        b.tokens_B.copy_(nxt_B)
        col_B = i_1.expand(b.rows)
        self.out_RN[b.row_B, col_B] = nxt_B
        self.logp_RN[b.row_B, col_B] = sampled_logprob(b.logits_BV, nxt_B, temperature=temperature, top_p=top_p)
        hit_B = (nxt_B.unsqueeze(1) == self._stop_S).any(1) & ~b.done_B  # not isin: a plain comparison never syncs
        self.length_R[b.row_B] = torch.where(hit_B, i_1 + 1, self.length_R[b.row_B])
        b.done_B.logical_or_(hit_B)
        self.step_1.add_(1)
