"""Training language models: one engine (``engine``) runs every trainer; each algorithm is one short
file (``sft``, ``rm``, ``dpo``, ``kto``, ``ppo``, ``grpo``, ``rloo``, ``online_dpo``) of only what is its own.
docs/architecture.md maps the package."""
