"""A tiny DeepseekV3 checkpoint in the layout DeepSeek-V3/R1 publish on the hub, made by tests.

`make_hub_checkpoint(root)` writes `root/hub/`: config.json with quantization_config, 3 safetensors
shards + model.safetensors.index.json, FP8 e4m3 linear weights with a float32 `weight_scale_inv` per
128x128 block (scale = block amax / 448, as DeepSeek quantises; one scale in another shard than
its weight), bf16 for the rest, an MTP layer (layer num_hidden_layers: enorm, hnorm, eh_proj, a MoE
block, shared_head, embed_tokens), and a byte-level BPE tokenizer with DeepSeek-style special
tokens and a chat template that is not ours, plus generation_config.json. It also writes
`root/reference/`: the dequantised main weights in fp32, which transformers loads as the reference.

Loaded by path from the tests that use it (tests/model/test_model_hf_hub.py,
tests/orchestrator/test_orch_hf_sources.py).
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '<｜User｜>' + message['content'] }}{% elif message['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜>' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)
FP8_LINEARS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "eh_proj")
BLOCK, FP8_MAX = 128, 448.0


def hub_config(vocab: int, **kw):
    import transformers

    cfg = dict(
        vocab_size=vocab, hidden_size=160, intermediate_size=200, moe_intermediate_size=48, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=136, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        max_position_embeddings=256, num_nextn_predict_layers=1, tie_word_embeddings=False, rope_interleave=True,
    )
    cfg.update(kw)
    return transformers.DeepseekV3Config(**cfg)


def make_tokenizer(out: Path) -> int:
    """A byte-level BPE trained on a few strings, DeepSeek-style special tokens; returns its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [f"What is {a} + {b}? The answer is {a + b}. Let me think step by step." for a in range(40) for b in range(0, 40, 7)]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[BOS, EOS, USER, ASSISTANT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": {"__type": "AddedToken", "content": BOS, "special": True},
        "eos_token": {"__type": "AddedToken", "content": EOS, "special": True}, "pad_token": EOS,
        "add_bos_token": True, "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": tok.token_to_id(BOS), "eos_token_id": tok.token_to_id(EOS)}))
    return tok.get_vocab_size()


def quantize_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's weight quantisation: per 128x128 block, scale_inv = amax / 448, q = w / scale_inv in e4m3."""
    N, K = w.shape
    nb, kb = -(-N // BLOCK), -(-K // BLOCK)
    scale = torch.empty(nb, kb)
    q = torch.empty(N, K, dtype=torch.float8_e4m3fn)
    for i in range(nb):
        for j in range(kb):
            blk = w[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK].float()
            s = blk.abs().max().clamp(min=1e-4) / FP8_MAX
            scale[i, j] = s
            q[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_block(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = q.float()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] *= scale[i, j]
    return out


def make_hub_checkpoint(root: Path, seed: int = 0) -> tuple[Path, Path, dict]:
    """(hub dir, reference dir, {tensor name: dequantised fp32 value, MTP included})."""
    import transformers

    hub, ref, plain = root / "hub", root / "reference", root / "plain"
    for d in (hub, ref, plain):
        d.mkdir(parents=True)
    vocab = make_tokenizer(hub)
    cfg = hub_config(vocab)
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.3, 0.3)
    model.save_pretrained(plain)  # the hub's per-expert key names
    sd = load_file(str(plain / "model.safetensors"))
    L = cfg.num_hidden_layers
    g = torch.Generator().manual_seed(seed + 1)
    for k in [k for k in sd if k.startswith(f"model.layers.{L - 1}.")]:  # the MTP block: a MoE layer of its own
        sd[k.replace(f"layers.{L - 1}.", f"layers.{L}.")] = torch.randn(sd[k].shape, generator=g) * 0.1 + (1.0 if "norm" in k else 0.0)
    D = cfg.hidden_size
    sd[f"model.layers.{L}.enorm.weight"] = torch.rand(D, generator=g) + 0.5
    sd[f"model.layers.{L}.hnorm.weight"] = torch.rand(D, generator=g) + 0.5
    sd[f"model.layers.{L}.eh_proj.weight"] = torch.randn(D, 2 * D, generator=g) * 0.1
    sd[f"model.layers.{L}.shared_head.norm.weight"] = torch.rand(D, generator=g) + 0.5
    sd[f"model.layers.{L}.shared_head.head.weight"] = sd["lm_head.weight"].clone()
    sd[f"model.layers.{L}.embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()

    stored, dequant = {}, {}
    for k, v in sd.items():
        if k.split(".")[-2] in FP8_LINEARS and k.endswith(".weight"):
            q, s = quantize_block(v)
            stored[k], stored[k + "_scale_inv"] = q, s
            dequant[k] = dequantize_block(q, s)
        elif k.endswith("e_score_correction_bias"):
            stored[k] = v.float()
            dequant[k] = v.float()
        else:
            stored[k] = v.to(torch.bfloat16)
            dequant[k] = stored[k].float()
    names = list(stored)
    third = -(-len(names) // 3)
    shards = [names[i * third : (i + 1) * third] for i in range(3)]
    moved = next(k for k in shards[0] if k.endswith("_scale_inv"))  # a scale in another shard than its weight
    shards[0].remove(moved)
    shards[2].append(moved)
    files = [f"model-{i + 1:05d}-of-00003.safetensors" for i in range(3)]
    for f, keys in zip(files, shards):
        save_file({k: stored[k].contiguous() for k in keys}, str(hub / f), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in stored.values())},
             "weight_map": {k: f for f, keys in zip(files, shards) for k in keys}}
    (hub / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = cfg.to_dict()
    config.update(architectures=["DeepseekV3ForCausalLM"], torch_dtype="bfloat16", num_nextn_predict_layers=1,
                  quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
                  bos_token_id=vocab and json.loads((hub / "generation_config.json").read_text())["bos_token_id"],
                  eos_token_id=json.loads((hub / "generation_config.json").read_text())["eos_token_id"])
    config.pop("num_mtp_layers", None)
    (hub / "config.json").write_text(json.dumps(config, indent=2))
    ref_cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    ref_cfg.update(num_nextn_predict_layers=0, torch_dtype="float32")
    (ref / "config.json").write_text(json.dumps(ref_cfg, indent=2))
    save_file({k: v.contiguous() for k, v in dequant.items() if not k.startswith(f"model.layers.{L}.")}, str(ref / "model.safetensors"),
              metadata={"format": "pt"})
    return hub, ref, dequant
