"""The eval metrics by name: which exist, which way is better, and a named eval set's key for each.

One place for what `train.best_metric` may name (config/checks.py), what the best checkpoint follows
(training/loop.py) and how `dstrain inspect` shows it (checkpoint/report.py).
"""

from __future__ import annotations

import re

# What an eval logs for the whole eval data; with named eval sets also each set's own, as
# `<metric>/<set name>` (eval_loss/rag). Any of them may be train.best_metric.
EVAL_METRICS = ("eval_loss", "eval_pref_acc", "eval_reward_margin", "eval_exact_match", "eval_token_f1")
# Metrics where higher is better (the rest: lower is better); a set's metric goes the way of its metric.
HIGHER_IS_BETTER = ("eval_pref_acc", "eval_reward_margin", "eval_exact_match", "eval_token_f1")
# A set's name becomes part of metric keys, TensorBoard tags and W&B keys: no '/', no spaces.
EVAL_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def set_metric(metric: str, set_name: str) -> str:
    """The key of `metric` for one eval set: `eval_loss/rag`; the unnamed set ("") keeps `metric` itself."""
    return f"{metric}/{set_name}" if set_name else metric


def higher_is_better(metric: str) -> bool:
    """Whether a bigger `metric` is better: `eval_pref_acc` and `eval_pref_acc/rag` are, `eval_loss` is not."""
    return metric.partition("/")[0] in HIGHER_IS_BETTER
