"""`sputnik grpo` against TRL's GRPOTrainer on the same model, prompts, rewards and loss.

Both train the same exported policy (the HF export of a `sputnik pretrain` run) on the same
arithmetic prompts in the same order (GRPO's own seeded TaskStream, handed to TRL as a dataset it
does not shuffle), G completions per prompt, the same stop tokens (the tokenizer's stop ids), the
same rewards (math_accuracy + 0.1 format, our reward functions on the completion decoded by our
tokenizer), the same loss (DAPO token mean, clip 0.2/0.28, no KL, no reference model), AdamW with
the same lr, betas, weight decay and clipping, constant schedule, and two optimizer steps of 64
completions per GRPO step. Settings that differ, by construction: TRL generates with transformers'
`generate` (padded batch, its own DeepseekV3 modules) and trains in the trainer's process; Sputnik
generates on a RolloutSampler actor, scores on a RewardWorker actor and trains on a PolicyLearner
actor (Ray, DeepSpeed ZeRO-0); its async mode samples step k+1 while step k trains (one step off
policy); `one_process` and `one_process_async` are those runs with `grpo.runtime=one_process`: the
same roles in the driver's process, no Ray, each actor on its own thread (in sync mode the phases
take turns on all cores, in async mode the learner and the sampler get one each;
orchestrator/one_process.py).

Each configuration runs in its own process tree, interleaved over `--rounds`; per configuration:
seconds per GRPO step (mean over the steps after the first, which includes warm-up), completion
tokens per second, peak memory of the whole process tree (PSS, sampled every 0.2 s), and the mean
reward per step (per seed: the learning curves). It ends with the lines `sync/TRL step rate: N.NNx`
and `async/TRL step rate: N.NNx` (the lower of the workloads, TRL at its default thread count),
after the same for the one-process runs and each configuration's peak memory over TRL's.

Needs TRL, an optional benchmark dependency: `pip install -e .[bench]`.
Run: `python benchmarks/grpo_vs_trl.py --init RUN_DIR [--steps 6 --rounds 2 --seeds 0,1 --workloads math,demo]`
where RUN_DIR is a `sputnik pretrain` run (e.g. `<demo run>/pretrain`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# name -> (data.digits, rollout.max_new_tokens): configs/grpo_math.yaml's shape and the demo's
WORKLOADS = {"math": (3, 96), "demo": (2, 64)}
PROMPTS, GROUP, MINIBATCH, LR = 16, 8, 64, 1e-4


def common_overrides(init: str, digits: int, new_tokens: int, steps: int, seed: int) -> list[str]:
    return [f"grpo.init={init}", f"data.digits={digits}", f"rollout.max_new_tokens={new_tokens}", f"grpo.steps={steps}",
            f"grpo.prompts_per_step={PROMPTS}", f"grpo.group_size={GROUP}", f"grpo.minibatch_size={MINIBATCH}", f"grpo.lr={LR}",
            "grpo.kl_beta=0", "grpo.aggregation=token", "grpo.clip_low=0.2", "grpo.clip_high=0.28", f"seed={seed}"]


# --- peak memory of a process tree ---------------------------------------------------------------

class PeakPSS:
    """Samples the summed PSS of a process and all its descendants until stopped."""

    def __init__(self, pid: int, every_s: float = 0.2):
        import psutil

        self.root, self.every_s, self.peak = psutil.Process(pid), every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                try:
                    total += p.memory_full_info().pss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.every_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_measured(cmd: list[str], env: dict, log: Path) -> tuple[int, float]:
    """(peak PSS bytes, wall seconds) of a command's process tree; raises on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        meter = PeakPSS(proc.pid)
        rc = proc.wait()
        peak = meter.stop()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {rc}; log: {log}\n" + log.read_text()[-3000:])
    return peak, time.perf_counter() - t0


# --- Sputnik --------------------------------------------------------------------------------------

