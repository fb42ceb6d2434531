"""Evaluators for scored merges and greedy soups: held-out LM scoring and HTTP callbacks."""
