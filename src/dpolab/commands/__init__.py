"""Commands that use models rather than train them: ``dpolab generate`` (completions for prompts, as
JSONL) and ``dpolab eval`` (reward, KL to a reference and win rates of several models, with a plot).
Each module exposes ``cli_main(argv, prog) -> int`` for the dispatcher in ``dpolab.cli``."""