def sputnik_run(init: str, workload: str, mode: str, steps: int, seed: int, tmp: Path) -> dict:
    """mode: sync or async (Ray actors), or one_process / one_process_async (grpo.runtime=one_process: no Ray)."""
    digits, new_tokens = WORKLOADS[workload]
    out = tmp / f"sputnik-{workload}-{mode}-{time.time_ns()}"
    runtime = {"one_process": ["grpo.mode=sync", "grpo.runtime=one_process"],
               "one_process_async": ["grpo.mode=async", "grpo.runtime=one_process"]}.get(mode, [f"grpo.mode={mode}"])
    cmd = [sys.executable, "-m", "orchestrator.cli", "grpo", "--out", str(out), *common_overrides(init, digits, new_tokens, steps, seed),
           *runtime, "grpo.weight_sync=object_store", "grpo.eval_every=100000", "grpo.heldout_size=1", "grpo.heldout_samples=0",
           "grpo.checkpoint_every=100000", "tracking.wandb_mode=disabled", "cluster.num_cpus=2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    peak, wall = run_measured(cmd, env, tmp / f"{out.name}.log")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "timing/step" in r]
    secs = [r["timing/step"] for r in recs]
    tokens = [r["rollout/response_length/mean"] * PROMPTS * GROUP for r in recs]
    return {"seconds": secs, "tokens": tokens, "rewards": [r["reward/mean"] for r in recs], "peak_pss": peak, "wall": wall}


# --- TRL (runs in a child process: `--trl-child`) -------------------------------------------------

def trl_child(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from data.tokenizer import load_tokenizer
    from orchestrator.config import load_config
    from orchestrator.grpo.inputs import TaskStream, load_tasks, resolve_init
    from rl.rewards.builtin import format_reward as fmt, math_accuracy as acc

    digits, new_tokens = WORKLOADS[a.workload]
    cfg = load_config(None, common_overrides(a.init, digits, new_tokens, a.steps, a.seed))
    hf_dir, tok_path = resolve_init(cfg)
    ours = load_tokenizer(tok_path)
    train, _ = load_tasks(cfg)
    rows = TaskStream(train, cfg.seed).take(a.steps * PROMPTS)  # GRPO's prompts, in GRPO's order
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    texts = []
    for r in rows:  # the prompt text whose tokenisation (TRL: add_special_tokens on) is our prompt ids
        want = ours.prompt_ids(r["prompt"], cfg.data.template)
        text = ours.decode(want)
        for cand in (text, ours.decode(want[1:])):
            if hf_tok(cand)["input_ids"] == want:
                texts.append(cand)
                break
        else:
            raise SystemExit(f"the HF tokenizer does not reproduce the prompt ids of {r['id']}")
    data = Dataset.from_list([{"prompt": t, "answer": r["answer"], "task_prompt": r["prompt"], "kind": r["kind"]} for t, r in zip(texts, rows)])

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = list(ours.stop_ids)  # TRL masks after the first of these
    model.generation_config.pad_token_id = ours.pad_id
    step_rewards, step_tokens = [], []

    def texts_of(completion_ids):
        return [ours.decode(ids) for ids in completion_ids]

    def accuracy(prompts, completions, completion_ids, answer, task_prompt, **kw):
        done = texts_of(completion_ids)
        out = [acc(c, {"answer": x, "prompt": p}) for c, x, p in zip(done, answer, task_prompt)]
        step_rewards.append(out)
        step_tokens.append(sum(len(ids) for ids in completion_ids))
        return out

    def form(prompts, completions, completion_ids, **kw):
        out = [fmt(c, {}) for c in texts_of(completion_ids)]
        step_rewards[-1] = [x + 0.1 * y for x, y in zip(step_rewards[-1], out)]
        return out

    spg = PROMPTS * GROUP // MINIBATCH  # optimizer steps per GRPO step
    args = GRPOConfig(
        output_dir=str(Path(a.out) / "trl"), use_cpu=True, bf16=False, seed=a.seed, report_to="none", save_strategy="no", logging_steps=1,
        max_steps=a.steps * spg, per_device_train_batch_size=MINIBATCH, gradient_accumulation_steps=1, steps_per_generation=spg,
        num_generations=GROUP, max_completion_length=new_tokens, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=0,
        shuffle_dataset=False, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, adam_beta1=cfg.grpo.betas[0],
        adam_beta2=cfg.grpo.betas[1], weight_decay=cfg.grpo.weight_decay, max_grad_norm=cfg.grpo.grad_clip, beta=0.0, num_iterations=1,
        loss_type="dapo", epsilon=cfg.grpo.clip_low, epsilon_high=cfg.grpo.clip_high, scale_rewards="group",
        mask_truncated_completions=False, reward_weights=[1.0, 0.1], disable_dropout=True, dataloader_num_workers=0,
        generation_kwargs={"eos_token_id": list(ours.stop_ids), "pad_token_id": ours.pad_id},
    )
    ends = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step % spg == 0:
                ends.append(time.perf_counter())

    trainer = GRPOTrainer(model=model, reward_funcs=[accuracy, form], args=args, train_dataset=data, processing_class=hf_tok,
                          callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    starts = [t0, *ends[:-1]]
    Path(a.out, "trl.json").write_text(json.dumps({
        "seconds": [e - s for s, e in zip(starts, ends)], "tokens": step_tokens,
        "rewards": [sum(r) / len(r) for r in step_rewards]}))


def trl_run(init: str, workload: str, threads: int, steps: int, seed: int, tmp: Path, site: str | None) -> dict:
    out = tmp / f"trl-{workload}-{threads}-{time.time_ns()}"
    out.mkdir()
    cmd = [sys.executable, __file__, "--trl-child", "--init", init, "--workload", workload, "--threads", str(threads),
           "--steps", str(steps), "--seed", str(seed), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (site, str(REPO)) if p), "TOKENIZERS_PARALLELISM": "false"}
    peak, wall = run_measured(cmd, env, tmp / f"{out.name}.log")
    res = json.loads((out / "trl.json").read_text())
    return {**res, "peak_pss": peak, "wall": wall}


# --- the comparison ------------------------------------------------------------------------------

def summarise(runs: list[dict]) -> dict:
    import numpy as np

    secs = [s for r in runs for s in r["seconds"][1:]]  # after the first step of each run
    toks = [t for r in runs for t in r["tokens"][1:]]
    return {"s_per_step": float(np.mean(secs)), "tokens_per_s": float(sum(toks) / sum(secs)),
            "peak_gib": max(r["peak_pss"] for r in runs) / 2**30,
            "reward": [float(np.mean(x)) for x in zip(*[r["rewards"] for r in runs])]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", required=True, help="a `sputnik pretrain` run directory (or an HF directory with its tokenizer)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seeds", default="0,1", help="run seeds, comma separated (each configuration runs once per seed and round)")
    ap.add_argument("--workloads", default="math,demo")
    ap.add_argument("--trl-threads", default="2", help="TRL's torch threads, comma separated (2 = its default on 2 cores)")
    ap.add_argument("--site", default=os.environ.get("TRL_SITE"), help="extra sys.path entry holding trl (if not installed)")
    # the TRL child
    ap.add_argument("--trl-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.trl_child:
        return trl_child(a)
    tmp = Path(tempfile.mkdtemp(prefix="grpo-vs-trl-"))
    threads = [int(x) for x in a.trl_threads.split(",")]
    seeds = [int(x) for x in a.seeds.split(",")]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {a.steps} steps of {PROMPTS} prompts x {GROUP} completions, "
          f"seeds {seeds}, {a.rounds} interleaved rounds; logs in {tmp}", flush=True)
    modes = ("sync", "async", "one_process", "one_process_async")
    ratios: dict[str, list[float]] = {m: [] for m in modes}
    memory: dict[str, list[float]] = {m: [] for m in modes}
    for w in a.workloads.split(","):
        runs: dict[tuple[str, int], list[dict]] = {}
        for rnd in range(a.rounds):
            for seed in seeds:
                for name in ["sync", *[f"trl-{t}" for t in threads], "async", "one_process", "one_process_async"]:
                    if name.startswith("trl"):
                        r = trl_run(a.init, w, int(name[4:]), a.steps, seed, tmp, a.site)
                    else:
                        r = sputnik_run(a.init, w, name, a.steps, seed, tmp)
                    runs.setdefault((name, seed), []).append(r)
                    print(f"  {w} round {rnd + 1} seed {seed} {name}: {sum(r['seconds'][1:]) / max(1, len(r['seconds']) - 1):.2f} s/step, "
                          f"peak {r['peak_pss'] / 2**30:.2f} GiB, wall {r['wall']:.0f} s", flush=True)
        names = list(dict.fromkeys(n for n, _ in runs))
        s = {n: summarise([r for (m, _), v in runs.items() if m == n for r in v]) for n in names}
        digits, new_tokens = WORKLOADS[w]
        print(f"\n{w} ({digits}-digit prompts, {new_tokens} new tokens):")
        print("| run | s/step | tokens/s | peak PSS GiB | " + " | ".join(f"reward per step, seed {x}" for x in seeds)
              + " |\n|---|---|---|---|" + "---|" * len(seeds))
        for n, v in s.items():
            curves = [" ".join(f"{x:.2f}" for x in summarise(runs[(n, seed)])["reward"]) for seed in seeds]
            print(f"| {n} | {v['s_per_step']:.2f} | {v['tokens_per_s']:.0f} | {v['peak_gib']:.2f} | " + " | ".join(curves) + " |")
        base = s[f"trl-{threads[0]}"]
        for mode in modes:
            ratios[mode].append(base["s_per_step"] / s[mode]["s_per_step"])
            memory[mode].append(s[mode]["peak_gib"] / base["peak_gib"])
            print(f"{w} {mode}/TRL step rate: {ratios[mode][-1]:.2f}x; peak memory {memory[mode][-1]:.2f}x TRL's")
    print("\n(the lower step rate and the higher memory of the workloads)")
    for mode in modes:
        print(f"{mode} peak memory / TRL's: {max(memory[mode]):.2f}x")
    for mode in ("one_process", "one_process_async", "sync", "async"):
        print(f"{mode}/TRL step rate: {min(ratios[mode]):.2f}x")


if __name__ == "__main__":
    main()
