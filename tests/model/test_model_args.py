"""ModelArgs presets and parameter counts (671B preset built on the meta device)."""

import pytest
import torch

from model import ModelArgs, Transformer, load_model_args


def build_meta(name, **kw):
    args = load_model_args(name, **kw)
    with torch.device("meta"):
        return Transformer(args)


def test_deepseek_v3_671b_parameter_counts():
    m = build_meta("deepseek-v3-671b", max_seq_len=4096)
    total = m.num_parameters()
    activated = m.num_parameters(activated=True)
    mtp = m.num_parameters(include_mtp=True) - total
    assert abs(total / 671e9 - 1) < 0.01, total
    # DeepSeek quotes "37B" activated; the exact count with embedding and head is 37.55B.
    assert abs(activated / 37e9 - 1) < 0.015, activated
    assert abs(mtp / 11.5e9 - 1) < 0.03, mtp  # one MTP module: ~11.5B more


def test_expert_count_formula_671b():
    a = load_model_args("deepseek-v3-671b")
    per_expert = 3 * a.dim * a.moe_inter_dim
    routed = a.n_moe_layers * a.n_routed_experts * per_expert
    m = build_meta("deepseek-v3-671b", max_seq_len=4096)
    counted = sum(p.numel() for n, p in m.named_parameters() if ".experts.w" in n and not n.startswith("mtp."))
    assert counted == routed


def test_tiny_and_small_sizes():
    assert build_meta("tiny").num_parameters(include_mtp=True) < 5e6
    assert 100e6 <= build_meta("small").num_parameters(include_mtp=True) <= 300e6


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(n_routed_experts=6, n_expert_groups=4), "n_expert_groups"),
        (dict(n_dense_layers=9), "n_dense_layers"),
        (dict(n_limited_groups=5), "n_limited_groups"),
        (dict(dim=0), "dim"),
        (dict(score_func="relu"), "score_func"),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    ],
)
def test_bad_args_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        load_model_args("tiny", **kw)


def test_unknown_preset_and_key(tmp_path):
    with pytest.raises(ValueError, match="unknown model preset 'huge'.*tiny"):
        load_model_args("huge")
    p = tmp_path / "m.yaml"
    p.write_text("dim: 64\nheads: 4\n")
    with pytest.raises(ValueError, match=r"m.yaml: key 'heads'"):
        load_model_args(p)


def test_q_lora_none_means_no_compression():
    a = ModelArgs(q_lora_rank=None)
    assert a.q_lora_rank == 0
    assert hasattr(Transformer(a).layers[0].attn, "wq")
