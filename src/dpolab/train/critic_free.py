"""What the critic-free policy-gradient trainers share (GRPO, RLOO): each step samples
``--num-generations`` completions of each prompt (:mod:`dpolab.train.rollouts`), scores them, turns
the group's scores into advantages (the algorithm's own), then runs ``--num-iterations`` passes of
``--mini-batches`` optimizer steps over per-token policy-gradient losses (the algorithm's own),
each step exact over its micro-batches and processes (:class:`dpolab.train.engine.Engine`).

The old log-probs of the ratio are those of the sampling policy: computed by a forward without
gradient when there is more than one optimizer step per batch, else the current ones detached (the
ratio is then exactly 1). A reward shaped by them (RLOO's KL) then takes them from the in-process
sampler, which computed them while drawing. Dropout is off throughout (eval mode), as in LM PPO.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dpolab.train.on_policy import OnPolicy

if TYPE_CHECKING:
    import torch


class CriticFree(OnPolicy):
    bar_keys = ("rewards/mean", "kl")
    summary_keys = ("steps", "eval/reward", "eval/kl", "rewards/mean", "kl", "wall_seconds")

    @classmethod
    def uses_reference_for(cls, cfg) -> bool:
        """Whether the step needs π_ref's log-probs of the completions (a KL term, β > 0)."""
        return cfg.beta > 0

    def __init__(self, cfg, engine, *args):
        super().__init__(cfg, engine, *args)
        self.uses_reference = self.uses_reference_for(cfg)
        self.shared = resolve_shared_prompts(cfg, engine, self.prompts)

    # -- what each algorithm defines ---------------------------------------------------------------
    def advantages(self, s, old: torch.Tensor | None, ref: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """(n,) advantages of the step's completions and extra metrics."""
        raise NotImplementedError

    def token_loss(self, logp, old, ref, adv) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-token losses (B, R) and per-token stats, for completions with advantages ``adv`` (B,)."""
        raise NotImplementedError

    def weights(self, mask: torch.Tensor, counted: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Per-token weights (B, R) of the loss tokens ``mask`` and loss units: the loss is Σ w·ℓ over the
        step's units. ``counted`` (B,): the rows that are completions (a masked truncated one counts,
        with no loss; a filler row of padding does not)."""
        raise NotImplementedError

    # -- the shared step ---------------------------------------------------------------------------
    def step(self, engine, group):
        import torch

        from dpolab.lm.token_rewards import shape_scores
        from dpolab.train import distributed
        from dpolab.train.engine import combine_steps
        from dpolab.train.on_policy import step_seed
        from dpolab.train.rollouts import (
            minibatch_rows,
            reference_token_logps,
            reward_metrics,
            rollout_token_logps,
            row_passes,
            sample_step,
        )

        cfg = self.cfg
        ((k, idx),) = group
        seed = step_seed(cfg.seed, engine.step)
        several = cfg.num_iterations > 1 or cfg.mini_batches > 1
        # with one optimizer step the sampling forward's log-probs are the old policy's (the ratio
        # is 1 by construction), so a reward that needs them takes them from the sampler if it has them
        # (not under mixed precision: the sampler decodes in float32, the training forward autocasts)
        needs_old = self.needs_old_logps(cfg)
        scored_logps = needs_old and not several and engine.accelerator.mixed_precision == "no"
        s = sample_step(engine, cfg, self.prompts, idx, cfg.num_generations, self.rewards, self.sampler, seed=seed,
                        micro=k, with_logps=scored_logps, dtype=torch.float64)  # baselines: float64
        s.scores = shape_scores(s.scores, s.gen.finished, missing_eos_penalty=cfg.missing_eos_penalty)
        old = rollout_token_logps(engine.model, s.gen, cfg.temperature, cfg.micro_batch_size, shared=self.shared)[0] \
            if several or (needs_old and (not scored_logps or s.gen.logps is None)) else None
        ref = reference_token_logps(engine.unwrapped, self.ref_model, s.gen, cfg.temperature, cfg.micro_batch_size,
                                    shared=self.shared, accelerator=engine.accelerator) if self.uses_reference else None
        adv, metrics = self.advantages(s, s.gen.logps if old is None else old, ref)
        mask, counted = loss_masks(s.gen.response_mask, s.gen.finished, cfg.mask_truncated_completions)
        outs = []
        for it in range(cfg.num_iterations):
            for m, rows in enumerate(minibatch_rows(s, cfg.mini_batches, seed + 1 + it)):
                where = f"iteration {it + 1}, mini-batch {m + 1}"
                passes = row_passes(engine, rows, cfg.micro_batch_size,
                                    lambda r: self.weights(mask[r], counted[r])[1], where, width=s.gen.width, budget=self.pass_tokens,
                                    prompt_of=s.rows if self.shared else None, prompt_width=s.gen.prompt_length)
                out = engine.optimizer_step(passes, lambda r: self.loss(s, r, old, ref, adv, mask, counted),
                                            where=where)
                outs.append((out, dict(engine.stat_counts))) if out is not None else None
        self.sampler.sync_weights(engine.unwrapped)
        generated = distributed.global_sum(engine.accelerator, [float(s.gen.response_mask.sum()) * s.real])[0]
        engine.tokens_window += int(generated)
        self.samples = [{"prompt": p, "completion": c, "score": float(v)}
                        for p, c, v in zip(s.prompts, s.completions, s.scores)] if s.real else []
        return {**reward_metrics(engine.accelerator, s), **metrics, **combine_steps(outs)}

    def loss(self, s, rows, old, ref, adv, mask, counted):
        from dpolab.train.rollouts import response_logps

        g = s.gen.select(rows)
        logp, entropy = response_logps(self.engine.model, g, self.cfg.temperature, with_entropy=True,
                                       shared=self.shared)
        per_token, st = self.token_loss(logp, old[rows] if old is not None else logp.detach(),
                                        ref[rows] if ref is not None else None, adv[rows])
        m = mask[rows]
        w, _ = self.weights(m, counted[rows])
        count = float(m.sum())  # per-token means over the step: (sum, count) pairs for the engine
        stats = {k: (float((v.detach() * m).sum()), count) for k, v in {**st, "entropy": entropy}.items()}
        return (w * per_token).sum(), stats

    @classmethod
    def needs_old_logps(cls, cfg) -> bool:
        """Whether :meth:`advantages` needs the sampling policy's log-probs (RLOO's KL-shaped reward)."""
        return False

    def summary(self, engine):
        return {**super().summary(engine), "prefix_sharing": self.shared}


def loss_masks(response_mask: torch.Tensor, finished: torch.Tensor,
               mask_truncated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, counted)``: the (B, T) tokens that enter the loss, and the (B,) completions that count
    in the number N of a group's completions. ``mask_truncated`` leaves a completion without EOS out
    of the mask, but it stays counted (its loss is 0, as for Dr. GRPO's constant and the sequence
    mean: docs/grpo.md)."""
    counted = response_mask.any(1)
    return (response_mask & finished[:, None] if mask_truncated else response_mask), counted


def resolve_shared_prompts(cfg, engine, prompts) -> bool:
    """``--prefix-sharing`` on/off as given, or (unset) on when
    :func:`dpolab.lm.shared_prompt.check_shared_prompts` finds the policy exact that way; off with
    ``--gradient-checkpointing`` (a recomputed layer would write the prompt's cache again). Given
    explicitly and not possible: an error."""
    from dpolab.errors import ConfigError
    from dpolab.lm.shared_prompt import check_shared_prompts
    from dpolab.train.pair_layout import prefix_sharing_verdict

    if cfg.prefix_sharing is False:
        return False
    if cfg.gradient_checkpointing:
        if cfg.prefix_sharing:
            raise ConfigError("--prefix-sharing cannot run with --gradient-checkpointing (a checkpointed layer "
                              "would write the prompt's key/value cache twice): drop one of them")
        return False
    policy = engine.unwrapped
    problem = check_shared_prompts(policy, prompts.ids, policy.get_input_embeddings().num_embeddings,
                                   device=engine.device)
    return prefix_sharing_verdict(cfg.prefix_sharing, problem, engine.accelerator)


def train_critic_free(cfg, algo_cls) -> dict:
    """The opening GRPO and RLOO share (:func:`dpolab.train.on_policy.open_run`), the policy (LoRA as
    configured), the reference where needed, the engine and its plan; then the run."""
    from dpolab.config import check_config
    from dpolab.lm.loading import load_trainable_lm
    from dpolab.train import on_policy
    from dpolab.train.engine import Engine

    cfg = check_config(cfg)  # a config built in Python: converted and checked as the command line's
    opened = on_policy.open_run(cfg, algo_cls.name)
    if isinstance(opened, dict):
        return opened
    accelerator, tokenizer, prompts, eval_set, rewards, report = opened
    needs_ref = algo_cls.uses_reference_for(cfg) or eval_set is not None
    ref_model = on_policy.reference_model(cfg, accelerator, tokenizer) if needs_ref else None
    engine = Engine(cfg, accelerator, load_trainable_lm(cfg), tokenizer=tokenizer, report=report)
    engine.plan(on_policy.prompt_order(cfg, prompts, accelerator, cfg.prompts_per_step),
                optimizer_steps_per_step=cfg.num_iterations * cfg.mini_batches)
    return engine.run(algo_cls(cfg, engine, prompts, eval_set, rewards, ref_model))
