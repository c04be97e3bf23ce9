"""The model: configuration, vision tower, M-RoPE decoder, ITS, surrogate gather, checkpoints."""
