"""HF interop: logits match transformers' DeepseekV3ForCausalLM both ways (fp32)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model.hf import from_hf_pretrained, save_hf_pretrained
from model import ModelArgs, Transformer


def hf_config(q_lora_rank):
    return transformers.DeepseekV3Config(
        vocab_size=257, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=q_lora_rank, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=128,
        num_nextn_predict_layers=1, tie_word_embeddings=False, rope_interleave=True,
    )


def random_hf_model(q_lora_rank, seed=0):
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(hf_config(q_lora_rank)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # non-trivial norm weights
            else:
                p.normal_(0, 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.3, 0.3)  # non-zero balancing bias changes the routing
    return model


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_hf_checkpoint_gives_same_logits(tmp_path, q_lora_rank):
    hf = random_hf_model(q_lora_rank)
    hf.save_pretrained(tmp_path)
    ours = from_hf_pretrained(tmp_path).eval()
    # transformers saves no MTP layer: ours starts fresh, its balancing bias and loads at zero
    assert len(ours.moe_layers()) == len(ours.expert_bias()) and not ours.expert_bias()[-1].any()
    assert not ours.expert_loads().any()
    tokens = torch.randint(0, 257, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        got = ours(tokens)
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() < 1e-4 * scale


def test_our_checkpoint_loads_in_transformers(tmp_path):
    torch.manual_seed(3)
    args = ModelArgs(vocab=257, dim=64, inter_dim=96, moe_inter_dim=32, n_layers=3, n_dense_layers=1, n_heads=4,
                     q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                     n_routed_experts=8, n_activated_experts=2, n_expert_groups=4, n_limited_groups=2,
                     route_scale=2.5, max_seq_len=128, mtp_depth=1, init_std=0.2)
    ours = Transformer(args).eval()
    with torch.no_grad():
        for m in ours.moe_layers():
            m.gate.bias.uniform_(-0.3, 0.3)
    save_hf_pretrained(ours, tmp_path)
    hf, info = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    tokens = torch.randint(0, 257, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = ours(tokens)
        got = hf.float().eval()(tokens).logits
    assert (got - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
    # MTP weights round-trip as layer index n_layers
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1
    # only keys transformers' config knows (torch_dtype: its older name for dtype); our execution
    # choices (ModelArgs.attn_pad_v, moe_pair_path_bytes) are not architecture and stay out
    assert set(cfg) - set(transformers.DeepseekV3Config().to_dict()) <= {"torch_dtype"}
    back = from_hf_pretrained(tmp_path)
    for (k, a), (k2, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert any(k.startswith("mtp.0.") for k in back.state_dict())


def test_bad_checkpoint_errors_name_the_tensor(tmp_path):
    hf = random_hf_model(None)
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    f = next(tmp_path.glob("*.safetensors"))
    sd = load_file(str(f))
    key = "model.layers.0.self_attn.o_proj.weight"
    sd[key] = sd[key][:, :-1].contiguous()
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="o_proj.weight.*shape"):
        from_hf_pretrained(tmp_path)
    del sd[key]
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="o_proj.weight.*missing"):
        from_hf_pretrained(tmp_path)


@pytest.mark.parametrize("change", ["one more expert", "one fewer expert", "wider experts"])
def test_export_refuses_stacked_experts_of_another_shape_naming_them(tmp_path, change):
    """save_hf_state reads stacked experts one expert at a time (so an export never holds a layer's
    experts whole), and still refuses a checkpoint whose count or shape of experts is not the config's."""
    from model.hf import save_hf_state
    from model.hf.config import from_hf_config
    from model.hf.save import ShapeMismatch, dict_state

    model = Transformer(from_hf_config(hf_config(None).to_dict()))
    sd = dict(model.state_dict())
    key = next(k for k in sd if k.endswith("experts.w1"))
    w = sd[key]
    sd[key] = {"one more expert": torch.cat([w, w[:1]]), "one fewer expert": w[1:],
               "wider experts": torch.cat([w, w[:, :1]], dim=1)}[change]
    asked = []

    def state(name, rows=None):
        asked.append((name, rows))
        return dict_state(sd)(name, rows)

    n = w.shape[0]
    message = {"one more expert": f"has {n + 1} experts, the model config gives {n}",
               "one fewer expert": f"has {n - 1} experts, the model config gives {n}",
               "wider experts": "has experts of shape"}[change]
    with pytest.raises(ShapeMismatch, match=f"{key}.*{message}"):
        save_hf_state(model.args, state, tmp_path / "hf")
    assert (key, None) not in asked and (key, slice(0, 1)) in asked  # never the layer's experts whole
