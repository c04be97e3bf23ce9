"""Photon CT's inference library: load a CT, ask Photon, audit which visual tokens it kept.

    from photon_core import Predictor, load_volume
    p = Predictor()                                   # the embedded demo model (or Predictor("DIR"))
    p.set_volume(load_volume("scan.nii.gz"))
    a = p.ask("Is there a lesion in the liver?", budget="auto")

Subpackages: ``model`` (the architecture, ITS, checkpoints), ``io`` (loading, the official
preparation), ``inference`` (prompt, predictor, audit, CLI), ``train`` (the trainer and the
synthetic demo data), ``eval`` (the evaluator and its metrics). ``organs`` names the anatomy.
"""
__version__ = "0.2.0"

_API = {"Predictor": "photon_core.inference.predictor", "Answer": "photon_core.inference.predictor",
        "load_volume": "photon_core.io.volume", "Volume": "photon_core.io.volume",
        "Budget": "photon_core.model.budget", "load_model": "photon_core.model.checkpoint"}


def __getattr__(name):          # lazy: importing the package does not import torch
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(name)


__all__ = list(_API)
