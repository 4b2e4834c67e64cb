"""Reports: report.md with PNG plots, for a GRPO run (`sputnik grpo`) and for the demo.

Everything here reads what a run already wrote (metrics.jsonl, summary.json, heldout.jsonl, the
pretraining run's expert_load.npy), so a report can be rebuilt from a run directory at any time:
`python -m orchestrator.report RUN_DIR` rewrites a GRPO run's report.

Test: `pytest tests/orchestrator/test_orch_report.py`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


class Plots:
    """PNG files under `<dir>/plots/`, named in the report as `plots/<name>.png`."""

    def __init__(self, top: Path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt, self.dir, self.files = plt, top / "plots", {}
        self.dir.mkdir(parents=True, exist_ok=True)

    def figure(self, w: float = 6, h: float = 3.5, ncols: int = 1):
        return self.plt.subplots(1, ncols, figsize=(w * ncols, h), squeeze=False)

    def save(self, fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(self.dir / f"{name}.png", dpi=100)
        self.plt.close(fig)
        self.files[name] = f"plots/{name}.png"

    def markdown(self) -> list[str]:
        return [f"![{name}]({path})" for name, path in self.files.items()]


def plot_rewards(p: Plots, stages: list[tuple[str, list[dict]]]) -> None:
    """Reward, train accuracy and reasoning fraction per GRPO step, one panel per stage."""
    fig, axes = p.figure(ncols=len(stages))
    for ax, (title, recs) in zip(axes[0], stages):
        steps = [r for r in recs if "reward/mean" in r]
        x = [r["step"] for r in steps]
        ax.plot(x, [r["reward/mean"] for r in steps], label="reward (mean)")
        ax.plot(x, [r.get("rollout/accuracy", 0) for r in steps], label="train accuracy")
        ax.plot(x, [r.get("rollout/reasoning_frac", 0) for r in steps], label="reasoning fraction", ls="--")
        ax.set(xlabel="GRPO step", title=title, ylim=(0, 1.05))
        ax.legend()
    p.save(fig, "reward")


def plot_length_and_heldout(p: Plots, recs: list[dict]) -> None:
    """Mean response length per step, and held-out accuracy where it was measured."""
    fig, axes = p.figure(ncols=2)
    ax1, ax2 = axes[0]
    steps = [r for r in recs if "rollout/response_length/mean" in r]
    ax1.plot([r["step"] for r in steps], [r["rollout/response_length/mean"] for r in steps])
    ax1.set(xlabel="GRPO step", ylabel="tokens", title="Mean response length")
    held = [r for r in recs if "eval/accuracy" in r]
    ax2.plot([r["step"] for r in held], [r["eval/accuracy"] for r in held], marker="o", label="greedy")
    sampled = [r for r in held if "eval/pass@1" in r]
    if sampled:
        ax2.plot([r["step"] for r in sampled], [r["eval/pass@1"] for r in sampled], marker="o", label="pass@1 sampled")
    ax2.set(xlabel="GRPO step", ylim=(0, 1.05), title="Held-out accuracy")
    ax2.legend()
    p.save(fig, "heldout")


def plot_time(p: Plots, parts: dict[str, float]) -> None:
    fig, ax = p.figure()
    ax[0][0].barh(list(parts), list(parts.values()))
    ax[0][0].set(xlabel="seconds", title="Where the time went (GRPO parts overlap in actors)")
    p.save(fig, "time")


def grpo_time_parts(stages: list[list[dict]]) -> dict[str, float]:
    return {f"grpo {key}": float(sum(r.get(f"timing/{key}", 0) for recs in stages for r in recs)) for key in ("generate", "score", "learn", "sync")}


def write_grpo_report(run_dir: Path) -> Path:
    """report.md of one `sputnik grpo` run, with plots of rewards, length, held-out accuracy and time."""
    run_dir = Path(run_dir)
    recs = read_jsonl(run_dir / "metrics.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    p = Plots(run_dir)
    plot_rewards(p, [("GRPO rollouts", recs)])
    plot_length_and_heldout(p, recs)
    plot_time(p, grpo_time_parts([recs]))
    steps = [r for r in recs if "reward/mean" in r]
    lines = ["# GRPO run report", "", f"Run directory `{run_dir}`; {summary.get('grpo_steps', len(steps))} steps, policy version "
             f"{summary.get('policy_version', '?')}.", "", "## Held-out accuracy", "", "| | greedy | pass@1 sampled |", "|---|---|---|"]
    for when in ("before", "after"):
        g, s = summary.get(f"heldout_accuracy_{when}"), summary.get(f"heldout_pass@1_{when}")
        if g is not None:
            lines.append(f"| {when} GRPO | {g:.3f} | {'n/a' if s is None else f'{s:.3f}'} |")
    if steps:
        a, b = steps[0], steps[-1]
        lines += ["", "## Training", "", f"- reward {a['reward/mean']:.3f} (step {a['step']}) -> {b['reward/mean']:.3f} (step {b['step']}); "
                  f"train accuracy {a.get('rollout/accuracy', 0):.3f} -> {b.get('rollout/accuracy', 0):.3f}; mean response length "
                  f"{a['rollout/response_length/mean']:.1f} -> {b['rollout/response_length/mean']:.1f} tokens.",
                  f"- time: {sum(r.get('timing/step', 0) for r in steps):.0f} s in steps; " + ", ".join(
                      f"{k} {v:.0f} s" for k, v in grpo_time_parts([recs]).items()) + "."]
        meter = [r for r in steps if "mismatch/logprob_abs_mean" in r]
        if meter:  # issue 20: the sampler/learner gap, over the steps
            lines.append(f"- sampler/learner mismatch: mean |delta log-prob| {sum(r['mismatch/logprob_abs_mean'] for r in meter) / len(meter):.2e}, "
                         f"max {max(r['mismatch/logprob_abs_max'] for r in meter):.2e}, k3 KL {sum(r['mismatch/kl'] for r in meter) / len(meter):.2e}, "
                         f"tokens routed differently {sum(r.get('mismatch/routing_frac', 0.0) for r in meter) / len(meter):.2%} "
                         f"(mean over {len(meter)} steps).")
    lines += ["", "## Plots", "", *p.markdown(), ""]
    held = read_jsonl(run_dir / "heldout.jsonl")
    if held:
        last = max(r["step"] for r in held)
        lines += [f"## Held-out completions (greedy, step {last})", ""]
        lines += [f"- `{r['prompt']}` -> `{r['greedy_completion'].strip()[:160]}` ({'correct' if r['greedy_correct'] else 'wrong'})"
                  for r in [r for r in held if r["step"] == last][:5]]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    return run_dir / "report.md"


# ---------------------------------------------------------------------------------------------
# The demo's report
# ---------------------------------------------------------------------------------------------


def demo_plots(top: Path, pre_dir: Path, grpo_dirs: list[Path], summary: dict) -> Plots:
    import numpy as np

    p = Plots(top)
    pre = read_jsonl(pre_dir / "metrics.jsonl")
    fig, ax = p.figure()
    ax = ax[0][0]
    ax.plot([r["step"] for r in pre], [r["train/loss"] for r in pre], label="loss (main + MTP)")
    ax.plot([r["step"] for r in pre], [r["train/ce_loss"] for r in pre], label="next-token CE")
    ax.set(xlabel="pretraining step", ylabel="loss", title="Pretraining loss")
    ax.legend()
    p.save(fig, "loss")
    stages = [(d, read_jsonl(d / "metrics.jsonl")) for d in grpo_dirs]
    plot_rewards(p, [(f"GRPO rollouts ({'code' if d.name.endswith('code') else 'arithmetic'})", recs) for d, recs in stages])

    by_stage, greedy = summary["heldout_accuracy_by_stage"], summary["heldout_greedy_accuracy_by_stage"]
    cols = [(t, kind) for t in next(iter(by_stage.values())) for kind in ("pass@1 (sampled)", "greedy")]
    fig, ax = p.figure()
    ax = ax[0][0]
    width = 0.8 / len(by_stage)
    for i, stage in enumerate(by_stage):
        vals = [(greedy if kind == "greedy" else by_stage)[stage][t] for t, kind in cols]
        ax.bar([j + i * width for j in range(len(cols))], vals, width, label=stage)
    ax.set_xticks([j + width * (len(by_stage) - 1) / 2 for j in range(len(cols))], [f"{t}\n{kind}" for t, kind in cols])
    ax.set(ylabel="held-out accuracy", ylim=(0, 1), title="Held-out accuracy by stage")
    ax.legend()
    p.save(fig, "heldout_accuracy")

    if (pre_dir / "expert_load.npy").is_file():
        loads = np.load(pre_dir / "expert_load.npy")
        fig, ax = p.figure(h=2 + 0.4 * loads.shape[0])
        im = ax[0][0].imshow(loads / loads.mean(axis=1, keepdims=True), aspect="auto", cmap="viridis")
        ax[0][0].set(xlabel="expert", ylabel="MoE layer", title="Expert load at the end of pretraining (1 = balanced)")
        fig.colorbar(im, ax=ax[0][0])
        p.save(fig, "expert_load")
    t = summary["time_seconds"]
    plot_time(p, {"pretrain": t["pretrain"], "evaluation": t["evaluation"], **grpo_time_parts([recs for _, recs in stages])})
    return p


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def distillation_lines(summary: dict) -> list[str]:
    """The report's distillation section: the students against the teacher (held-out arithmetic)."""
    d, t = summary["distillation"], summary["time_seconds"]
    g, p = d["heldout_greedy"], d["heldout_pass@1"]
    rows = [("teacher (GRPO policy, tiny)", d["teacher_greedy"], d["teacher_pass@1"], "")]
    label = {"student pretrained": "pretrained", "distilled student": "distilled", "student after GRPO": "after GRPO directly"}
    rows += [(f"student ({d['student_preset']}), {label.get(k, k)}", g[k], p[k],
              {"distilled student": f"{d['distill_steps']} SFT steps on {d['samples_kept']} verified teacher completions, {t['distill']} s",
               "student after GRPO": f"{d.get('student_grpo_steps')} GRPO steps in {t.get('student_grpo')} s (the same time budget)",
               "student pretrained": f"pretrained as the teacher was, {t['student_pretrain']} s"}.get(k, "")) for k in g]
    return ["## Distillation", "",
            f"DeepSeek-R1's comparison at our scale: a student of {d['student_parameters']:,} activated parameters (the teacher: "
            f"{d['teacher_parameters']:,}) fine-tuned on the GRPO policy's rejection-sampled completions, beside the same "
            "pretrained student trained by GRPO directly for the same wall-clock time. Held-out bare sums:", "",
            "| model | greedy | pass@1 | how |", "|---|---|---|---|",
            *[f"| {name} | {gr:.3f} | {_fmt(pa)} | {how} |" for name, gr, pa, how in rows], ""]


