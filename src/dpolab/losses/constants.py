"""Names and defaults the trainers' options need, free of torch so a trainer's ``--help`` loads fast:
the GRPO advantage scalings and loss aggregations (:mod:`dpolab.losses.grpo`) and KTO's defaults
(:mod:`dpolab.losses.kto`, Ethayarajh et al. 2024, arXiv 2402.01306)."""

ADVANTAGE_SCALES = ("group", "batch", "none")
AGGREGATIONS = ("sequence", "token", "constant")

KTO_BETA = 0.1
KTO_DESIRABLE_WEIGHT = 1.0
KTO_UNDESIRABLE_WEIGHT = 1.0
KTO_WEIGHT_RATIO_RANGE = (1.0, 4.0 / 3.0)  # recommended λ_D·n_D / (λ_U·n_U)
