from orbit_core.eval.evaluate import EvalReport, evaluate
from orbit_core.eval.passk import pass_at_k
from orbit_core.eval.run import config_from_adapter, run_eval

__all__ = ["EvalReport", "evaluate", "pass_at_k", "config_from_adapter", "run_eval"]
