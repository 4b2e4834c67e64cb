"""`sputnik demo`: the whole pipeline on this machine, as far as it has landed.

1. Build (or reuse) the tokenizer and the synthetic corpus (arithmetic and programming tasks, a
   share with worked reasoning), and pretrain the tiny MoE with 2 DeepSpeed workers on Ray Train
   (`<run>/pretrain/`).
2. Measure the pretrained model on held-out tasks: pass@1 of the policy sampled at temperature 1
   (`demo.samples_per_task` samples per task; the headline figure, as GRPO optimises the sampled
   policy) and greedy accuracy, and how often and how well it reasons (a sampled completion with a
   non-empty think block) or answers directly.
3. GRPO on the arithmetic train split with rollout samplers, reward evaluators and a DeepSpeed
   policy learner (`<run>/grpo/`), then the same measurements.
4. With `demo.code_steps` > 0, a second GRPO stage on synthetic programming tasks ("write a
   function returning x plus a plus b"), scored by running their tests in the sandbox
   (`<run>/grpo-code/`), then the same measurements.
5. `report.md` with PNG plots (pretraining loss, reward, held-out accuracy by stage, expert load
   heatmap, time breakdown) and `summary.json` with `heldout_accuracy_before` /
   `heldout_accuracy_after` per task kind.

Test: `pytest tests/orchestrator/test_orch_demo.py`.
"""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from orchestrator.config import RunConfig
from orchestrator.rundir import create_run_dir

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S)


def heldout_accuracy(model, tok, tasks, *, template: str, max_new_tokens: int = 96, batch: int = 32,
                     temperature: float = 0.0, seed: int = 0) -> dict:
    """pass@1 on arithmetic tasks (greedy at temperature 0), the fraction of completions that
    reason, and the accuracy of reasoned and of direct completions."""
    from data.templates import render_prompt
    from model.generate import generate
    from orchestrator.tracking import progress

    rows = tasks.to_pylist() if hasattr(tasks, "to_pylist") else list(tasks)
    correct = reasoned = correct_reasoned = 0
    samples = []
    for i in progress(range(0, len(rows), batch), description=f"held-out eval (T={temperature})"):
        chunk = rows[i : i + batch]
        prompts = [[tok.bos_id] + tok.encode(render_prompt(r["prompt"], template)) for r in chunk]
        outs = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + i,
                        stop_token_ids=[tok.answer_end_id, tok.eos_id], pad_id=tok.pad_id)
        for r, out in zip(chunk, outs):
            text = tok.decode(out)
            if r.get("kind") == "code":
                from rl.rewards.code import code_reward

                ok = code_reward(text, r["tests"], entry_point=r["entry_point"] or None, timeout_s=5) >= 1.0
            else:
                m = ANSWER_RE.search("<think>" + text)
                ok = m is not None and m.group(1).strip() == r["answer"]
            reasons = len(text.split("</think>")[0].strip()) > 0
            correct += ok
            reasoned += reasons
            correct_reasoned += ok and reasons
            if len(samples) < 5:
                samples.append({"prompt": r["prompt"], "completion": text, "correct": ok})
    n = max(1, len(rows))
    return {
        "accuracy": correct / n, "reasoning_fraction": reasoned / n, "n": len(rows), "samples": samples,
        "accuracy_when_reasoning": correct_reasoned / reasoned if reasoned else None,
        "accuracy_when_direct": (correct - correct_reasoned) / (len(rows) - reasoned) if len(rows) > reasoned else None,
    }


def measure(hf_dir: Path, tok, tasks, cfg: RunConfig, *, sampled: bool = True) -> tuple[dict, dict | None]:
    """Greedy and sampled held-out accuracy of the HF model in `hf_dir`: the sampled figure is pass@1
    at temperature 1 (the policy GRPO trains), averaged over `demo.samples_per_task` samples per task."""
    from model.hf import from_hf_pretrained

    model = from_hf_pretrained(hf_dir).eval()
    with torch.no_grad():
        greedy = heldout_accuracy(model, tok, tasks, template=cfg.data.template, max_new_tokens=cfg.rollout.max_new_tokens)
        rows = tasks.to_pylist() if hasattr(tasks, "to_pylist") else list(tasks)
        sample = heldout_accuracy(model, tok, rows * cfg.demo.samples_per_task, template=cfg.data.template,
                                  max_new_tokens=cfg.rollout.max_new_tokens, temperature=1.0, seed=cfg.seed) if sampled else None
    return greedy, sample


