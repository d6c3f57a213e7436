"""What `dpolab demo` writes: the reward-vs-KL frontier and its verdict, plots, tables and report.

Pure functions of the results dict built by ``dpolab.experiments.sentiment.run_demo`` (every number
in the report comes from it).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper-left frontier of (kl, reward) points: no other point has less KL and more reward."""
    best, out = float("-inf"), []
    for kl, reward in sorted(points):
        if reward > best:
            out.append((kl, reward))
            best = reward
    return out


def frontier_verdict(rows: list[dict]) -> dict:
    """Does DPO's frontier dominate PPO's? Counted as the share of each method's points that some
    point of the other method weakly dominates (no more KL, at least as much reward)."""
    pts = {m: [(r["kl"], r["reward"]) for r in rows if r["method"] == m] for m in ("DPO", "PPO")}

    def dominated_share(a: str, b: str) -> float:
        if not pts[a]:
            return 0.0
        hits = sum(any(kb <= ka + 1e-9 and rb >= ra - 1e-9 for kb, rb in pts[b]) for ka, ra in pts[a])
        return hits / len(pts[a])

    ppo_by_dpo, dpo_by_ppo = dominated_share("PPO", "DPO"), dominated_share("DPO", "PPO")
    if ppo_by_dpo >= 0.99 and dpo_by_ppo < 0.99:
        text = "DPO's frontier dominates PPO's at this scale: every PPO point is matched or beaten by a DPO point."
    elif dpo_by_ppo >= 0.99 and ppo_by_dpo < 0.99:
        text = "PPO's frontier dominates DPO's at this scale (the paper found the opposite)."
    else:
        text = (f"Neither frontier dominates at this scale: {ppo_by_dpo:.0%} of PPO's points are dominated by a "
                f"DPO point and {dpo_by_ppo:.0%} of DPO's by a PPO point.")
    best = {m: max((r for kl, r in pts[m]), default=float("nan")) for m in pts}
    return {"ppo_points_dominated_by_dpo": ppo_by_dpo, "dpo_points_dominated_by_ppo": dpo_by_ppo,
            "best_reward": best, "text": text}


def write_outputs(out: Path, results: dict, samples: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    # results.csv
    fields = ["method", "param", "value", "step", "reward", "reward_std", "kl", "response_length", "eos_fraction"]
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerow({"method": "base", "param": "", "value": "", "step": 0, **results["base"]})
        for r in rows:
            w.writerow(r)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float), encoding="utf-8")

    # frontier.png: reward vs KL, one series per method (paper Fig. 2 left)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method, color in (("DPO", "tab:orange"), ("PPO", "tab:blue")):
        pts = [(r["kl"], r["reward"]) for r in rows if r["method"] == method]
        if pts:
            ax.scatter(*zip(*pts), s=18, alpha=0.55, color=color, label=f"{method} checkpoints")
            ax.plot(*zip(*pareto(pts)), color=color, lw=2, label=f"{method} frontier")
    ax.scatter([0], [results["base"]["reward"]], color="black", marker="*", s=120, label="base model")
    ax.set_xlabel("sequence KL(π ‖ π_ref) (nats)")
    ax.set_ylabel("mean ground-truth reward")
    ax.set_title("Reward vs KL (controlled sentiment)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=130)
    plt.close(fig)

    # curves.png: reward and KL against training step, one line per run
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex="col")
    for col, method in enumerate(("DPO", "PPO")):
        for value in sorted({r["value"] for r in rows if r["method"] == method}):
            run = sorted((r for r in rows if r["method"] == method and r["value"] == value), key=lambda r: r["step"])
            steps = [0] + [r["step"] for r in run]
            label = f"{'β' if method == 'DPO' else 'KL coef'}={value:g}"
            axes[0, col].plot(steps, [results["base"]["reward"]] + [r["reward"] for r in run], marker="o", ms=3, label=label)
            axes[1, col].plot(steps, [0.0] + [r["kl"] for r in run], marker="o", ms=3, label=label)
        axes[0, col].set_title(f"{method}: held-out reward")
        axes[1, col].set_title(f"{method}: KL(π ‖ π_ref)")
        axes[1, col].set_xlabel("training step")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)

    # samples.md
    lines = ["# Sample completions", "", "Held-out prefixes; each completion with its ground-truth reward.", ""]
    for s in samples:
        lines.append(f"## {s['prompt']!r}")
        for name, value in s.items():
            if name != "prompt":
                text, reward = value
                lines.append(f"- **{name}** ({reward:+.3f}): {text!r}")
        lines.append("")
    (out / "samples.md").write_text("\n".join(lines), encoding="utf-8")
    (out / "report.md").write_text(render_report(results), encoding="utf-8")


