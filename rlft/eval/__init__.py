"""Evaluation of trained policies: metrics for comparing base, SFT, DPO and RL models.

`rlft.eval.metrics` holds the pure numpy metrics (win rate, distinct-n, perplexity, sequence KL,
summary statistics) that the evaluation report tabulates for each policy (DESIGN.md §7).
"""