def run(cfg: RunConfig, cli_args) -> int:
    from data.tasks import generate_arithmetic, generate_code_tasks
    from data.tokenizer import load_tokenizer
    from orchestrator import grpo, pretrain

    t0 = time.time()
    code_stage = cfg.demo.code_steps > 0
    n_stages = 5 if code_stage else 4
    top = create_run_dir(cfg, cli_args.out).resolve()
    print(f"demo: run directory {top}", flush=True)
    print(f"demo: 1/{n_stages} corpus and pretraining (tiny MoE, 2 DeepSpeed workers on Ray Train)", flush=True)
    pre_dir = pretrain.execute(cfg, top / "pretrain")
    pre_summary = json.loads((pre_dir / "summary.json").read_text())
    t_pretrain = time.time() - t0

    print(f"demo: 2/{n_stages} held-out accuracy of the pretrained model", flush=True)
    t1 = time.time()
    tok = load_tokenizer(pre_summary["tokenizer"])
    d = cfg.data
    tasks = {"arithmetic": generate_arithmetic(cfg.grpo.heldout_size, seed=cfg.seed + 1, families=tuple(d.families),
                                               digits=d.digits, heldout_percent=d.heldout_percent, split="heldout")}
    if code_stage:
        tasks["code"] = generate_code_tasks(cfg.demo.code_heldout_size, seed=cfg.seed + 1, digits=d.digits,
                                            heldout_percent=d.heldout_percent, split="heldout")
    points = {"pretrained": {}, "after arithmetic GRPO": {}}
    for name, table in tasks.items():
        points["pretrained"][name] = measure(pre_dir / "hf", tok, table, cfg)
        _say("pretrained", name, points["pretrained"][name])
    t_eval = time.time() - t1

    print(f"demo: 3/{n_stages} GRPO on arithmetic (rollout samplers, reward evaluators, DeepSpeed policy learner on Ray)", flush=True)
    t1 = time.time()
    gcfg = copy.deepcopy(cfg)
    gcfg.grpo.init = str(pre_dir)
    grpo_dir, _ = grpo.execute(gcfg, top / "grpo")
    t_grpo = time.time() - t1

    print(f"demo: 4/{n_stages} held-out accuracy after GRPO on arithmetic", flush=True)
    t1 = time.time()
    for name, table in tasks.items():
        points["after arithmetic GRPO"][name] = measure(grpo_dir / "hf", tok, table, cfg)
        _say("after arithmetic GRPO", name, points["after arithmetic GRPO"][name])
    t_eval += time.time() - t1
    final, final_dir = "after arithmetic GRPO", grpo_dir
    code_dir, t_code = None, 0.0
    if code_stage:
        print(f"demo: 5/{n_stages} GRPO on programming tasks scored in the sandbox, then held-out accuracy", flush=True)
        t1 = time.time()
        ccfg = copy.deepcopy(cfg)
        ccfg.grpo.init, ccfg.grpo.tasks, ccfg.grpo.steps = str(grpo_dir), "code", cfg.demo.code_steps
        ccfg.grpo.heldout_size = cfg.demo.code_heldout_size
        ccfg.grpo.eval_every = max(1, cfg.demo.code_steps)
        ccfg.rewards = {"rewards": [{"name": "code_tests", "weight": 1.0}, {"name": "format", "weight": 0.1}]}
        code_dir, _ = grpo.execute(ccfg, top / "grpo-code")
        t_code = time.time() - t1
        t1 = time.time()
        final, final_dir = "after code GRPO", code_dir
        points[final] = {}
        for name, table in tasks.items():
            points[final][name] = measure(code_dir / "hf", tok, table, cfg)
            _say(final, name, points[final][name])
        t_eval += time.time() - t1

    pre, after = points["pretrained"], points[final]
    summary = {
        # the headline: pass@1 of the sampled policy (temperature 1), which is what GRPO optimises
        "heldout_accuracy_before": {k: v[1]["accuracy"] for k, v in pre.items()},
        "heldout_accuracy_after": {k: v[1]["accuracy"] for k, v in after.items()},
        "heldout_accuracy_by_stage": {stage: {k: v[1]["accuracy"] for k, v in p.items()} for stage, p in points.items()},
        "heldout_greedy_accuracy_before": {k: v[0]["accuracy"] for k, v in pre.items()},
        "heldout_greedy_accuracy_after": {k: v[0]["accuracy"] for k, v in after.items()},
        "heldout_greedy_accuracy_by_stage": {stage: {k: v[0]["accuracy"] for k, v in p.items()} for stage, p in points.items()},
        "heldout_samples_per_task": cfg.demo.samples_per_task,
        "heldout_reasoning_fraction_before": {k: v[1]["reasoning_fraction"] for k, v in pre.items()},
        "heldout_reasoning_fraction_after": {k: v[1]["reasoning_fraction"] for k, v in after.items()},
        "heldout_accuracy_when_reasoning_before": {k: v[1]["accuracy_when_reasoning"] for k, v in pre.items()},
        "heldout_accuracy_when_direct_before": {k: v[1]["accuracy_when_direct"] for k, v in pre.items()},
        "heldout_tasks": {k: len(t) for k, t in tasks.items()},
        "final_policy": str(final_dir / "hf"),
        "pretrain_steps": cfg.pretrain.steps, "pretrain_final_loss": pre_summary.get("final_loss"),
        "grpo_steps": {"arithmetic": cfg.grpo.steps, **({"code": cfg.demo.code_steps} if code_stage else {})},
        "time_seconds": {"pretrain": round(t_pretrain, 1), "grpo_arithmetic": round(t_grpo, 1), "grpo_code": round(t_code, 1),
                         "evaluation": round(t_eval, 1), "total": round(time.time() - t0, 1)},
        "heldout_accuracy_change_by_stage": stage_changes(points),
        "pretrain_dir": str(pre_dir), "grpo_dir": str(grpo_dir), "grpo_code_dir": str(code_dir) if code_dir else None,
    }
    (top / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plots = make_plots(top, pre_dir, [grpo_dir] + ([code_dir] if code_dir else []), summary)
    write_report(top, summary, points, final, plots)
    print(f"demo: report in {top / 'report.md'} ({summary['time_seconds']['total']:.0f} s in all)", flush=True)
    return 0


def stage_changes(points: dict) -> dict:
    """Per stage after the first, the change in held-out pass@1 and greedy accuracy per task against
    the stage before it."""
    stages = list(points)
    return {cur: {k: {"pass@1": points[cur][k][1]["accuracy"] - points[prev][k][1]["accuracy"],
                      "greedy": points[cur][k][0]["accuracy"] - points[prev][k][0]["accuracy"]} for k in points[cur]}
            for prev, cur in zip(stages, stages[1:])}


def _say(stage: str, task: str, m: tuple[dict, dict]) -> None:
    g, s = m
    print(f"demo: {stage}, {task}: pass@1 {s['accuracy']:.3f} sampled ({s['n']} samples), greedy {g['accuracy']:.3f} on {g['n']} held-out tasks; sampled completions "
          f"reason {s['reasoning_fraction']:.0%} of the time (accuracy {_fmt(s['accuracy_when_reasoning'])} when reasoning, "
          f"{_fmt(s['accuracy_when_direct'])} when answering directly)", flush=True)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _records(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()] if path.is_file() else []


def make_plots(top: Path, pre_dir: Path, grpo_dirs: list[Path], summary: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = top / "plots"
    out.mkdir(exist_ok=True)
    pre = _records(pre_dir / "metrics.jsonl")
    stages = [(d.name, _records(d / "metrics.jsonl")) for d in grpo_dirs]
    files = {}

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        files[name.removesuffix(".png")] = f"plots/{name}"

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in pre], [r["loss"] for r in pre], label="loss (main + MTP)")
    ax.plot([r["step"] for r in pre if "ce_loss" in r], [r["ce_loss"] for r in pre if "ce_loss" in r], label="next-token CE")
    ax.set(xlabel="pretraining step", ylabel="loss", title="Pretraining loss")
    ax.legend()
    save(fig, "loss.png")

    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 3.5), squeeze=False)
    for ax, (name, gr) in zip(axes[0], stages):
        steps = [r for r in gr if "reward_mean" in r]
        ax.plot([r["step"] for r in steps], [r["reward_mean"] for r in steps], label="reward (mean)")
        ax.plot([r["step"] for r in steps], [r.get("accuracy", 0) for r in steps], label="train accuracy")
        ax.plot([r["step"] for r in steps], [r.get("reasoning_frac", 0) for r in steps], label="reasoning fraction", ls="--")
        ax.set(xlabel="GRPO step", title=f"GRPO rollouts ({'code' if name.endswith('code') else 'arithmetic'})", ylim=(0, 1.05))
        ax.legend()
    save(fig, "reward.png")

    by_stage, greedy = summary["heldout_accuracy_by_stage"], summary["heldout_greedy_accuracy_by_stage"]
    cols = [(t, kind) for t in next(iter(by_stage.values())) for kind in ("pass@1 (T=1)", "greedy")]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(by_stage)
    for i, stage in enumerate(by_stage):
        vals = [(greedy if kind == "greedy" else by_stage)[stage][t] for t, kind in cols]
        ax.bar([j + i * width for j in range(len(cols))], vals, width, label=stage)
    ax.set_xticks([j + width * (len(by_stage) - 1) / 2 for j in range(len(cols))], [f"{t}\n{kind}" for t, kind in cols])
    ax.set(ylabel="held-out accuracy", ylim=(0, 1), title="Held-out accuracy by stage")
    ax.legend()
    save(fig, "heldout_accuracy.png")

    if (pre_dir / "expert_load.npy").is_file():
        loads = np.load(pre_dir / "expert_load.npy")
        fig, ax = plt.subplots(figsize=(6, 2 + 0.4 * loads.shape[0]))
        im = ax.imshow(loads / loads.mean(axis=1, keepdims=True), aspect="auto", cmap="viridis")
        ax.set(xlabel="expert", ylabel="MoE layer", title="Expert load at the end of pretraining (1 = balanced)")
        fig.colorbar(im, ax=ax)
        save(fig, "expert_load.png")

    t = summary["time_seconds"]
    parts = {"pretrain": t["pretrain"], "evaluation": t["evaluation"]}
    for key in ("generate", "score", "learn", "sync"):
        parts[f"grpo {key}"] = float(sum(r.get(f"time/{key}", 0) for _, gr in stages for r in gr))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.barh(list(parts), list(parts.values()))
    ax.set(xlabel="seconds", title="Where the time went (GRPO parts overlap in actors)")
    save(fig, "time.png")
    return files


