"""Evaluation: the evaluator, its metrics, external VQA sets."""
