"""Training: the three-phase Photon trainer and the synthetic demo data (``synthetic``)."""
