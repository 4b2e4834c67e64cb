"""The memory plan of `sputnik plan`: bytes each role needs per rank, before anything launches.

Pure arithmetic from `ModelArgs` and the config sections; parameters are counted exactly from the
model's shapes (built on the meta device). Per rank of each role:
- parameters: the compute copy (bf16 on GPU, fp32 on CPU) plus DeepSpeed's fp32 master partition
  (ZeRO 1-3 keep one even for an fp32 model) and the owned experts' masters (orchestrator/expert_shard.py);
- optimizer: AdamW's two fp32 moments, sharded over the data-parallel ranks from ZeRO-1 (owned
  experts: over nothing, each rank updates its E/K experts), in host memory with offload;
- gradients: what the optimizer step holds (ZeRO-2 and 3 shard them); AdamW is fused (one pass per
  tensor, no temporaries: ds_config.adamw_params);
- buffers: DeepSpeed's buckets (capped at the model's size by ds_config.deepspeed_config), ZeRO-3's
  gathered layer, the model's buffers (RoPE table), a colocated reference model;
- activations: what autograd saves for one micro-batch (`activation_bytes`, derived from
  model/transformer.py, attention.py and moe.py with the kernels' autograd Functions; with
  activation checkpointing the blocks' inputs plus one block recomputed), and the loss's chunk of logits;
- kv cache: a sampler's MLA latent cache, (kv_lora_rank + qk_rope_head_dim) values per token per
  layer for one generate call (prompts per call x group size, prompt + max_new_tokens positions).
The peak is parameters + optimizer + buffers + the larger of (activations + cache) and the
gradients: activations are freed by the time the optimizer steps.

Test: `pytest tests/orchestrator/test_orch_memory_plan.py` (the plan against measured peaks on CPU).
"""

from __future__ import annotations

import dataclasses
import math

from model.args import ModelArgs