def write_report(top: Path, summary: dict, points: dict, final: str, plots: dict) -> None:
    b, a = summary["heldout_accuracy_before"], summary["heldout_accuracy_after"]
    t = summary["time_seconds"]
    pre_s = {k: v[1] for k, v in points["pretrained"].items()}
    fin_s = {k: v[1] for k, v in points[final].items()}
    stages = list(points)
    lines = [
        "# Sputnik demo report",
        "",
        "## Result",
        "",
        f"Accuracy on held-out tasks (prompts that appear neither in pretraining nor in GRPO training): pass@1 of the "
        f"policy sampled at temperature 1 ({summary['heldout_samples_per_task']} samples per task), and greedy:",
        "",
        "| task | n | " + " | ".join(f"{s}: pass@1 | {s}: greedy" for s in stages) + " |",
        "|---|---|" + "---|---|" * len(stages),
        *[f"| {k} | {summary['heldout_tasks'][k]} | " + " | ".join(f"{points[s][k][1]['accuracy']:.3f} | {points[s][k][0]['accuracy']:.3f}" for s in stages)
          + " |" for k in b],
        "",
        *[f"- {k}: pass@1 **{b[k]:.3f} before GRPO, {a[k]:.3f} after** ({a[k] - b[k]:+.3f}); greedy {summary['heldout_greedy_accuracy_before'][k]:.3f} "
          f"before, {summary['heldout_greedy_accuracy_after'][k]:.3f} after; the policy reasons in {pre_s[k]['reasoning_fraction']:.0%} of sampled completions before and "
          f"{fin_s[k]['reasoning_fraction']:.0%} after. Before GRPO, sampled completions were right {_fmt(pre_s[k]['accuracy_when_reasoning'])} "
          f"of the time when they reasoned and {_fmt(pre_s[k]['accuracy_when_direct'])} when they answered directly." for k in b],
        "",
        "## What ran",
        f"- Pretraining: tiny DeepSeek-V3-style MoE (MLA, shared + routed experts, aux-loss-free balancing, MTP), {summary['pretrain_steps']} steps "
        f"with 2 DeepSpeed workers on Ray Train, final loss {summary['pretrain_final_loss']:.3f} ({t['pretrain']} s with corpus preparation).",
        f"- GRPO on arithmetic: {summary['grpo_steps']['arithmetic']} steps on Ray actors (rollout samplers, reward evaluators, a DeepSpeed policy learner), {t['grpo_arithmetic']} s.",
    ]
    if "code" in summary["grpo_steps"]:
        lines.append(f"- GRPO on programming tasks (write a function; scored by running its tests in the sandbox): {summary['grpo_steps']['code']} steps, {t['grpo_code']} s.")
    lines += [
        f"- Evaluation: {t['evaluation']} s. Total {t['total']} s.",
        "",
        "## Plots",
        "",
        *[f"![{name}]({path})" for name, path in plots.items()],
        "",
        "## Stage by stage",
        "",
        "What each GRPO stage changed on the held-out tasks (pass@1 sampled; greedy in brackets). A stage can raise a "
        "task it did not train on, when what it teaches (choosing to reason) carries over, and it can lower one it no longer trains on.",
        "",
        *[f"- {stage}: " + "; ".join(f"{k} {d['pass@1']:+.3f} ({d['greedy']:+.3f})" for k, d in change.items())
          for stage, change in summary["heldout_accuracy_change_by_stage"].items()],
        "",
        f"## Sample completions (held-out, greedy, {final})",
        "",
    ]
    for k, (g, _) in points[final].items():
        for smp in g["samples"][:3]:
            lines.append(f"- `{smp['prompt']}` -> `{smp['completion'].strip()[:160]}` ({'correct' if smp['correct'] else 'wrong'})")
    (top / "report.md").write_text("\n".join(lines) + "\n")
