# One-command entry points. `make test` and `make demo` create or refresh .venv first.
# Override the torch pin (e.g. a CUDA build) with: make test TORCH_SPEC='torch==2.5.1'
# The other packages come at the versions in constraints-dev.txt; without them: make setup CONSTRAINTS=
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
CONSTRAINTS ?= constraints-dev.txt
DEMO_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-slow demo lint bench bench-quick bench-ppo bench-grpo clean

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	touch $(STAMP)

# Refresh constraints-dev.txt with the newest releases pyproject.toml allows (then run `make test`).
.PHONY: lock
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	.venv-lock/bin/python -m pip install --quiet -e ".[dev]"
	{ sed -n '/^#/p' constraints-dev.txt; .venv-lock/bin/python -m pip freeze --exclude-editable \
	  | grep -viE '^(torch|sympy|mpmath)=='; } > constraints-dev.txt.new
	mv constraints-dev.txt.new constraints-dev.txt && rm -rf .venv-lock

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m ruff check src tests bench
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

demo: $(STAMP)
	$(BIN)/dpolab demo $(DEMO_ARGS)

# Benchmarks (bench/README.md) run in .venv-bench (TRL, SB3); .venv has TRL only for bench/gpu.sh's dry run.
.venv-bench/.installed: pyproject.toml
	test -x .venv-bench/bin/python || $(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	.venv-bench/bin/python -m pip install --quiet -e . trl==1.16.0 stable-baselines3 transformers==5.24.0 accelerate==1.15.0 peft==0.21.2 datasets
	touch .venv-bench/.installed

bench: .venv-bench/.installed
	.venv-bench/bin/python bench/dpo_vs_trl.py --repeats 3 --json bench/dpo_vs_trl_results.json

bench-quick: .venv-bench/.installed
	.venv-bench/bin/python bench/dpo_vs_trl.py --quick

bench-ppo: .venv-bench/.installed
	.venv-bench/bin/python bench/ppo_vs_sb3.py

# GRPO and RLOO against TRL's GRPOTrainer/RLOOTrainer (defaults, and without checkpointing)
bench-grpo: .venv-bench/.installed
	.venv-bench/bin/python bench/grpo_rloo_vs_trl.py --threads 1 --repeats 3 --trl-best --ours-gc --json bench/grpo_rloo_vs_trl_results.json

# SFT and reward model against TRL's SFTTrainer/RewardTrainer; DPO at 32k/152k vocabularies on HH-RLHF
.PHONY: bench-sft-rm bench-vocab
bench-sft-rm: .venv-bench/.installed
	.venv-bench/bin/python bench/sft_rm_vs_trl.py --threads 1 --json bench/sft_rm_vs_trl_results.json

bench-vocab: .venv-bench/.installed
	.venv-bench/bin/python bench/dpo_vocab.py --threads 1 --json bench/dpo_vocab_results.json

# KTO against TRL's KTOTrainer
.PHONY: bench-kto
bench-kto: .venv-bench/.installed
	.venv-bench/bin/python bench/kto_vs_trl.py --threads 1 --json bench/kto_vs_trl_results.json

# online DPO against TRL's experimental OnlineDPOTrainer
.PHONY: bench-online-dpo
bench-online-dpo: .venv-bench/.installed
	.venv-bench/bin/python bench/online_dpo_vs_trl.py --threads 1 --json bench/online_dpo_vs_trl_results.json

.PHONY: bench-generation
# bench/gpu.sh: SFT, DPO and FSDP on a machine with one GPU (its --dry-run runs anywhere, in the test suite)
.PHONY: bench-gpu
bench-gpu: .venv-bench/.installed
	bash bench/gpu.sh

bench-generation: .venv-bench/.installed
	.venv-bench/bin/python bench/generation_vs_hf.py --threads 1 --json bench/generation_vs_hf_results.json

# docs/cli.md: every command's --help (tests/test_cli_reference.py checks it is current)
.PHONY: docs
docs: $(STAMP)
	$(BIN)/python -m dpolab.commands.reference > docs/cli.md

lint: $(STAMP)
	$(BIN)/python -m ruff check src tests bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
