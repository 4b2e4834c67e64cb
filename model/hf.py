"""Hugging Face interop: read and write `transformers` DeepseekV3 checkpoint directories.

Layout as on the hub: config.json + safetensors with per-expert keys
(`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`), the balancing bias as
`mlp.gate.e_score_correction_bias`, and MTP module k stored as layer `n_layers + k - 1` with its
own copies of the embedding (`embed_tokens`) and head (`shared_head.head`). RoPE is interleaved
(`rope_interleave: true`), the layout our complex-number RoPE uses, so no permutation is needed.

Test: `pytest tests/model/test_model_hf.py` (logit parity with transformers both ways).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.args import ModelArgs
from model.rope import precompute_freqs_cis
from model.transformer import Transformer


def to_hf_config(args: ModelArgs) -> dict:
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
        "num_nextn_predict_layers": args.mtp_depth, "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu", "initializer_range": args.init_std, "torch_dtype": "float32",
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


def save_hf_pretrained(model: Transformer, path: str | Path) -> None:
    """Write config.json + model.safetensors that DeepseekV3ForCausalLM.from_pretrained loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = {}
    for hf, (ours, transpose) in key_map(model).items():
        name, _, expert = ours.partition("#")
        t = sd[name][int(expert)] if expert else sd[name]
        out[hf] = (t.t() if transpose else t).contiguous().clone()
    (path / "config.json").write_text(json.dumps(to_hf_config(model.args), indent=2))
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no *.safetensors files")
    tensors = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                tensors[k] = fh.get_tensor(k)
    return tensors


def from_hf_pretrained(path: str | Path) -> Transformer:
    """Build our Transformer from a transformers DeepseekV3 checkpoint directory."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} does not exist (expected a Hugging Face checkpoint directory)")
    args = from_hf_config(json.loads(cfg_file.read_text()))
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device="cpu")
    model.freqs_cis = precompute_freqs_cis(args)
    model.reset_parameters()  # what the checkpoint does not hold (e.g. absent MTP layers) starts freshly initialised
    tensors = _read_tensors(path)
    sd = model.state_dict()
    mtp_prefix = tuple(f"model.layers.{args.n_layers + k}." for k in range(args.mtp_depth))
    has_mtp = any(k.startswith(mtp_prefix) for k in tensors) if mtp_prefix else False
    for hf, (ours, transpose) in key_map(model).items():
        if hf not in tensors:
            if hf.startswith(mtp_prefix) and (not has_mtp or hf.endswith(("shared_head.head.weight", "embed_tokens.weight"))):
                continue  # transformers does not save MTP layers; their shared embedding/head copies are optional
            raise ValueError(f"{path}: tensor {hf!r} is missing from the checkpoint")
        name, _, expert = ours.partition("#")
        t = tensors[hf].t() if transpose else tensors[hf]
        target = sd[name][int(expert)] if expert else sd[name]
        if t.shape != target.shape:
            raise ValueError(f"{path}: tensor {hf!r} has shape {tuple(t.shape)}, expected {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(t.to(target.dtype))
    if args.mtp_depth and not has_mtp:
        warnings.warn(f"{path} holds no MTP layers; the {args.mtp_depth} MTP module(s) start freshly initialised", stacklevel=2)
    for m in model.moe_layers():
        m.load.zero_()
    return model
