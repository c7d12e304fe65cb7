"""Traindeck: a queued LoRA/LyCORIS trainer for Stable Diffusion (A1111, Forge, standalone, CLI)."""
__version__ = "0.1.0"
