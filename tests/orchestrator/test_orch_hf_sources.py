"""Model sources with their own tokenizer (issue 19): `sputnik eval` and `sputnik grpo` start from a
hub-layout DeepseekV3 checkpoint (3 FP8 shards + index, MTP layer, a byte-level BPE tokenizer with
a chat template that is not ours; tests/hf_hub_checkpoint.py) with no tokenizer key; the GRPO run's
`hf/` export carries the tokenizer and is itself a complete model source, for eval and export."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("hf_hub_checkpoint", REPO / "tests" / "hf_hub_checkpoint.py")
hub_ckpt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hub_ckpt)
N_TASKS = 3


def sputnik(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


COMMON = [f"grpo.heldout_size={N_TASKS}", "rollout.max_new_tokens=8", "tracking.wandb_mode=disabled", "cluster.num_cpus=2"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    pytest.importorskip("transformers")
    return hub_ckpt.make_hub_checkpoint(tmp_path_factory.mktemp("hub"))[0]


def greedy_in_process(model_dir: Path, template: str) -> tuple[list[str], list[list[int]]]:
    """What the held-out evaluation must produce, computed here: the tokenizer found in the model
    directory, its chat template, its stop ids, our generate()."""
    from data.tasks import generate_arithmetic
    from data.tokenizer import load_tokenizer
    from model.generate import generate
    from model.hf import from_hf_pretrained

    tasks = generate_arithmetic(N_TASKS, seed=1, split="heldout").to_pylist()
    tok = load_tokenizer(model_dir)
    prompts = [tok.prompt_ids(t["prompt"], template) for t in tasks]
    outs = generate(from_hf_pretrained(model_dir).eval(), prompts, max_new_tokens=8, temperature=0.0, top_p=1.0,
                    stop_token_ids=tok.stop_ids, seed=0, pad_id=tok.pad_id)
    return [tok.decode(o) for o in outs], prompts


@pytest.mark.ray
def test_eval_from_a_hub_checkpoint_uses_its_tokenizer_and_chat_template(hub, tmp_path):
    import transformers

    out = tmp_path / "e"
    r = sputnik("eval", f"eval.checkpoint={hub}", *COMMON, "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = pq.read_table(out / "results.parquet").to_pylist()
    texts, prompts = greedy_in_process(hub, "r1")
    assert [row["greedy_completion"] for row in rows] == texts
    # the prompts are the hub tokenizer's chat template (+ "<think>" for the r1 format), as transformers renders it
    ref = transformers.AutoTokenizer.from_pretrained(hub)
    from data.tasks import generate_arithmetic

    task = generate_arithmetic(N_TASKS, seed=1, split="heldout").to_pylist()[0]
    text = ref.apply_chat_template([{"role": "user", "content": task["prompt"]}], add_generation_prompt=True, tokenize=False)
    assert prompts[0] == ref(text + "<think>", add_special_tokens=False)["input_ids"]
    assert text.startswith(hub_ckpt.BOS) and text.endswith(hub_ckpt.ASSISTANT)


@pytest.fixture(scope="module")
def grpo_run(hub, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo") / "run"
    r = sputnik("grpo", f"grpo.init={hub}", *COMMON, "grpo.steps=2", "grpo.prompts_per_step=2", "grpo.group_size=2",
                "grpo.train_size=16", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.ray
def test_grpo_from_a_hub_checkpoint_exports_a_complete_model_source(grpo_run, hub, tmp_path):
    import transformers

    from orchestrator.config import load_config
    from orchestrator.grpo.inputs import resolve_init

    metrics = [json.loads(line) for line in (grpo_run / "metrics.jsonl").read_text().splitlines()]
    assert max(m.get("step", 0) for m in metrics) == 2
    hf = grpo_run / "hf"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"):
        assert (hf / name).is_file(), name
    ref = transformers.AutoTokenizer.from_pretrained(hf)
    src = transformers.AutoTokenizer.from_pretrained(hub)
    assert ref.chat_template == src.chat_template and ref.eos_token_id == src.eos_token_id
    cfg = json.loads((hf / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (src.bos_token_id, src.eos_token_id, src.pad_token_id)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(hf, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # the run directory alone is a model source: no grpo.tokenizer needed
    assert resolve_init(load_config(None, [f"grpo.init={grpo_run}"])) == (hf, hf / "tokenizer.json")
    r = sputnik("export", "--from", str(grpo_run), "--to", str(tmp_path / "x"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "x" / "tokenizer.json").read_bytes() == (hub / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "x" / "tokenizer_config.json").read_text())["chat_template"] == hub_ckpt.CHAT_TEMPLATE
    # the command-line export options: FP8 in DeepSeek's layout, MTP inline, small shards with an index
    r = sputnik("export", "--from", str(grpo_run), "--to", str(tmp_path / "y"), "--fp8", "--mtp", "inline", "--max-shard-size", "1MB")
    assert r.returncode == 0, r.stderr[-3000:]
    index = json.loads((tmp_path / "y" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1 and any(k.endswith("weight_scale_inv") for k in index)
    assert json.loads((tmp_path / "y" / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
