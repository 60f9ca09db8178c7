"""Geometric / Riemannian optimizers for LoRA factor pairs, and the name -> builder registry."""