def write_demo_report(top: Path, summary: dict, points: dict, final: str, plots: Plots) -> None:
    """`points[stage][task]` is an orchestrator.evaluate.HeldoutResult."""
    b, a = summary["heldout_accuracy_before"], summary["heldout_accuracy_after"]
    gb, ga = summary["heldout_greedy_accuracy_before"], summary["heldout_greedy_accuracy_after"]
    t = summary["time_seconds"]
    pre, fin = points["pretrained"], points[final]
    stages = list(points)
    lines = [
        "# Sputnik demo report", "", "## Result", "",
        f"Accuracy on held-out tasks (prompts that appear neither in pretraining nor in GRPO training), by the verifier that "
        f"scores training: pass@1 of the policy sampled at the rollout temperature ({summary['heldout_samples_per_task']} samples per task), and greedy:",
        "",
        "| task | n | " + " | ".join(f"{s}: pass@1 | {s}: greedy" for s in stages) + " |",
        "|---|---|" + "---|---|" * len(stages),
        *[f"| {k} | {summary['heldout_tasks'][k]} | " + " | ".join(f"{_fmt(points[s][k].sampled)} | {points[s][k].greedy:.3f}" for s in stages)
          + " |" for k in b],
        "",
        *[f"- {k}: pass@1 **{b[k]:.3f} before GRPO, {a[k]:.3f} after** ({a[k] - b[k]:+.3f}); greedy {gb[k]:.3f} before, {ga[k]:.3f} after; "
          f"the policy reasons in {pre[k].reasoning_fraction:.0%} of sampled completions before and {fin[k].reasoning_fraction:.0%} after. "
          f"Before GRPO, sampled completions were right {_fmt(pre[k].accuracy_when_reasoning)} of the time when they reasoned and "
          f"{_fmt(pre[k].accuracy_when_direct)} when they answered directly." for k in b],
        "", "## What ran",
        f"- Pretraining: tiny DeepSeek-V3-style MoE (MLA, shared + routed experts, aux-loss-free balancing, MTP), {summary['pretrain_steps']} steps "
        f"with 2 DeepSpeed workers on Ray Train, final loss {summary['pretrain_final_loss']:.3f} ({t['pretrain']} s with corpus preparation).",
        f"- GRPO on arithmetic: {summary['grpo_steps']['arithmetic']} steps on Ray actors (rollout samplers, reward evaluators, a DeepSpeed policy learner), {t['grpo_arithmetic']} s.",
    ]
    if "code" in summary["grpo_steps"]:
        lines.append(f"- GRPO on programming tasks (write a function; scored by running its tests in the sandbox): {summary['grpo_steps']['code']} steps, {t['grpo_code']} s.")
    lines += [
        f"- Evaluation: {t['evaluation']} s. Total {t['total']} s.", "", "## Plots", "", *plots.markdown(), "",
        "## Stage by stage", "",
        "What each GRPO stage changed on the held-out tasks (pass@1 sampled; greedy in brackets). A stage can raise a "
        "task it did not train on, when what it teaches (choosing to reason) carries over, and it can lower one it no longer trains on.",
        "",
        *[f"- {stage}: " + "; ".join(f"{k} {d['pass@1']:+.3f} ({d['greedy']:+.3f})" for k, d in change.items())
          for stage, change in summary["heldout_accuracy_change_by_stage"].items()],
        "", f"## Sample completions (held-out, greedy, {final})", "",
    ]
    if "distillation" in summary:
        lines[lines.index("## Stage by stage"):lines.index("## Stage by stage")] = distillation_lines(summary)
    for res in fin.values():
        for row in res.rows[:3]:
            lines.append(f"- `{row['prompt']}` -> `{row['greedy_completion'].strip()[:160]}` ({'correct' if row['greedy_correct'] else 'wrong'})")
    (top / "report.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    print(write_grpo_report(Path(sys.argv[1])))
