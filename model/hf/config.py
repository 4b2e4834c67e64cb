"""The mapping between our Transformer and a `transformers` DeepseekV3 checkpoint: config.json
fields <-> ModelArgs, and every tensor name <-> our state-dict key.

Layout as on the hub: config.json + safetensors with per-expert keys
(`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`), the balancing bias as
`mlp.gate.e_score_correction_bias`, and MTP module k stored as layer `n_layers + k - 1` with its
own copies of the embedding (`embed_tokens`) and head (`shared_head.head`). RoPE is interleaved
(`rope_interleave: true`), the layout our complex-number RoPE uses, so no permutation is needed.

The FP8 tensors of DeepSeek-V3's released checkpoints are the linear weights (`FP8_LINEARS`), each
with a float32 `<name>_scale_inv` per 128x128 block.

Test: `pytest tests/model/test_model_hf.py tests/model/test_model_hf_hub.py`.
"""

from __future__ import annotations

from model.args import ModelArgs
from model.transformer import Transformer

# HF module names whose `.weight` DeepSeek-V3 stores in FP8 e4m3 (attention, dense MLP, shared and
# routed experts, MTP eh_proj); embeddings, heads, norms and the router stay bf16.
FP8_LINEARS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
               "gate_proj", "up_proj", "down_proj", "eh_proj")
SCALE_SUFFIX = "_scale_inv"  # `<name>.weight_scale_inv`: the factor that multiplies q back


def is_fp8_linear(hf_name: str) -> bool:
    parts = hf_name.split(".")
    return parts[-1] == "weight" and len(parts) > 1 and parts[-2] in FP8_LINEARS


def to_hf_config(args: ModelArgs, *, mtp: bool = True, special_ids: dict | None = None) -> dict:
    """config.json for `args`; `mtp=False` declares no MTP layers; `special_ids` adds bos/eos/pad_token_id."""
    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_factor > 1:
        rope = {
            "rope_type": "yarn", "rope_theta": args.rope_theta, "factor": args.rope_factor,
            "original_max_position_embeddings": args.original_seq_len, "beta_fast": args.beta_fast,
            "beta_slow": args.beta_slow, "mscale": args.mscale, "mscale_all_dim": args.mscale,
        }
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": args.vocab, "hidden_size": args.dim, "intermediate_size": args.inter_dim,
        "moe_intermediate_size": args.moe_inter_dim, "num_hidden_layers": args.n_layers,
        "first_k_dense_replace": args.n_dense_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_heads, "q_lora_rank": args.q_lora_rank or None,
        "kv_lora_rank": args.kv_lora_rank, "qk_nope_head_dim": args.qk_nope_head_dim,
        "qk_rope_head_dim": args.qk_rope_head_dim, "v_head_dim": args.v_head_dim,
        "n_routed_experts": args.n_routed_experts, "n_shared_experts": args.n_shared_experts,
        "num_experts_per_tok": args.n_activated_experts, "n_group": args.n_expert_groups,
        "topk_group": args.n_limited_groups, "routed_scaling_factor": args.route_scale,
        "norm_topk_prob": args.norm_topk, "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps, "rope_parameters": rope, "rope_interleave": True,
        "num_nextn_predict_layers": args.mtp_depth if mtp else 0, "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu", "initializer_range": args.init_std, "torch_dtype": "float32",
        **{k: v for k, v in (special_ids or {}).items() if v is not None},
    }


def from_hf_config(cfg: dict) -> ModelArgs:
    if cfg.get("model_type") not in ("deepseek_v3", None):
        raise ValueError(f"config.json has model_type {cfg.get('model_type')!r}, expected 'deepseek_v3'")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    yarn = rope.get("rope_type", rope.get("type")) == "yarn"
    if not cfg.get("rope_interleave", True):
        raise ValueError("config.json sets rope_interleave false; only the interleaved RoPE layout is supported")
    return ModelArgs(
        vocab=cfg["vocab_size"], dim=cfg["hidden_size"], inter_dim=cfg["intermediate_size"],
        moe_inter_dim=cfg["moe_intermediate_size"], n_layers=cfg["num_hidden_layers"],
        n_dense_layers=cfg.get("first_k_dense_replace", 0), n_heads=cfg["num_attention_heads"],
        max_seq_len=cfg.get("max_position_embeddings", 4096), norm_eps=cfg.get("rms_norm_eps", 1e-6),
        q_lora_rank=cfg.get("q_lora_rank") or 0, kv_lora_rank=cfg["kv_lora_rank"],
        qk_nope_head_dim=cfg["qk_nope_head_dim"], qk_rope_head_dim=cfg["qk_rope_head_dim"],
        v_head_dim=cfg["v_head_dim"], rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
        rope_factor=rope.get("factor", 1.0) if yarn else 1.0,
        original_seq_len=rope.get("original_max_position_embeddings", 4096),
        beta_fast=rope.get("beta_fast", 32.0), beta_slow=rope.get("beta_slow", 1.0),
        mscale=rope.get("mscale_all_dim", rope.get("mscale", 1.0)) if yarn else 1.0,
        n_routed_experts=cfg["n_routed_experts"], n_shared_experts=cfg.get("n_shared_experts", 0),
        n_activated_experts=cfg["num_experts_per_tok"], n_expert_groups=cfg.get("n_group", 1),
        n_limited_groups=cfg.get("topk_group", 1), route_scale=cfg.get("routed_scaling_factor", 1.0),
        norm_topk=cfg.get("norm_topk_prob", True),
        mtp_depth=cfg.get("num_nextn_predict_layers", cfg.get("num_mtp_layers", 0)),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
    )


