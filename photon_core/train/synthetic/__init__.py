"""Synthetic demo data: real anatomy from the sample cases, findings with exact ground truth."""