def _final_rows(rows: list[dict]) -> list[dict]:
    last = {}
    for r in rows:
        key = (r["method"], r["value"])
        if key not in last or r["step"] > last[key]["step"]:
            last[key] = r
    return list(last.values())


def render_report(results: dict) -> str:
    cfg, base, bandit, verdict = results["config"], results["base"], results["bandit"], results["verdict"]
    cmd = results["command"]
    base_desc = cfg["model"] or (f"a Llama-style LM ({cfg['layers']} layers, hidden {cfg['hidden_size']}) pretrained "
                                 f"for {cfg['pretrain_steps']} steps on {cfg['corpus_size']} reviews from our grammar")
    lines = [
        "# Controlled sentiment generation: DPO vs PPO", "",
        "The DPO paper's experiment (Rafailov et al. 2023, §6.1, Fig. 2 left) at laptop scale: prompts are "
        "review prefixes, the ground-truth reward is the VADER sentiment of the completion, and each method "
        "is judged by mean reward against sequence-level KL(π‖π_ref) on held-out prefixes.", "",
        "## Result", "", verdict["text"], "",
        "![reward vs KL](frontier.png)", "",
        "| model | setting | mean reward | KL(π‖π_ref) |", "|---|---|---:|---:|",
        f"| base | — | {base['reward']:+.3f} | 0 |",
    ]
    for r in sorted(_final_rows(results["rows"]), key=lambda r: (r["method"], r["value"])):
        lines.append(f"| {r['method']} (final, step {r['step']}) | {r['param']}={r['value']:g} | "
                     f"{r['reward']:+.3f} | {r['kl']:.3f} |")
    rm = results["reward_model"]
    lines += [
        "", f"Best mean reward: DPO {verdict['best_reward']['DPO']:+.3f}, PPO {verdict['best_reward']['PPO']:+.3f}. "
        f"{verdict['ppo_points_dominated_by_dpo']:.0%} of PPO's checkpoints are weakly dominated by a DPO checkpoint "
        f"(no more KL, at least the reward); {verdict['dpo_points_dominated_by_ppo']:.0%} of DPO's by a PPO one.", "",
        "![learning curves](curves.png)", "",
        "## Setup", "",
        f"- Base model: {base_desc}.",
        f"- Preference pairs: {results['preferences']['pairs']} (best vs worst of {cfg['samples_per_prompt']} base-model "
        f"samples per prefix, {cfg['train_prompts']} prefixes; {results['preferences']['ties_skipped']} tied pairs skipped).",
        f"- Reward model for PPO: trained on the same pairs; held-out pairwise accuracy "
        f"{rm.get('eval/accuracy', float('nan')):.3f}.",
        f"- DPO: β ∈ {cfg['dpo_betas']}, {cfg['dpo_steps']} steps each; PPO: KL coefficient ∈ {cfg['ppo_kl_coefs']}, "
        f"{cfg['ppo_steps']} steps each; {cfg['eval_prompts']} held-out prefixes, completions up to "
        f"{cfg['max_new_tokens']} tokens, temperature 1.",
        "", "## The theory check (finite responses)", "",
        f"On a bandit with 3 prompts × 5 responses and β = {bandit['beta']}, the optimum of "
        "max_π E[r] − β·KL(π‖π_ref) is π* = π_ref·exp(r/β)/Z. Starting from π_ref "
        f"(KL(π*‖π_ref) = {bandit['kl_star_ref']:.4f}), DPO on Bradley-Terry preferences reaches "
        f"KL(π*‖π) = {bandit['kl_star_dpo']:.4f} and PPO with the KL-penalised reward reaches "
        f"{bandit['kl_star_ppo']:.4f}.", "",
        "## Files", "",
        "- `frontier.png`, `curves.png`: the plots above; `results.csv`, `results.json`: every number here;",
        "- `samples.md`: completions of the base, DPO and PPO models on held-out prefixes;",
        "- `work/`: the base model, preference pairs, and every run directory (config, metrics, checkpoints).", "",
        "## Reproduce", "", "```bash", cmd, "```",
        "", f"Stage times (s): {results['timings_seconds']}.", "",
    ]
    return "\n".join(lines)


def print_table(results: dict) -> None:
    print("\nmethod  setting         reward      KL", file=sys.stderr)
    print(f"base    -              {results['base']['reward']:+.3f}   0.000", file=sys.stderr)
    for r in sorted(_final_rows(results["rows"]), key=lambda r: (r["method"], r["value"])):
        print(f"{r['method']:<7} {r['param']}={r['value']:<8g} {r['reward']:+.3f}  {r['kl']:6.3f}", file=sys.stderr)
    print(f"\n{results['verdict']['text']}", file=sys.stderr)
