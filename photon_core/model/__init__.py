"""The model: configuration, vision tower, M-RoPE decoder, ITS, surrogate gather, checkpoints."""
from photon_core import vml as _vml

_vml.warm_up()   # before any parallel CPU math: see photon_core.vml (a oneMKL first-call race)
