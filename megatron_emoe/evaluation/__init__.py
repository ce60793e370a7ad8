"""Evaluating elastic MoE checkpoints: loss at inference budgets, allocation search, lm-eval."""
