"""Asking: the prompt, the Predictor, the retention audit and the command line."""
