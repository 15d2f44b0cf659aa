"""Integrations with the Hugging Face training stack (Trainer, TRL)."""

from .trainer import SpectralTrainer, SpectralTrainerMixin

__all__ = ["SpectralTrainer", "SpectralTrainerMixin"]
