"""What every training command leaves behind and how it stops and resumes: the run directory
(``rundir``), checkpoints (``checkpoint``), signals (``signals``), seeding (``seeding``) and the
non-finite guard (``guards``). Shared by ``dpolab.train`` and ``dpolab.rl``."""
