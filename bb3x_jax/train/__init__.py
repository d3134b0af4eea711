"""Training's library: the explicit train state and jitted step (``step``),
checkpoints (``checkpoint``), metric logs (``metrics_log``), a run's parts built
from its config (``runtime``) and its data (``inputs``)."""
