"""Online DPO (Guo et al. 2024, arXiv 2402.04792) on the shared engine (docs/online-dpo.md).

Each step samples ``--num-samples`` completions of each prompt from the current policy (PPO's
sampling: :mod:`dpolab.train.rollouts`), ranks them with the reward (a reward model or a Python
function), pairs the best with the worst, and takes one optimizer step of any loss of the DPO family
(:func:`dpolab.train.pair_layout.pair_losses`) against the reference, each pair one prefix-shared row
when exact (DPO's layout). Pairs whose two scores tie carry no preference: they are skipped and
counted. With ``--label bradley_terry`` the preference is drawn from σ(r_w − r_l) instead of ranked;
on a bandit, the population minimiser of the DPO loss is then π* = π_ref·exp(r/β)/Z for any sampling
policy with full support (tests/test_online_theory.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from dpolab.config import opt
from dpolab.errors import ConfigError
from dpolab.train.command import cli
from dpolab.train.on_policy import OnPolicy
from dpolab.train.options import OnPolicyOptions, PreferenceLossOptions, require_positive, validate_on_policy

DESCRIPTION = """Online DPO: the DPO family's losses on pairs sampled from the current policy and ranked by a reward.

Prompts, rewards (--reward module:function, --reward-model DIR, several with --reward-weights) and
sampling options as for `dpolab grpo`; the loss options as for `dpolab dpo` (--loss, --beta, ...).

example:
  dpolab online-dpo --model runs/sft/final --reward-model runs/rm/final --data prompts.jsonl \\
      --beta 0.1 --output-dir runs/online-dpo
