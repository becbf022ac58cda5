"""Evaluation: the held-out loss and preference accuracy (`loss`), greedy generation scored by exact match and
token F1 (`generation`), the precomputed reference log-probs of preference objectives (`reference`), and
`dstrain eval` on a finished checkpoint or export (`source`: what PATH is and its model; `command`)."""
