"""The lab's validity checks: can the experiments tell methods apart? (``docs/lab.md``; ``spectral-peft lab-check``)

- :mod:`.criteria`: criteria (a)-(f), their thresholds and verdicts;
- :mod:`.expert`: (a) the SVF expert's paired gain over the base on held-out problems;
- :mod:`.skills`, :mod:`.chance`, :mod:`.gold_nll`: (b) each skill's accuracy, honest chance level and
  teacher-forced NLL of the gold solutions;
- :mod:`.regime`: (c) the relative size of a LoRA calibration fine-tune's updates.
"""

from .chance import Chance, chance_level
from .criteria import FAIL, NOT_MEASURED, PASS, Verdict
from .expert import ExpertMeasure, measure_expert
from .gold_nll import GoldNLL, gold_nll
from .regime import RegimeMeasure, RegimeSettings, measure_regime, spread
from .skills import SkillMeasure, measure_skill

__all__ = [
    "Chance", "ExpertMeasure", "FAIL", "GoldNLL", "NOT_MEASURED", "PASS", "RegimeMeasure", "RegimeSettings",
    "SkillMeasure", "Verdict", "chance_level", "gold_nll", "measure_expert", "measure_regime", "measure_skill",
    "spread",
]
