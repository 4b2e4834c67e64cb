"""Real checkpoints in and out (issue 19), against transformers as the reference.

In: a tiny DeepseekV3 checkpoint in the hub layout (3 shards + index, FP8 e4m3 with 128x128 block
scales, MTP layer, its own tokenizer and chat template; tests/hf_hub_checkpoint.py) imports with
transformers' logits on the dequantised weights; its tokenizer renders prompts as transformers'
apply_chat_template does; a broken index, shard or key is an error naming it.
Out: an export (sharded, tokenizer included) loads in AutoModelForCausalLM/AutoTokenizer with no
missing or unexpected keys, greedy generate() equals ours and stops at EOS, and re-imports
identically; FP8 export and MTP left out.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model import ModelArgs, Transformer
from model.generate import generate
from model.hf import from_hf_pretrained, save_hf_pretrained

_spec = importlib.util.spec_from_file_location("hf_hub_checkpoint", Path(__file__).resolve().parents[1] / "hf_hub_checkpoint.py")
hub_ckpt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hub_ckpt)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return hub_ckpt.make_hub_checkpoint(tmp_path_factory.mktemp("hub"))


def test_fp8_sharded_hub_checkpoint_matches_transformers(hub):
    hub_dir, ref_dir, dequant = hub
    ours = from_hf_pretrained(hub_dir).eval()
    ref = transformers.DeepseekV3ForCausalLM.from_pretrained(ref_dir).float().eval()
    tokens = torch.randint(0, ours.args.vocab, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(tokens).logits, ours(tokens)
    assert (got - want).abs().max().item() < 1e-5 * want.abs().max().item()
    # the MTP layer (layer num_hidden_layers) is read and dequantised too
    L = ours.args.n_layers
    assert torch.equal(ours.mtp[0].eh_proj.weight, dequant[f"model.layers.{L}.eh_proj.weight"])
    assert torch.equal(ours.mtp[0].block.ffn.experts.w2[3], dequant[f"model.layers.{L}.mlp.experts.3.down_proj.weight"].t())
    assert torch.equal(ours.mtp[0].enorm.weight, dequant[f"model.layers.{L}.enorm.weight"])



def test_an_expert_parallel_rank_materialises_only_its_experts(hub):
    """from_hf_pretrained(experts=(part, k)): each MoE layer holds experts part*E/k .. (part+1)*E/k,
    equal to that slice of the whole import; every other tensor equal; nothing else allocated."""
    from model.parallel import expert_shard_state

    hub_dir, _, _ = hub
    whole = from_hf_pretrained(hub_dir).state_dict()
    E = next(v for k, v in whole.items() if k.endswith("experts.w1")).shape[0]
    for part in range(2):
        shard = from_hf_pretrained(hub_dir, experts=(part, 2)).state_dict()
        want = expert_shard_state(whole, part, 2)
        assert shard.keys() == want.keys()
        for k, v in want.items():
            assert torch.equal(shard[k], v), k
        experts = [k for k in shard if ".experts.w" in k]
        assert experts and all(shard[k].shape[0] == E // 2 for k in experts)
    with pytest.raises(ValueError, match="must divide"):
        from_hf_pretrained(hub_dir, experts=(0, 3))

def _copy(hub_dir, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(hub_dir, d)
    return d, json.loads((d / "model.safetensors.index.json").read_text())


def test_broken_checkpoints_name_the_shard_or_tensor(hub, tmp_path):
    from safetensors.torch import load_file, save_file

    hub_dir = hub[0]
    d, index = _copy(hub_dir, tmp_path)
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ValueError, match="model-00002-of-00003.safetensors.*missing"):
        from_hf_pretrained(d)
    shutil.rmtree(d)
    d, index = _copy(hub_dir, tmp_path)
    shutil.copyfile(d / "model-00001-of-00003.safetensors", d / "model-00004-of-00004.safetensors")
    with pytest.raises(ValueError, match="model-00004-of-00004.safetensors is not listed"):
        from_hf_pretrained(d)
    shutil.rmtree(d)

    def rewrite(edit):  # change shard 1 and the index consistently
        d, index = _copy(hub_dir, tmp_path)
        f = d / "model-00001-of-00003.safetensors"
        sd = load_file(str(f))
        edit(sd)
        save_file(sd, str(f), metadata={"format": "pt"})
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != f.name} | {k: f.name for k in sd}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        return d

    d = rewrite(lambda sd: sd.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.extra.weight' is not part"):
        from_hf_pretrained(d)
    shutil.rmtree(d)
    d = rewrite(lambda sd: sd.pop("model.embed_tokens.weight"))
    with pytest.raises(ValueError, match="'model.embed_tokens.weight' is missing"):
        from_hf_pretrained(d)
    shutil.rmtree(d)
    first = {k for k, v in index["weight_map"].items() if v == "model-00001-of-00003.safetensors"}
    fp8 = next(k for k in sorted(first) if k + "_scale_inv" in first)
    d = rewrite(lambda sd: sd.pop(fp8 + "_scale_inv"))
    with pytest.raises(ValueError, match=f"FP8 tensor '{fp8}' has no"):
        from_hf_pretrained(d)


def test_hf_tokenizer_renders_its_chat_template_like_transformers(hub):
    from data.templates import THINK
    from data.tokenizer import load_tokenizer

    hub_dir = hub[0]
    tok = load_tokenizer(hub_dir)
    ref = transformers.AutoTokenizer.from_pretrained(hub_dir)
    assert not tok.native and tok.chat_template
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert tok.stop_ids == [ref.eos_token_id]
    prompt = "What is 17 + 25?"
    msgs = [{"role": "user", "content": prompt}]
    want = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert tok.prompt_ids(prompt, "plain") == list(want)
    text = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert tok.prompt_ids(prompt, "r1") == ref(text + THINK, add_special_tokens=False)["input_ids"]
    assert tok.decode(tok.prompt_ids(prompt, "plain")) == text


def tiny_args(vocab):
    return ModelArgs(vocab=vocab, dim=64, inter_dim=96, moe_inter_dim=32, n_layers=3, n_dense_layers=1, n_heads=4,
                     q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                     n_routed_experts=8, n_activated_experts=2, n_expert_groups=4, n_limited_groups=2,
                     route_scale=2.5, max_seq_len=128, mtp_depth=1, init_std=0.2)


@pytest.fixture(scope="module")
def our_tok(tmp_path_factory):
    from data.tokenizer import train_tokenizer

    texts = [f"User: What is {a} + {a * 7}?\nAssistant: <think> step </think> <answer>{a * 8}</answer>" for a in range(100, 300)]
    return train_tokenizer(texts, 300, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def test_export_round_trip_with_transformers(our_tok, tmp_path):
    tok = our_tok
    torch.manual_seed(3)
    model = Transformer(tiny_args(tok.vocab_size)).eval()
    prompt = tok.prompt_ids("What is 12 + 7?", "r1")
    with torch.no_grad():
        free = generate(model, [prompt], max_new_tokens=8, temperature=0.0, top_p=1.0, stop_token_ids=[], seed=0)[0]
        # relabel token ids so that the greedy continuation reaches EOS at step 3: swap the EOS row of
        # the embedding and head with the token generated there (an exact relabelling of the model)
        t = free[3]
        assert t not in free[:3] and t not in prompt and tok.eos_id not in free[:3] + prompt
        for w in (model.embed.weight, model.head.weight):
            w[[t, tok.eos_id]] = w[[tok.eos_id, t]]
    out = tmp_path / "export"
    save_hf_pretrained(model, out, special_ids=tok.special_ids(), max_shard_size="300KB")
    tok.save_pretrained(out, template="r1")
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    assert list(out.glob("mtp*.safetensors"))  # MTP beside the model files, out of transformers' sight

    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ref_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (ref_tok.bos_token_id, ref_tok.eos_token_id, ref_tok.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    chat = ref_tok.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}], add_generation_prompt=True, tokenize=True)
    assert list(chat["input_ids"] if hasattr(chat, "keys") else chat) == prompt
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == tok.eos_id
    with torch.no_grad():
        theirs = hf.float().eval().generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt):].tolist()
        mine = generate(model, [prompt], max_new_tokens=10, temperature=0.0, top_p=1.0, stop_token_ids=tok.stop_ids, seed=0)[0]
    assert theirs == mine == free[:3] + [tok.eos_id]

    back = from_hf_pretrained(out)
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_hub_checkpoint_round_trips_inline_and_fp8(hub, tmp_path):
    from model.hf.load import dequantize_fp8

    ours = from_hf_pretrained(hub[0])
    save_hf_pretrained(ours, tmp_path / "inline", mtp="inline")
    assert json.loads((tmp_path / "inline" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    back = from_hf_pretrained(tmp_path / "inline")
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))

    # FP8 in DeepSeek's layout: e4m3 + weight_scale_inv per 128x128 block, read back as q * scale
    save_hf_pretrained(ours, tmp_path / "fp8", fp8=True, dtype=torch.bfloat16)
    cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "fp8" / "model.safetensors"), framework="pt") as f:
        q, s = f.get_tensor("model.layers.1.self_attn.q_b_proj.weight"), f.get_tensor("model.layers.1.self_attn.q_b_proj.weight_scale_inv")
        assert q.dtype == torch.float8_e4m3fn and s.shape == (-(-q.shape[0] // 128), -(-q.shape[1] // 128))
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    w = ours.layers[1].attn.wq_b.weight
    q_ref, s_ref = hub_ckpt.quantize_block(w)  # the test's own DeepSeek-style quantiser
    assert torch.equal(q.float(), q_ref.float()) and torch.allclose(s, s_ref, rtol=1e-6, atol=0)
    fp8 = from_hf_pretrained(tmp_path / "fp8")
    assert torch.equal(fp8.layers[1].attn.wq_b.weight, dequantize_fp8(q, s, (128, 128)))
    rel = (fp8.layers[1].attn.wq_b.weight - w).norm() / w.norm()
    assert rel < 0.05


def test_export_without_mtp(our_tok, tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny_args(our_tok.vocab_size))
    save_hf_pretrained(model, tmp_path, mtp="none")
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    back = from_hf_pretrained(tmp_path)
    assert back.args.mtp_depth == 0
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in back.state_dict().items())


def test_fp8_checkpoint_is_kept_bit_for_bit_by_fp8_training(hub):
    """FP8 training (`pretrain.fp8` / FP8Linear) re-quantises its master weights per forward, one
    scale per 128x128 block (sputnik_kernels.fp8): on the dequantised import of an FP8 checkpoint
    this gives back the checkpoint's own e4m3 bytes and scales, so the FP8 model starts exactly
    from the released FP8 weights (no second rounding), with fp32 masters for the updates."""
    from safetensors import safe_open

    from sputnik_kernels.fp8 import fp8_quantize_weight

    hub_dir = hub[0]
    index = json.loads((hub_dir / "model.safetensors.index.json").read_text())["weight_map"]
    ours = from_hf_pretrained(hub_dir)
    imported = {"model.layers.1.self_attn.q_b_proj.weight": ours.layers[1].attn.wq_b.weight,
                "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": ours.layers[0].attn.wkv_a.weight,
                "model.layers.1.mlp.experts.3.down_proj.weight": ours.layers[1].ffn.experts.w2[3].t()}
    checked = 0
    for name, w in imported.items():
        with safe_open(str(hub_dir / index[name]), framework="pt") as f:
            q_hub = f.get_tensor(name)
        with safe_open(str(hub_dir / index[name + "_scale_inv"]), framework="pt") as f:
            s_hub = f.get_tensor(name + "_scale_inv")
        assert q_hub.dtype == torch.float8_e4m3fn
        q, s = fp8_quantize_weight(w.detach().contiguous())
        assert torch.equal(q.view(torch.uint8), q_hub.view(torch.uint8)), name
        assert torch.allclose(s, s_hub, rtol=2e-7, atol=0), name
        checked += 1
    assert checked == 3


def _rss(field: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field + ":"))


def _zero3_import(rank, port, dirs, out):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      DS_ACCELERATOR="cpu")
    import deepspeed
    import torch.distributed as dist

    from model.hf import from_hf_pretrained_zero3

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    # every parameter partitioned: DeepSpeed keeps tensors under its persistence threshold (1e5
    # elements) whole on every rank once gathered
    ds_cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    result = {}
    for name, d in dirs.items():
        with open("/proc/self/clear_refs", "w") as fh:  # resets the peak RSS (VmHWM) to the current RSS
            fh.write("5")
        before = _rss("VmRSS")
        model = from_hf_pretrained_zero3(d, ds_cfg)
        peak = _rss("VmHWM") - before  # what the load added at its height: tensors, safetensors' mapped pages, the heap
        held = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())  # this rank's partitions
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        result[name] = {"state": state, "peak": peak, "held": held}
    torch.save(result, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_a_zero3_import_materialises_each_ranks_share(hub, tmp_path):
    """from_hf_pretrained_zero3 (issue 19): two ranks build a checkpoint partitioned, each holding half
    of every parameter, and the whole weights they make equal the single-process import (the FP8 hub
    checkpoint: dequantised, MTP included). The memory a rank's load adds at its height (peak RSS,
    reset before the load; the hub checkpoint's load before it has imported and warmed up
    everything the loader uses) stays near its half of the model, on a 10-layer model of ~64 MiB whose
    largest tensor is a few percent of it: the whole model is never materialised on any rank."""
    import os
    import socket

    import torch.multiprocessing as mp

    from model import Transformer, load_model_args

    hub_dir, _, _ = hub
    torch.manual_seed(0)
    deep = Transformer(load_model_args("tiny", vocab=97, n_layers=10, dim=256, moe_inter_dim=128, inter_dim=512))
    save_hf_pretrained(deep, tmp_path / "deep")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "z3")
    # glibc returns every block over 64 KiB to the system when it is freed (its default threshold
    # grows with the blocks freed, after which freed tensors stay in the heap and in RSS): the
    # workers' RSS then follows the bytes alive
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        mp.spawn(_zero3_import, args=(port, {"hub": str(hub_dir), "deep": str(tmp_path / "deep")}, out), nprocs=2, join=True)
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    for name, d in (("hub", hub_dir), ("deep", tmp_path / "deep")):
        want = from_hf_pretrained(d).state_dict()
        assert ranks[0][name]["state"].keys() == want.keys()
        for k, v in want.items():
            assert torch.equal(ranks[0][name]["state"][k], v), (name, k)
    params = [p.numel() * 4 for p in deep.parameters()]
    whole, largest = sum(params), max(params)
    assert largest < 0.05 * whole
    for rank, r in enumerate(ranks):
        held, peak = r["deep"]["held"], r["deep"]["peak"]
        print(f"rank {rank}: holds {held / 2**20:.1f} MiB, its load added {peak / 2**20:.1f} MiB at the height; "
              f"the model {whole / 2**20:.1f} MiB, its largest tensor {largest / 2**20:.2f} MiB")
        assert held <= whole / 2 + 4096  # its half (DeepSpeed pads each partition a little)
        assert peak <= 0.7 * whole, (peak / whole, largest / whole)


def test_a_bf16_import_is_the_fp32_import_rounded_once(hub):
    """from_hf_pretrained(dtype=bf16) (a bf16 sampler's weights, rollout.dtype): every parameter
    equals the fp32 import rounded to bf16 (FP8 blocks dequantised, then rounded once), the
    balancing biases stay the fp32 import's; with experts=(part, k) too."""
    hub_dir, _, _ = hub
    whole = from_hf_pretrained(hub_dir)
    params = {k for k, _ in whole.named_parameters()}
    for experts in (None, (1, 2)):
        ref = whole.state_dict() if experts is None else from_hf_pretrained(hub_dir, experts=experts).state_dict()
        got = from_hf_pretrained(hub_dir, experts=experts, dtype=torch.bfloat16).state_dict()
        assert got.keys() == ref.keys()
        for k, v in ref.items():
            want = v.to(torch.bfloat16) if k in params else v
            assert got[k].dtype == want.dtype and torch.equal(got[k], want), k
    assert any(k.endswith("gate.bias") and v.dtype == torch.float32 and v.any() for k, v in got.items())