"""

# The losses of the DPO family that need only the pair (tests check it against the registry): the
# others carry state across a fixed data set (bco_pair's running shift) or whole batches (aot).
# Listed here, not read from the registry, so that --help imports no torch.
ONLINE_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "cpo", "exo_pair", "nca_pair", "sppo_hard",
                 "apo_zero", "apo_down", "discopop", "ipo_sum", "sigmoid_norm", "ref_free")


@dataclass
class OnlineDPOConfig(OnPolicyOptions, PreferenceLossOptions):
    model: str = opt("", "policy to train (and default reference): a Hugging Face name or local folder (required)")
    ref_model: str | None = opt(None, "reference model (default: a frozen copy of --model; with --lora, the base "
                                "with adapters off)")
    output_dir: str = opt("runs/online-dpo", "run directory")
    prompts_per_step: int = opt(8, "prompts per step, per process")
    num_samples: int = opt(2, "completions sampled per prompt; the best and the worst under the reward make the pair")
    label: str = opt("rank", "which completion of a pair is preferred: the higher reward (rank), or a draw with "
                     "probability σ(r_w − r_l) (bradley_terry)", choices=("rank", "bradley_terry"))
    micro_batch_size: int = opt(8, "pairs per forward/backward pass (same gradient, less memory)")
    prefix_sharing: bool | None = opt(None, "run each sampled pair as one row [prompt|chosen|rejected] with a 4D mask "
                                      "in the training and reference passes, the prompt computed once; unset: on "
                                      "when a check at the start shows the model gives the same log-probs that way")
    learning_rate: float = opt(5e-7, "peak learning rate")
    loss: str = opt("sigmoid", f"preference loss (docs/dpo.md): {', '.join(ONLINE_LOSSES)} (sigmoid = DPO), or a "
                    "comma-separated combination 'a,b' summed with --loss-weights")
    temperature: float = opt(1.0, "sampling temperature of the completions (and of eval/kl's log-probs); the loss "
                             "(and --wpo's weights) uses the model's untempered log-probs, as `dpolab dpo` does")

    def validate(self) -> None:
        from dpolab.train.options import check_loss_options

        validate_on_policy(self)
        require_positive(self, "prompts_per_step", "micro_batch_size")
        if self.num_samples < 2:
            raise ConfigError("--num-samples must be >= 2: a preference pair needs two completions of a prompt")
        check_loss_options(self)
        for name in self.losses:
            if name not in ONLINE_LOSSES:  # as --help lists them: bco_pair, aot and aot_unpaired are not
                raise ConfigError(f"--loss {name} needs state across a fixed data set (a running shift, or whole "
                                  "batches); use it with `dpolab dpo`")


class OnlineDPO(OnPolicy):
    name = "online-dpo"
    bar_keys = ("loss", "rewards/mean")
    summary_keys = ("steps", "eval/reward", "eval/kl", "loss", "rewards/mean", "wall_seconds")

    def __init__(self, cfg: OnlineDPOConfig, engine, *args):
        from dpolab.train.reference import Reference

        super().__init__(cfg, engine, *args)
        self.reference = Reference(model=self.ref_model, policy=engine.model, accelerator=engine.accelerator)
        self.prefix = self.resolve_prefix_sharing(engine)
        self.pairs_total = 0  # over the run (checkpointed): none at the end means nothing was trained

    def resolve_prefix_sharing(self, engine) -> bool:
        """DPO's check of the prefix-shared layout (:func:`dpolab.train.pair_layout.resolve_prefix_sharing`),
        on the first two prompts with seeded random completions of two lengths (nothing is sampled yet)."""
        import torch

        from dpolab.data.preference import TokenizedPair
        from dpolab.train.pair_layout import resolve_prefix_sharing

        if self.cfg.prefix_sharing is False:
            return False
        vocab = engine.unwrapped.get_input_embeddings().num_embeddings
        g = torch.Generator().manual_seed(0)
        pairs = [TokenizedPair(list(p), torch.randint(0, vocab, (3,), generator=g).tolist(),
                               torch.randint(0, vocab, (5,), generator=g).tolist(), i, False)
                 for i, p in enumerate([p for p in self.prompts.ids if len(p)][:2])]
        return resolve_prefix_sharing(self.cfg, engine.model, pairs, engine.tokenizer.pad_token_id, engine.accelerator)

    def make_pairs(self, s, seed: int) -> tuple[list, int]:
        """This process's pairs (best, worst) per prompt, and the count of ties skipped."""
        import torch

        from dpolab.data.preference import TokenizedPair
        from dpolab.lm.sampling import row_seeds

        k, gen, pairs, ties = s.k, s.gen, [], 0
        for p in range(s.n // k):
            scores = s.scores[p * k:(p + 1) * k]
            hi, lo = p * k + int(scores.argmax()), p * k + int(scores.argmin())
            if scores[hi - p * k] == scores[lo - p * k]:
                ties += 1
                continue
            if self.cfg.label == "bradley_terry":  # the worse one wins with probability σ(r_lo − r_hi)
                u = torch.rand(1, generator=torch.Generator().manual_seed(row_seeds(seed, [s.rows[p * k]])[0]))
                if float(u) < float(torch.sigmoid(s.scores[lo] - s.scores[hi])):
                    hi, lo = lo, hi
            ids = [gen.response_ids[i][gen.response_mask[i]].tolist() for i in (hi, lo)]
            pairs.append(TokenizedPair(list(self.prompts.ids[s.rows[hi]]), ids[0], ids[1], len(pairs),
                                       not bool(gen.finished[hi] and gen.finished[lo])))
        return pairs, ties

    def step(self, engine, group):
        import torch

        from dpolab.data.preference import TokenizedPair
        from dpolab.train import distributed
        from dpolab.train.on_policy import step_seed
        from dpolab.train.pair_layout import collate_pairs, pair_losses
        from dpolab.train.rollouts import reward_metrics, row_passes, sample_step

        cfg, ((k, idx),) = self.cfg, group
        seed = step_seed(cfg.seed, engine.step)
        s = sample_step(engine, cfg, self.prompts, idx, cfg.num_samples, self.rewards, self.sampler, seed=seed,
                        micro=k, dtype=torch.float64)  # ties are equal scores, not equal float32 roundings
        pairs, ties = self.make_pairs(s, seed + 1) if s.real else ([], 0)
        stand_in = [TokenizedPair(list(self.prompts.ids[s.rows[0]]), [s.gen.response_ids[0, 0].item()],
                                  [s.gen.response_ids[0, 0].item()], 0, False)]
        pad = engine.tokenizer.pad_token_id

        def loss(rows):
            batch = collate_pairs(self.prefix, [(pairs or stand_in)[i] for i in rows.tolist()], pad).to(engine.device)
            losses, stats = pair_losses(cfg, engine.model, batch, self.reference.pair_logps(batch, "train"))
            return losses.sum(), stats

        # a pair is one row of at most the prompt and two responses, or two rows of the sampled width
        R = s.gen.response_ids.shape[1]
        passes = row_passes(engine, list(range(len(pairs))), cfg.micro_batch_size, len, "pairs",
                            width=s.gen.width + R if self.prefix else 2 * s.gen.width, budget=self.pass_tokens)
        out = engine.optimizer_step(passes, loss, where=f"step {engine.step + 1}")
        self.sampler.sync_weights(self.policy)
        n_pairs, n_ties, tokens = distributed.global_sum(engine.accelerator, [len(pairs), ties, float(
            s.gen.response_mask.sum()) * s.real])
        engine.tokens_window += int(tokens)
        self.pairs_total += int(n_pairs)
        self.samples = [{"prompt": p, "completion": c, "score": float(v)}
                        for p, c, v in zip(s.prompts, s.completions, s.scores)] if s.real else []
        return {**(out or {}), **reward_metrics(engine.accelerator, s),
                "pairs/ties": n_ties / max(n_pairs + n_ties, 1), "pairs/count": n_pairs}

    def state_dict(self):
        return {"pairs_total": self.pairs_total}

    def load_state_dict(self, state):
        self.pairs_total = int(state.get("pairs_total", 0))

    def summary(self, engine):
        if self.pairs_total == 0 and engine.step > 0 and engine.is_main:
            import sys

            print(f"warning: no step had a pair to train on (in each of the {engine.step} steps every prompt's "
                  "completions scored the same): the model was not trained; a reward that tells completions "
                  "apart, or more --num-samples or a higher --temperature, gives pairs", file=sys.stderr)
        return {**super().summary(engine), "prefix_sharing": self.prefix, "pairs/total": self.pairs_total}


def train(cfg: OnlineDPOConfig) -> dict:
    """Run online DPO as configured; returns the summary (also written to OUTPUT_DIR/summary.json)."""
    from dpolab.config import check_config
    from dpolab.lm.loading import load_trainable_lm
    from dpolab.train import on_policy
    from dpolab.train.engine import Engine

    cfg = check_config(cfg)  # a config built in Python: converted and checked as the command line's
    opened = on_policy.open_run(cfg, "online-dpo")
    if isinstance(opened, dict):
        return opened
    accelerator, tokenizer, prompts, eval_set, rewards, report = opened
    ref_model = on_policy.reference_model(cfg, accelerator, tokenizer)
    engine = Engine(cfg, accelerator, load_trainable_lm(cfg), tokenizer=tokenizer, report=report)
    engine.plan(on_policy.prompt_order(cfg, prompts, accelerator, cfg.prompts_per_step))
    return engine.run(OnlineDPO(cfg, engine, prompts, eval_set, rewards, ref_model))


def cli_main(argv: list[str], prog: str) -> int:
    return cli(OnlineDPOConfig, train, argv, prog, DESCRIPTION)
