"""Evaluation: the held-out loss and preference accuracy (`loss`), greedy generation scored by exact match and
token F1 (`generation`), and the precomputed reference log-probs of preference objectives (`reference`)."""
