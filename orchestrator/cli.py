"""The `sputnik` command line: demo, pretrain, sft, sample, distill, grpo, eval, export, plan, config.

Every subcommand takes `--config FILE`, `--out DIR` and dotted overrides (`grpo.group_size=8`).
The config is validated before anything starts: a bad key or value, or any other error a user can
cause (a missing file, a run without checkpoints), prints one line and exits 2.

Test: `pytest tests/orchestrator/test_orch_cli.py`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from orchestrator.config import CONFIG_DIR, ConfigError, load_config
from orchestrator.signals import Stopped, stop_on_sigterm

EXIT_CONFIG = 2

# subcommand -> (help, default config, "module:function" implementing it); modules load on use,
# so `sputnik plan` does not import torch, Ray or DeepSpeed
COMMANDS = {
    "demo": ("the whole pipeline on this machine: corpus, pretraining, GRPO, report", "demo.yaml", "orchestrator.demo:run"),
    "pretrain": ("pretrain the MoE model with Ray Train + DeepSpeed", "pretrain_tiny.yaml", "orchestrator.pretrain:run"),
    "sft": ("supervised fine-tuning on a prompt/completion or chat table, from a run or HF model", "sft_math.yaml", "orchestrator.sft:run"),
    "sample": ("rejection sampling: a teacher's completions the verifier accepts, as an SFT table", "grpo_math.yaml", "orchestrator.sample:run"),
    "distill": ("rejection-sample a teacher and fine-tune a (smaller) student on what it kept", "grpo_math.yaml", "orchestrator.distill:run"),
    "grpo": ("R1-Zero-style GRPO with rollout samplers, reward evaluators and policy learners", "grpo_math.yaml", "orchestrator.grpo:run"),
    "eval": ("score a model, or given completions, on a task set: HumanEval, reasoning-gym, GSM8K/MATH files (pass@k)", "grpo_math.yaml", "orchestrator.evaluate:run"),
    "export": ("export a pretraining or GRPO checkpoint as a Hugging Face DeepseekV3 directory", "pretrain_tiny.yaml", "orchestrator.export:run"),
    "plan": ("print the placement and memory plan of a config for a cluster size", "grpo_math.yaml", "orchestrator.placement:run"),
    "config": ("print every config key: value, default, type, range, description", None, "orchestrator.config_doc:run"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sputnik",
        description="Sputnik: DeepSeek-V3-style MoE pretraining and R1-Zero GRPO on Ray.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, default_cfg, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog="Every key, its default and what it does: `sputnik config [--config FILE]`.")
        if default_cfg is None:
            p.add_argument("--config", default=None, help="run config YAML (default: the built-in defaults)")
        else:
            p.add_argument("--config", default=str(CONFIG_DIR / default_cfg), help=f"run config YAML (default: configs/{default_cfg})")
        p.add_argument("--out", default=None, help="run directory (default: runs/<name>-<timestamp>/)")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides, e.g. grpo.group_size=8")
        if name == "export":
            p.add_argument("--from", dest="from_dir", required=True, help="pretraining or GRPO run directory")
            p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
            p.add_argument("--to", dest="to_dir", required=True, help="output directory for the HF checkpoint")
            p.add_argument("--mtp", choices=("separate", "inline", "none"), default=None,
                           help="MTP layers: in a file of their own (default; transformers loads without warnings), "
                                "inline as on the hub, or left out")
            p.add_argument("--fp8", action="store_true", help="store the linear weights as DeepSeek's FP8 (e4m3 + weight_scale_inv)")
            p.add_argument("--max-shard-size", dest="max_shard_size", default=None, help="largest shard, e.g. 5GB (the default) or 500MB")
        if name == "eval":
            p.add_argument("--tasks", default=None, help="arithmetic, code, humaneval, reasoning-gym:<generator>[?size=N&seed=S&option=value], "
                                                          "or a .jsonl/.parquet task file (our schema, GSM8K or MATH fields)")
            p.add_argument("--model", default=None, help="a pretraining or GRPO run directory, or an HF directory (eval.checkpoint)")
            p.add_argument("--completions", default=None, help="score these completions instead of a model's: JSONL of "
                                                               '{"id": "HumanEval/0", "completion": "..."}, several per id for pass@k')
            p.add_argument("--samples", type=int, default=None, help="sampled completions per task, n of pass@k (eval.samples_per_task)")
            p.add_argument("--k", default=None, help="the k of each pass@k, comma-separated, e.g. 1,5,10 (eval.k)")
            p.add_argument("--temperature", type=float, default=None, help="sampling temperature (rollout.temperature)")
            p.add_argument("--limit", type=int, default=None, help="score only the first N tasks (eval.limit)")
            p.add_argument("--split", choices=("all", "train", "heldout"), default="all",
                           help="tasks of a task set or file to score (default: all; generators always give their held-out split)")
        if name == "plan":
            p.add_argument("--nodes", type=int, default=1, help="number of worker nodes")
            p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs on each node")
            p.add_argument("--cpus-per-node", type=int, default=None, help="CPUs on each node")
            p.add_argument("--node", dest="node_list", action="append", default=None, metavar="CPUS[:GPUS]",
                           help="one node's resources, repeated per node (a cluster of unequal nodes, e.g. a 0-CPU "
                                "head: --node 0 --node 8:1 --node 8:1); replaces --nodes/--*-per-node")
            p.add_argument("--address", dest="plan_address", default=None,
                           help="plan for the nodes of this running Ray cluster (`auto` inside a job)")
            p.add_argument("--gpu-memory-gib", dest="gpu_memory_gib", type=float, default=None,
                           help="memory of one GPU in GiB for the memory plan (default 80, an H100; an H200 has 131)")
            p.add_argument("--host-memory-gib", dest="host_memory_gib", type=float, default=None,
                           help="CPU memory of one node in GiB, for CPU roles and offloaded optimizer state (default 64)")
            p.add_argument("--prompt-len", dest="prompt_len", type=int, default=None,
                           help="longest prompt in tokens, for the samplers' KV cache and the learners' sequences (default 256)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stop_on_sigterm()
    module_name, func_name = COMMANDS[args.command][2].split(":")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"sputnik {args.command}: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return int(getattr(importlib.import_module(module_name), func_name)(cfg, args) or 0)
    except ConfigError as e:
        print(f"sputnik {args.command}: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt as e:
        how = "stopped (SIGTERM)" if isinstance(e, Stopped) else "interrupted"
        print(f"sputnik {args.command}: {how}; finished checkpoints and metrics are kept; run again with the same --out to resume.",
              file=sys.stderr)
        return 143 if isinstance(e, Stopped) else 130


if __name__ == "__main__":
    sys.exit(main())
