"""transformers ``Trainer`` (and TRL's trainers) with a spectral adapter: checkpoints in the adapter layout.

``SpectralTrainer`` is ``Trainer`` plus :class:`SpectralTrainerMixin`; for TRL, mix it in first:
``class SpectralSFTTrainer(SpectralTrainerMixin, SFTTrainer)``. The mixin

- saves (``save_steps``, ``save_model()``) the adapter alone, ``adapter_config.json`` + ``adapter_model.safetensors``
  as :meth:`SpectralPeftModel.save_pretrained` writes them (never the LM's weights, so tied embeddings are no
  problem), plus the tokenizer; :func:`spectral_peft.load_adapter` reads every checkpoint;
- resumes (``train(resume_from_checkpoint=...)``) by loading those tensors back into the wrapped model; the Trainer
  restores optimiser, scheduler, RNG and data position itself, so on the CPU a resumed run ends bit-identical to an
  uninterrupted one;
- adds :class:`~spectral_peft.training.hooks.BudgetCallback` (HiP-LoRA's projection after each optimiser step, budget
  use in the logs) unless one is given.

Column handling and ``eval_loss`` need nothing: the wrapped model's ``forward`` has the LM's signature. HiP-LoRA's
penalty needs nothing either: it is attached to the layers (:mod:`spectral_peft.budget`).
Other models are handled as the base trainer does.
"""

from __future__ import annotations

import os

from transformers import Trainer

from ..model import ADAPTER_WEIGHTS, SpectralPeftModel
from ..training.hooks import BudgetCallback, unwrap_spectral


class SpectralTrainerMixin:
    """Checkpoint and resume hooks of a ``Trainer`` subclass for :class:`SpectralPeftModel` (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not any(isinstance(cb, BudgetCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(BudgetCallback())

    def _spectral(self, model=None) -> SpectralPeftModel | None:
        return unwrap_spectral(model if model is not None else self.model)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        wrapped = self._spectral()
        if wrapped is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        wrapped.save_pretrained(output_dir, is_main_process=self.args.should_save)  # every rank gathers (FSDP2)
        if self.args.should_save and self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        wrapped = self._spectral(model)
        if wrapped is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        wrapped.load_adapter_weights(resume_from_checkpoint, is_trainable=True)
        return None

    def _load_best_model(self) -> None:
        wrapped = self._spectral()
        best = self.state.best_model_checkpoint
        if wrapped is None or best is None or not os.path.isfile(os.path.join(best, ADAPTER_WEIGHTS)):
            return super()._load_best_model()
        wrapped.load_adapter_weights(best, is_trainable=True)
        return None


class SpectralTrainer(SpectralTrainerMixin, Trainer):
    """``transformers.Trainer`` for spectral adapters (see :class:`SpectralTrainerMixin`)."""