GIB = 2**30
DS_BUCKET, DS_PREFETCH, DS_PERSIST = int(5e8), int(5e7), int(1e5)  # DeepSpeed's defaults, as ds_config caps them
CE_CHUNK = 1024  # sputnik_kernels/cross_entropy.py: tokens of fp32 logits at a time
DEFAULT_GPU_GIB = 80.0  # an H100's memory when the cluster description gives none
DEFAULT_HOST_GIB = 64.0  # a CPU node's memory when none is given


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Parameters of a ModelArgs, by part (routed experts and MTP counted apart)."""

    total: int  # every parameter, the MTP modules' included
    routed: int  # routed experts' w1/w2/w3, the MTP modules' included
    mtp: int  # the MTP modules' (their routed experts included)
    routed_mtp: int  # the MTP modules' routed experts
    embed: int
    head: int
    activated: int  # used per token by the main model: all but n_routed - n_activated experts, MTP excluded
    numels: tuple[int, ...]  # each non-routed tensor's size (ZeRO-3 keeps the small ones whole)
    routed_numels: tuple[int, ...]  # each routed-expert tensor's size
    buffer_bytes: int  # the RoPE table, gate biases, expert loads

    @property
    def main(self) -> int:
        return self.total - self.mtp


def count_parameters(args: ModelArgs) -> ParamCount:
    """Exact counts from the model built on the meta device (no memory, no initialisation cost)."""
    import torch

    from model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(args)
    named = list(model.named_parameters())
    routed = sum(p.numel() for n, p in named if ".experts.w" in n)
    mtp = sum(p.numel() for n, p in named if n.startswith("mtp."))
    total = sum(p.numel() for _, p in named)
    main_routed = sum(p.numel() for n, p in named if ".experts.w" in n and not n.startswith("mtp."))
    activated = total - mtp - main_routed + main_routed // args.n_routed_experts * args.n_activated_experts
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return ParamCount(total=total, routed=routed, mtp=mtp, routed_mtp=routed - main_routed, embed=model.embed.weight.numel(), head=model.head.weight.numel(),
                      activated=activated, numels=tuple(p.numel() for n, p in named if ".experts.w" not in n),
                      routed_numels=tuple(p.numel() for n, p in named if ".experts.w" in n),
                      buffer_bytes=buffers)


# ---------------------------------------------------------------------------------------------
# Activations: what autograd saves for one micro-batch
# ---------------------------------------------------------------------------------------------


def _norm(n: int, d: int, w: int, gpu: bool) -> int:
    """RMSNorm saves its input and fp32 1/rms per row; torch's composite (CPU) also x / rms, for the weight's gradient."""
    return n * d * w * (1 if gpu else 2) + n * 4


def attention_saved(args: ModelArgs, n: int, w: int, gpu: bool) -> int:
    """MLA's training path (`MLA._expanded`) for n tokens, w bytes per activation value; the block's
    normalised input counted here, once for all projections that read it."""
    H, qk, C, R = args.n_heads, args.qk_head_dim, args.kv_lora_rank, args.qk_rope_head_dim
    b = n * args.dim * w  # attn_norm(x), read by wq/wq_a and wkv_a
    if args.q_lora_rank:
        b += _norm(n, args.q_lora_rank, w, gpu) + n * args.q_lora_rank * w  # q_norm's input, wq_b's input
    # kv_norm reads a column slice of wkv_a's output: the Triton kernel copies it, torch keeps the whole
    b += _norm(n, C, w, gpu) + (0 if gpu else n * R * w) + n * C * w  # ... and wkv_b's input
    v_dim = qk if args.attn_pad_v else args.v_head_dim
    b += n * H * (2 * qk + v_dim) * w  # q, k (cat) and v (padded) for SDPA
    b += n * H * v_dim * w + n * H * 4  # SDPA's output and fp32 log-sum-exp
    return b + n * H * args.v_head_dim * w  # wo's input (the output reshaped)


def _mlp_saved(n: int, inter: int, w: int, gpu: bool) -> int:
    """w1 and w3 outputs kept for SwiGLU (torch's silu * up also keeps silu), w2's input; not the input."""
    return n * inter * w * (3 if gpu else 4)


def moe_saved(args: ModelArgs, n: int, w: int, gpu: bool) -> int:
    """DeepSeekMoE for n tokens (P = n x K (token, expert) pairs, sorted by expert), input not counted."""
    E, K, D, I = args.n_routed_experts, args.n_activated_experts, args.dim, args.moe_inter_dim
    P = n * K
    b = n * E * 4 + n * K * (8 + 4) + n * 4  # gate: sigmoid s, expert ids, top-k weights and their sum (fp32)
    if w != 4:
        b += n * D * 4 + n * K * w  # the gate's fp32 input; the weights cast for the combine
    if args.seq_aux_loss_alpha > 0:
        b += n * 4  # the sequence-wise loss's row sums
    b += 2 * P * 8 + P * D * w  # permute/unpermute positions, the permuted rows x_P
    if not gpu and P >= 16 * E:  # CPU: gate and up as one grouped GEMM over a [w1 | w3] copy
        b += E * D * 2 * I * w + P * I * w  # ... and torch's SwiGLU keeps silu(gate)
    b += 2 * P * I * w + P * I * w + P * D * w  # gate/up outputs, SwiGLU output, expert outputs
    if not gpu:
        b += P * D * w + P * 4  # torch's unpermute keeps the rows scaled by their gate weights
    if args.n_shared_experts:
        b += _mlp_saved(n, args.n_shared_experts * I, w, gpu)
    return b


def block_saved(args: ModelArgs, layer: int, n: int, w: int, gpu: bool) -> int:
    """One Block (layer index `layer`) for n tokens: both norms' inputs, attention, the FFN."""
    b = _norm(n, args.dim, w, gpu) + attention_saved(args, n, w, gpu) + _norm(n, args.dim, w, gpu)
    b += n * args.dim * w  # ffn_norm(h), read by the FFN
    if layer < args.n_dense_layers:
        return b + _mlp_saved(n, args.inter_dim, w, gpu)
    return b + moe_saved(args, n, w, gpu)


def activation_bytes(args: ModelArgs, batch: int, seq: int, *, w: int, gpu: bool, checkpointing: bool,
                     loss: str = "ce") -> int:
    """Peak bytes of one micro-batch [batch, seq] between the forward and the backward: what autograd
    saves, plus the loss's transient chunk of logits. loss "ce": pretraining's cross-entropy (the
    fused kernel computes both gradients in the forward and keeps them: [N, D] and [V, D] per head
    call); "logprobs": a GRPO learner's target log-probs, plus the full logits [B, T, V] its
    on-policy minibatch computes for entropy and the sampling-temperature log-probs."""
    N, D, V = batch * seq, args.dim, args.vocab
    mtp_depths = [k for k in range(1, args.mtp_depth + 1) if seq > k] if loss == "ce" else []
    mtp_layer = args.n_layers if args.n_dense_layers < args.n_layers else 0
    blocks = [(i, N) for i in range(args.n_layers)] + [(mtp_layer, batch * (seq - k)) for k in mtp_depths]
    full = [block_saved(args, i, n, w, gpu) for i, n in blocks]
    if checkpointing:  # each block keeps only its input; backward recomputes one block at a time
        saved = sum(n * D * w for _, n in blocks) + max(full)
    else:
        saved = sum(full)
    saved += N * 8 + _norm(N, D, w, gpu)  # token ids, the final norm's input
    chunk = min(N, CE_CHUNK) * V * 4 * (1 if gpu else 2)  # fp32 logits (and torch's softmax) per chunk
    if loss == "ce":
        saved += N * D * w + V * D * w  # the head's gradients, made in the forward
        for k in mtp_depths:
            n = batch * (seq - k)
            saved += n * 8 + _norm(n, D, w, gpu) * (1 if gpu else 0) + _norm(n, D, w, gpu)  # emb(t+k) norm; hnorm copies on GPU
            saved += n * 2 * D * w + _norm(n, D, w, gpu) + n * D * w + V * D * w  # eh_proj input, the module's norm, its head
        return saved + chunk + N * D * w  # the chunk, and the normed hidden states the head reads
    saved += N * D * w + N * 4  # logprobs: the normed hidden states and the fp32 result
    return saved + N * V * (w + 4 + 4)  # full logits, their fp32 copy, a softmax


# ---------------------------------------------------------------------------------------------
# Model states: DeepSpeed ZeRO and the owned experts
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RankMemory:
    """Bytes one rank of a role needs; `peak` is what must fit on its device."""

    role: str
    ranks: int  # instances of the role with this footprint
    parameters: float = 0.0  # compute copies and fp32 masters
    gradients: float = 0.0  # held at the optimizer step
    optimizer: float = 0.0  # AdamW moments on the device
    buffers: float = 0.0  # DeepSpeed's lasting buckets, gathered ZeRO-3 layers, model buffers, a reference model
    bucket: float = 0.0  # ZeRO-2's gradient bucket, alive during the backward only
    activations: float = 0.0  # one micro-batch (or a sampler's forward)
    kv_cache: float = 0.0  # a sampler's MLA latent cache
    host: float = 0.0  # CPU memory: offloaded optimizer state and masters
    capacity: float = 0.0  # the device's (or, for a CPU role, its share of the node's) memory
    on_gpu: bool = True
    advice: tuple[str, ...] = ()  # what to change when it does not fit, most effective first
    weight_advice: tuple[str, ...] = ()  # what shrinks the weights (a sampler's), when they alone do not fit

    @property
    def peak(self) -> float:
        return self.parameters + self.optimizer + self.buffers + max(self.activations + self.kv_cache + self.bucket,
                                                                     self.gradients)

    @property
    def headroom(self) -> float:
        return self.capacity - self.peak


def zero_states(n: int, numels: tuple[int, ...], *, stage: int, dp: int, w: int, offload: bool) -> dict[str, float]:
    """Per-rank bytes of DeepSpeed's part: n parameters in w-byte compute copies on dp ranks.

    ZeRO 1-2 flatten the compute copies and keep an fp32 master of this rank's 1/dp (even of an
    fp32 model); at the step the partition's gradients exist in the compute dtype and in fp32 (the
    fused AdamW adds no temporary). Reduction goes through one bucket of
    min(n, 5e8) elements (ds_config caps it): ZeRO-1 keeps it, ZeRO-2 frees it after the backward
    (measured: tests/orchestrator/test_orch_memory_plan.py). ZeRO-3 also partitions the compute copies, except
    tensors under the persistence threshold, and gathers a layer at a time (prefetch bucket).
    Stage 0 keeps everything whole (bf16: an fp32 master and fp32 gradients beside the copies)."""
    master, opt = 4 * n / max(dp, 1), 8 * n / max(dp, 1)
    bucket = w * min(n, DS_BUCKET)
    if stage == 0:
        return {"parameters": w * n + (4 * n if w != 4 else 0), "optimizer": 8 * n, "gradients": 4 * n,
                "buffers": 0.0, "host": 0.0}
    out = {"parameters": w * n + master, "optimizer": opt, "gradients": (w + 4) * n / dp, "buffers": bucket if stage != 2 else 0.0,
           "bucket": bucket if stage == 2 else 0.0, "host": 0.0}
    if stage == 3:
        persist = sum(k for k in numels if k < min(DS_PERSIST, n))
        gathered = w * (min(DS_PREFETCH, n) + max(numels, default=0))  # the prefetch bucket and the layer in use
        out["parameters"] = w * (persist + (n - persist) / dp) + master
        out["buffers"] = bucket + gathered
    if offload:  # masters, moments and fp32 gradients live in host memory
        out["host"] = master + opt + 4 * n / dp
        out["parameters"] -= master
        out["optimizer"], out["gradients"] = 0.0, w * n / dp
    return out


def owned_expert_states(n_own: int, w: int, dp: int) -> dict[str, float]:
    """ExpertShard's E/K routed experts: a w-byte compute copy, and fp32 masters (the compute copy
    itself under fp32 when dp is 1), gradients at the step and AdamW's moments split over the `dp`
    ranks of the expert-data-parallel group (the fused AdamW adds no temporary)."""
    piece = n_own / dp
    copy = w * n_own if (w != 4 or dp > 1) else 0
    return {"parameters": 4 * piece + copy, "optimizer": 8 * piece, "gradients": 4 * piece,
            "buffers": 0.0, "host": 0.0}


def _add(mem: RankMemory, states: dict[str, float]) -> None:
    for k, v in states.items():
        setattr(mem, k, getattr(mem, k) + v)


# ---------------------------------------------------------------------------------------------
# Roles
# ---------------------------------------------------------------------------------------------


def pretrain_rank(args: ModelArgs, pc: ParamCount, p, *, world: int, seq: int, gpu: bool, role: str = "pretrain worker") -> RankMemory:
    """One pretraining (or SFT) worker as orchestrator/pretrain_worker.py builds it; `p` is its
    PretrainConfig section."""
    bf16 = p.precision == "bf16" or (p.precision == "auto" and gpu)
    w = 2 if bf16 else 4
    K = p.expert_parallel
    owned = K > 1 and p.expert_weights == "owned"
    mem = RankMemory(role, world, on_gpu=gpu)
    n_ds = pc.total - (pc.routed if owned else 0)
    _add(mem, zero_states(n_ds, pc.numels if owned else pc.numels + pc.routed_numels, stage=p.zero_stage, dp=world, w=w,
                          offload=p.offload_optimizer))
    if owned:
        _add(mem, owned_expert_states(pc.routed // K, w, dp=world // K))
    mem.buffers += pc.buffer_bytes
    mem.activations = activation_bytes(args, p.micro_batch_size, seq, w=w, gpu=gpu, checkpointing=p.activation_checkpointing)
    if K > 1 and args.n_routed_experts and args.n_layers > args.n_dense_layers:
        # the all-to-all's copies per MoE layer: the pairs' rows sent, received and regrouped, their results back
        pairs = p.micro_batch_size * seq * args.n_activated_experts
        layers = 1 if p.activation_checkpointing else args.n_layers - args.n_dense_layers + args.mtp_depth
        mem.activations += layers * 2 * pairs * args.dim * w
    mem.advice = _advice(mem, "pretrain" if role == "pretrain worker" else "sft", p, owned, pc, w)
    return mem


def _advice(mem: RankMemory, section: str, p, owned: bool, pc: ParamCount, w: int) -> tuple[str, ...]:
    """What would shrink this rank, the largest saving first."""
    options = []
    if not owned and pc.routed:
        options.append((mem.parameters * pc.routed / pc.total, f"more expert parallel with owned experts ({section}.expert_parallel=K, "
                                                               f"{section}.expert_weights=owned)"))
    if p.zero_stage < 3:
        options.append((mem.parameters * 0.5 + mem.optimizer * 0.5, f"ZeRO-3 ({section}.zero_stage=3)"))
    if p.micro_batch_size > 1:
        options.append((mem.activations / 2, f"a smaller micro-batch ({section}.micro_batch_size={max(1, p.micro_batch_size // 2)})"))
    if not p.activation_checkpointing:
        options.append((mem.activations / 2, f"activation checkpointing ({section}.activation_checkpointing=true)"))
    if not p.offload_optimizer and p.zero_stage > 0:
        options.append((mem.optimizer, f"optimizer offload ({section}.offload_optimizer=true)"))
    return tuple(text for _, text in sorted(options, key=lambda o: -o[0]))


def learner_rank(args: ModelArgs, pc: ParamCount, g, r, *, prompt_len: int, gpu: bool) -> RankMemory:
    """One GRPO PolicyLearner (orchestrator/grpo/learner.py): DeepSpeed over the policy (bf16 on
    GPU; with grpo.expert_parallel K the routed experts are owned, E/K per rank, beside it), its share
    of a minibatch as one micro-batch of prompt + max_new_tokens positions, the full logits of the
    on-policy minibatch, and the colocated reference when grpo.kl_beta > 0 (whole, or partitioned over
    the learners under ZeRO-3)."""
    w, K = (2 if gpu else 4), g.expert_parallel
    mem = RankMemory("learner", g.learners, on_gpu=gpu)
    if K > 1:
        _add(mem, zero_states(pc.total - pc.routed, pc.numels, stage=g.zero_stage, dp=g.learners, w=w, offload=False))
        _add(mem, owned_expert_states(pc.routed // K, w, dp=g.learners // K))
    else:
        _add(mem, zero_states(pc.total, pc.numels + pc.routed_numels, stage=g.zero_stage, dp=g.learners, w=w, offload=False))
    mem.buffers += pc.buffer_bytes
    if g.kl_beta > 0 and g.reference == "colocated":  # learner.build_reference, in the compute dtype
        if g.zero_stage == 3 and K == 1:  # partitioned over the learners, one parameter gathered at a time
            mem.buffers += w * (pc.total / g.learners + max(pc.numels + pc.routed_numels, default=0))
        else:
            mem.buffers += w * pc.total
    rows = math.ceil(g.minibatch_size / g.learners)
    mem.activations = activation_bytes(args, rows, prompt_len + r.max_new_tokens, w=w, gpu=gpu, checkpointing=g.activation_checkpointing,
                                       loss="logprobs")
    options = [] if g.activation_checkpointing else ["activation checkpointing (grpo.activation_checkpointing=true)"]
    if pc.routed and g.learners >= 2 * K and args.n_routed_experts % (2 * K) == 0:
        options.append(f"more expert parallel (grpo.expert_parallel={2 * K})")
    options += ["ZeRO-3 (grpo.zero_stage=3)"] if g.zero_stage < 3 else []
    options += [f"a smaller minibatch (grpo.minibatch_size={max(1, g.minibatch_size // 2)}) or more learners (grpo.learners)"]
    if g.kl_beta > 0 and g.reference == "colocated":
        options.append("the reference in an actor of its own (grpo.reference=actor)")
    mem.advice = tuple(options)
    return mem


def sampler_calls(g, r) -> int:
    """Completions per generate call: Rollouts.launch gives each model copy (a sampler, or a group of
    rollout.expert_parallel samplers) two chunks of prompts per step."""
    per = math.ceil(g.prompts_per_step / (r.num_samplers // r.expert_parallel * 2))
    return per * g.group_size


def sampler_rank(args: ModelArgs, pc: ParamCount, g, r, *, prompt_len: int, gpu: bool, role: str = "sampler",
                 max_group: int | None = None) -> RankMemory:
    """One RolloutSampler (or the reference actor): the policy in its compute dtype (rollout.dtype;
    auto and the reference: bf16 on a GPU, fp32 on CPU), the MLA latent cache of its rows of one
    generate call in the same dtype, the prefill's logits and the routed experts it records. With
    rollout.expert_parallel K (samplers only) a member holds E/K routed experts and decodes 1/K of
    the call's rows (model/generate.py); the advice of a larger group says when it would span nodes,
    larger than `max_group` devices (placement.py)."""
    K = r.expert_parallel if role == "sampler" else 1
    B, S = math.ceil(sampler_calls(g, r) / K), prompt_len + r.max_new_tokens
    mem = RankMemory(role, r.num_samplers, on_gpu=gpu)
    import torch

    from orchestrator.grpo.rollout import compute_dtype

    elt = compute_dtype(r.dtype if role == "sampler" else "auto", torch.device("cuda" if gpu else "cpu")).itemsize
    mem.parameters = elt * (pc.total - pc.routed + pc.routed // K)
    mem.buffers = pc.buffer_bytes
    mem.kv_cache = B * S * (args.kv_lora_rank + args.qk_rope_head_dim) * elt * args.n_layers
    mem.kv_cache += (args.n_layers - args.n_dense_layers) * B * S * args.n_activated_experts  # uint8 expert ids
    mem.activations = B * prompt_len * args.vocab * 4 + B * prompt_len * args.dim * 4 * 4  # prefill logits, a few hidden states
    if K > 1:  # the prefill's all-to-all copies of one MoE layer's (token, expert) rows, sent and received
        mem.activations += 2 * B * prompt_len * args.n_activated_experts * args.dim * 4
    weights = []
    if role == "sampler" and elt == 4 and gpu:
        weights.append("bf16 weights (rollout.dtype=auto)")
    if role == "sampler" and pc.routed and args.n_routed_experts % (2 * K) == 0:
        span = f", spanning {math.ceil(2 * K / max_group)} nodes" if max_group and 2 * K > max_group else ""
        weights.append(f"a larger sampler expert-parallel group (rollout.expert_parallel={2 * K}{span}, "
                       f"rollout.num_samplers a multiple{'' if r.num_samplers >= 2 * K else f' >= {2 * K}'})")
    mem.weight_advice = tuple(weights)
    mem.advice = (*weights, f"fewer completions per call (more rollout.num_samplers; now {B} per sampler)",
                  f"shorter completions (rollout.max_new_tokens={max(1, r.max_new_tokens // 2)})")
    return mem


# ---------------------------------------------------------------------------------------------
# `sputnik plan`: the table and the verdict
# ---------------------------------------------------------------------------------------------


def role_memory(cfg, command: str, roles, *, gpu_gib: float, host_gib: float, prompt_len: int,
                max_group: int | None = None) -> list[RankMemory]:
    """The memory of each role of `sputnik <command>` (placement.roles_for's roles), with its device's
    capacity; max_group: the most GPUs of one node (a larger sampler group spans nodes)."""
    args, gpu_of = cfg.model, {r.name: r.gpus for r in roles}
    pc = count_parameters(args)
    out = []
    for role in roles:
        gpu = role.gpus > 0
        if role.name in ("pretrain worker", "sft worker"):
            section = cfg.pretrain if role.name == "pretrain worker" else cfg.sft
            seq = getattr(section, "seq_len", None) or cfg.data.seq_len
            mem = pretrain_rank(args, pc, section, world=section.workers, seq=seq, gpu=gpu, role=role.name)
        elif role.name == "learner":
            mem = learner_rank(args, pc, cfg.grpo, cfg.rollout, prompt_len=prompt_len, gpu=gpu)
        elif role.name in ("sampler", "reference"):
            mem = sampler_rank(args, pc, cfg.grpo, cfg.rollout, prompt_len=prompt_len, gpu=gpu, role=role.name,
                               max_group=max_group if gpu else None)
            mem.ranks = role.count
        else:
            continue  # reward evaluators hold no model
        mem.capacity = (gpu_gib * gpu_of[role.name] if gpu else host_gib) * GIB
        out.append(mem)
    return out


def table(mems: list[RankMemory]) -> str:
    """Fixed-width GiB per rank: one row per role, one column per component."""
    head = ["role", "ranks", "params", "optim", "buffers", "activ", "bucket", "kv cache", "grads", "peak", "device",
            "headroom", "host"]
    rows = [[m.role, str(m.ranks), *(f"{v / GIB:.2f}" for v in (m.parameters, m.optimizer, m.buffers, m.activations, m.bucket,
                                                                  m.kv_cache, m.gradients, m.peak)),
             f"{m.capacity / GIB:.0f} {'GPU' if m.on_gpu else 'CPU'}", f"{m.headroom / GIB:.2f}", f"{m.host / GIB:.2f}"] for m in mems]
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" if j else f"{{:<{w}}}" for j, w in enumerate(widths))
    return "\n".join(fmt.format(*r).rstrip() for r in [head, ["-" * w for w in widths], *rows])


def misfit(mems: list[RankMemory]) -> str | None:
    """One line naming the first role that does not fit and what to change; None when all fit."""
    for m in mems:
        if m.headroom < 0:
            where = "its GPU" if m.on_gpu else "its node's memory"
            alone = m.parameters + m.buffers > m.capacity and m.weight_advice  # then nothing else can help
            change = "; ".join((m.weight_advice if alone else m.advice)[:3]) or "a larger device"
            what = f" (its weights alone {(m.parameters + m.buffers) / GIB:.1f} GiB)" if alone else ""
            return (f"{m.role} needs {m.peak / GIB:.1f} GiB per rank{what} but {where} has {m.capacity / GIB:.0f} GiB: "
                    f"try {change}")
    return None


def explain(pc: ParamCount) -> str:
    """The arithmetic under the table: parameters by part."""
    return (f"parameters: {pc.total / 1e9:.3f}B ({pc.main / 1e9:.3f}B without MTP, of which routed experts "
            f"{(pc.routed - pc.routed_mtp) / 1e9:.3f}B; MTP {pc.mtp / 1e9:.3f}B; activated per token {pc.activated / 1e9:.3f}B); "
            f"GiB per rank; peak = params + optim + buffers + max(activ + bucket + kv cache, grads)")

