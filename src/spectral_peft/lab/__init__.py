"""The lab's validity checks: can the experiments tell methods apart? (``docs/lab.md``; ``spectral-peft lab-check``)

- :mod:`.criteria`: criteria (a)-(f), their thresholds and verdicts;
- :mod:`.expert`: (a) the SVF expert's paired gain over the base on held-out problems;
- :mod:`.skills`, :mod:`.chance`, :mod:`.gold_nll`: (b) each skill's accuracy, honest chance level and
  teacher-forced NLL of the gold solutions;
- :mod:`.regime`: (c) the relative size of a LoRA calibration fine-tune's updates;
- :mod:`.controls`: (e) the positive control (rehearsal) and the negative controls, retention gains over LoRA;
- :mod:`.probe_analysis`: is the probe real? Its stability over expert seeds and its overlap with a null probe, with
  sigma-aware and Fisher scores and with the top-sigma set (Jaccard indices against their exact chance levels).
"""

from .chance import Chance, chance_level
from .controls import DEFAULT_NEGATIVE, REHEARSAL, Arm, ControlsMeasure, measure_controls
from .criteria import FAIL, NOT_MEASURED, PASS, Verdict
from .expert import ExpertMeasure, measure_expert
from .gold_nll import GoldNLL, gold_nll
from .probe_analysis import (Overlap, Stability, chance_jaccard, chance_pooled_jaccard, fisher_scores, jaccard,
                             matched_sets, overlap, protected_sets, score_overlap, set_overlap, sigma_aware_scores,
                             singular_values, stability)
from .regime import RegimeMeasure, RegimeSettings, measure_regime, spread
from .skills import SkillMeasure, measure_skill

__all__ = [
    "Arm", "ControlsMeasure", "DEFAULT_NEGATIVE", "REHEARSAL", "measure_controls", "Chance", "ExpertMeasure", "FAIL",
    "GoldNLL", "NOT_MEASURED", "PASS", "RegimeMeasure", "RegimeSettings",
    "SkillMeasure", "Verdict", "chance_level", "gold_nll", "measure_expert", "measure_regime", "measure_skill",
    "spread", "Overlap", "Stability", "chance_jaccard", "chance_pooled_jaccard", "fisher_scores", "jaccard",
    "matched_sets", "overlap", "protected_sets", "score_overlap", "set_overlap", "sigma_aware_scores",
    "singular_values", "stability",
]