def _block_keys(prefix: str, ours: str, block, args: ModelArgs) -> dict[str, tuple[str, bool]]:
    """HF key -> (our key, transpose?) for one decoder block."""
    m = {
        f"{prefix}.input_layernorm.weight": (f"{ours}.attn_norm.weight", False),
        f"{prefix}.post_attention_layernorm.weight": (f"{ours}.ffn_norm.weight", False),
        f"{prefix}.self_attn.kv_a_proj_with_mqa.weight": (f"{ours}.attn.wkv_a.weight", False),
        f"{prefix}.self_attn.kv_a_layernorm.weight": (f"{ours}.attn.kv_norm.weight", False),
        f"{prefix}.self_attn.kv_b_proj.weight": (f"{ours}.attn.wkv_b.weight", False),
        f"{prefix}.self_attn.o_proj.weight": (f"{ours}.attn.wo.weight", False),
    }
    if args.q_lora_rank:
        m[f"{prefix}.self_attn.q_a_proj.weight"] = (f"{ours}.attn.wq_a.weight", False)
        m[f"{prefix}.self_attn.q_a_layernorm.weight"] = (f"{ours}.attn.q_norm.weight", False)
        m[f"{prefix}.self_attn.q_b_proj.weight"] = (f"{ours}.attn.wq_b.weight", False)
    else:
        m[f"{prefix}.self_attn.q_proj.weight"] = (f"{ours}.attn.wq.weight", False)
    from model.moe import MoE

    names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    if isinstance(block.ffn, MoE):
        m[f"{prefix}.mlp.gate.weight"] = (f"{ours}.ffn.gate.weight", False)
        m[f"{prefix}.mlp.gate.e_score_correction_bias"] = (f"{ours}.ffn.gate.bias", False)
        for e in range(args.n_routed_experts):
            for hf, w in names.items():
                m[f"{prefix}.mlp.experts.{e}.{hf}.weight"] = (f"{ours}.ffn.experts.{w}#{e}", True)
        if args.n_shared_experts:
            for hf, w in names.items():
                m[f"{prefix}.mlp.shared_experts.{hf}.weight"] = (f"{ours}.ffn.shared_experts.{w}.weight", False)
    else:
        for hf, w in names.items():
            m[f"{prefix}.mlp.{hf}.weight"] = (f"{ours}.ffn.{w}.weight", False)
    return m


def key_map(model: Transformer) -> dict[str, tuple[str, bool]]:
    """Every HF tensor name -> (our state-dict key, or `key#expert` for one stacked expert; transpose)."""
    args = model.args
    m = {"model.embed_tokens.weight": ("embed.weight", False), "model.norm.weight": ("norm.weight", False), "lm_head.weight": ("head.weight", False)}
    for i, layer in enumerate(model.layers):
        m.update(_block_keys(f"model.layers.{i}", f"layers.{i}", layer, args))
    for k, mod in enumerate(model.mtp):
        p, o = f"model.layers.{args.n_layers + k}", f"mtp.{k}"
        m.update(_block_keys(p, f"{o}.block", mod.block, args))
        m.update({
            f"{p}.enorm.weight": (f"{o}.enorm.weight", False), f"{p}.hnorm.weight": (f"{o}.hnorm.weight", False),
            f"{p}.eh_proj.weight": (f"{o}.eh_proj.weight", False), f"{p}.shared_head.norm.weight": (f"{o}.norm.weight", False),
            f"{p}.shared_head.head.weight": ("head.weight", False), f"{p}.embed_tokens.weight": ("embed.weight", False),
        })
    return m


def mtp_prefixes(args: ModelArgs) -> tuple[str, ...]:
    """Name prefixes of the MTP modules' tensors (layers n_layers .. n_layers + mtp_depth - 1)."""
    return tuple(f"model.layers.{args.n_layers + k}." for k in range(args.mtp_depth))
