"""lm-evaluation-harness on a base model plus an adapter folder: lm-eval's model ``spectral-peft``.

:class:`SpectralLM` is lm-eval's ``HFLM`` (every argument of lm-eval's ``hf`` model works: ``dtype``, ``device``,
``batch_size``, ...) whose model is the base ``pretrained`` with the adapter in ``adapter`` loaded by
:func:`spectral_peft.model.load_adapter`: a native spectral-peft folder (written by
``SpectralPeftModel.save_pretrained``; its singular vectors are recomputed from the base, or read from
``svd_cache``, and the base's weights must match the content hashes the folder records) or a PEFT folder (e.g. an
:func:`spectral_peft.export.export_lora` export). The adapter is not merged: lm-eval scores the wrapped model, as the
library runs it. Bad input fails with one line before any evaluation: a missing folder before the base is loaded, a
folder made on another base (``hash mismatch``) as soon as the base's weights are read.

lm-eval finds a model by its registered name, and only in modules imported in its process (0.4.x reads no plugin
entry points), so the command line is this module, which registers ``spectral-peft`` and then runs lm-eval's own
command line with the arguments given (a :class:`~spectral_peft.errors.SpectralPeftError` prints ``error: ...`` on
one line and exits with status 2)::

    python -m spectral_peft.integrations.lm_eval --model spectral-peft \\
        --model_args pretrained=BASE,adapter=DIR --tasks TASKS

From Python::

    from lm_eval import simple_evaluate
    from spectral_peft.integrations.lm_eval import SpectralLM
    simple_evaluate(model=SpectralLM(pretrained=BASE, adapter=DIR), tasks=[...])

Importing this module needs lm-eval (``pip install 'spectral-peft[lm-eval]'``); ``import spectral_peft`` does not.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from torch import nn

from ..errors import InputError, SpectralPeftError
from ..model import load_adapter, read_adapter_config

MODEL_NAME = "spectral-peft"


@register_model(MODEL_NAME)
class SpectralLM(HFLM):
    """lm-eval's ``HFLM`` on ``pretrained`` (a model name or folder, or a loaded model) with the adapter in folder
    ``adapter`` loaded onto it. ``svd_cache``: a folder for the SVD cache of native adapters (``None``: SVDs in
    memory only). The other keywords are ``HFLM``'s, except ``peft`` and ``delta``, which would apply a second
    update and are refused."""

    def __init__(self, pretrained: str | nn.Module, adapter: str | Path | None = None,
                 svd_cache: str | Path | None = None, **kwargs: Any) -> None:
        if adapter is None:
            raise InputError(f"lm-eval model {MODEL_NAME!r} needs adapter=DIR (a spectral-peft or PEFT adapter "
                             "folder); for the base model alone use --model hf")
        for key in ("peft", "delta"):
            if kwargs.get(key):
                raise InputError(f"lm-eval model {MODEL_NAME!r} takes the adapter as adapter=DIR, not {key}=; "
                                 f"drop {key}=")
        self.adapter_config = read_adapter_config(adapter)
        self.adapter = str(adapter)
        self.svd_cache = svd_cache
        if not isinstance(pretrained, str):
            pretrained = self._adapted(pretrained)
        super().__init__(pretrained=pretrained, **kwargs)

    def _adapted(self, model: nn.Module) -> nn.Module:
        return load_adapter(model, self.adapter, svd_cache=self.svd_cache, progress=False)

    def _create_model(self, pretrained: str, **kwargs: Any) -> None:
        """``HFLM`` builds the base model, then the adapter is loaded onto it."""
        super()._create_model(pretrained, **kwargs)
        self._model = self._adapted(self._model)

    def get_model_info(self) -> dict[str, Any]:
        """``HFLM``'s model information plus the adapter's folder and kind (its ``method`` or PEFT's
        ``peft_type``), recorded in lm-eval's results."""
        kind = self.adapter_config.get("method") or self.adapter_config.get("peft_type")
        return {**super().get_model_info(), "adapter": self.adapter, "adapter_type": kind}


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval's command line on ``argv`` (default: this process's arguments) with ``spectral-peft``
    registered. Returns 0, or 2 after printing one line for a :class:`SpectralPeftError`."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = [saved[0], *(saved[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except SpectralPeftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
