"""Criterion (e): can the lab show a retention difference when one exists, and none where none should be?

Every arm starts from the SVF expert ``W_e = U diag(sigma z) V^T`` (the probe's scales folded into a fresh base:
:func:`~spectral_peft.methods.build_model` gives PALoRA the probe and folds it into the weights for every other
method), is trained with the same settings (:class:`~spectral_peft.lab.regime.RegimeSettings`: rank, targets, lr,
epochs, batch size) and seed on the same injection data (the regime's facts, or its task data), and is then scored on

- retention: correctness ``c_i`` (0/1) on the same ``n`` problems of the ``test`` split of the expert's skill;
- learning: what the injection data teach, per trained item (recall of each trained fact, 0/1).

Arms: ``lora`` (the reference), ``lora+rehearsal`` (the same spec, its training pairs the injection pairs with
``n_rehearsal`` (prompt, target) pairs of the skill's ``train`` split mixed in, :func:`mix_in`), and the negative
controls (default :data:`DEFAULT_NEGATIVE`: a random protected set; LoRA forced into the probe's protected subspace,
into a random one and into the top-sigma one of the same size). The retention gain of an arm is the paired
difference ``mean_i(c_i^arm - c_i^lora)`` in accuracy points (0-1) with its 95% bootstrap interval over problems
(:func:`~spectral_peft.evaluation.stats.paired_difference_ci`). The positive control (rehearsal) passes when that
interval lies above 0; negative controls are reported without a threshold. The expert's own accuracy on the same
problems is the retention reference.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from ..adapters.svf_fold import fold_expert
from ..errors import InputError
from ..evaluation import skill_accuracy
from ..evaluation.stats import CI, paired_difference_ci, proportion_ci
from ..methods import METHODS, MethodSpec
from ..probe import Probe
from ..validation import check_at_least, check_methods
from .regime import RegimeSettings, train_at, training_data

REFERENCE = "lora"
REHEARSAL = "lora+rehearsal"
DEFAULT_NEGATIVE = ("palora:protect=random", "palora:place=inside", "palora:protect=random,place=inside",
                    "palora:protect=sigma,place=inside")
# CorDA needs calibration data of its own, which a control does not have
CONTROL_METHODS = tuple(m for m in METHODS if m != "corda")


@dataclass
class Arm:
    """One fine-tune from the expert: its spec, per-problem skill outcomes (``correct``), per-item outcomes on the
    injection data (``learned``) and its training record (``seconds``: training only)."""

    spec: dict[str, Any]
    n_pairs: int
    correct: list[float]
    learned: list[float]
    steps: int
    reached_target: bool | None
    first_loss: float
    last_loss: float
    seconds: float


def _interval(ci: CI) -> dict[str, float]:
    return {"estimate": ci.estimate, "ci_low": ci.low, "ci_high": ci.high}


@dataclass
class ControlsMeasure:
    """Every arm's outcomes on the same problems and items (``arms``: the reference first, then rehearsal, then the
    negative controls by label), and the expert's on the same."""

    skill: str
    probe: str
    settings: RegimeSettings
    n_rehearsal: int
    learned_metric: str
    expert_correct: list[float]
    expert_learned: list[float]
    arms: dict[str, Arm]

    def gain(self, label: str) -> CI:
        """Retention gain of arm ``label`` over LoRA: the paired difference of per-problem outcomes."""
        return paired_difference_ci(self.arms[label].correct, self.arms[REFERENCE].correct)

    def arm_summary(self, label: str) -> dict[str, Any]:
        """``{estimate, ci_low, ci_high, n}`` of the arm's retention gain over LoRA, with its accuracy, its change
        from the expert (paired), how much of the injection data it learned and that against LoRA (paired)."""
        arm, ref = self.arms[label], self.arms[REFERENCE]
        accuracy, learned = proportion_ci(arm.correct), proportion_ci(arm.learned)
        return {**_interval(self.gain(label)), "n": len(arm.correct), "accuracy": accuracy.estimate,
                "accuracy_ci": [accuracy.low, accuracy.high],
                "vs_expert": _interval(paired_difference_ci(arm.correct, self.expert_correct)),
                "learned": learned.estimate, "learned_ci": [learned.low, learned.high],
                "learned_gain": _interval(paired_difference_ci(arm.learned, ref.learned)),
                "n_learned": len(arm.learned), "n_pairs": arm.n_pairs, "steps": arm.steps, "spec": arm.spec["label"]}

    def positive_control(self) -> dict[str, Any]:
        """Rehearsal's retention gain over LoRA ``{estimate, ci_low, ci_high, n}`` (accuracy points, 0-1; the
        ``positive_control`` of ``lab.json``), with both accuracies, the expert's, and what each learned."""
        ref = self.arm_summary(REFERENCE)
        out = self.arm_summary(REHEARSAL)
        return {**{k: out[k] for k in ("estimate", "ci_low", "ci_high", "n")}, "control": REHEARSAL,
                "n_rehearsal": self.n_rehearsal, "skill": self.skill, "rehearsal_accuracy": out["accuracy"],
                "lora_accuracy": ref["accuracy"], "expert_accuracy": proportion_ci(self.expert_correct).estimate,
                "rehearsal_learned": out["learned"], "lora_learned": ref["learned"],
                "learned_metric": self.learned_metric}

    def negative_controls(self) -> dict[str, dict[str, Any]]:
        """Per negative control (by label), :meth:`arm_summary`."""
        return {label: self.arm_summary(label) for label in self.arms if label not in (REFERENCE, REHEARSAL)}

    def summary(self) -> dict[str, Any]:
        expert, learned = proportion_ci(self.expert_correct), proportion_ci(self.expert_learned)
        return {"skill": self.skill, "probe": self.probe, "n": len(self.expert_correct),
                "expert_accuracy": expert.estimate, "expert_accuracy_ci": [expert.low, expert.high],
                "expert_learned": learned.estimate, "learned_metric": self.learned_metric,
                "lora": self.arm_summary(REFERENCE), "positive_control": self.positive_control(),
                "negative_controls": self.negative_controls()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ControlsMeasure:
        """The inverse of :meth:`to_dict` (e.g. a cached run unit read back from JSON)."""
        return cls(**{**d, "settings": RegimeSettings(**d["settings"]),
                      "arms": {label: Arm(**arm) for label, arm in d["arms"].items()}})


def mix_in(pairs: Sequence[tuple[str, str]], extra: Sequence[tuple[str, str]], seed: int) -> list[tuple[str, str]]:
    """``pairs`` with ``extra`` inserted at positions drawn uniformly (seeded by ``seed``) among the
    ``len(pairs) + len(extra)`` slots; both keep their own order, so with no ``extra`` the result is ``pairs``."""
    total = len(pairs) + len(extra)
    slots = set(random.Random(f"controls/rehearsal/{seed}").sample(range(total), len(extra)))
    own, other = iter(pairs), iter(extra)
    return [next(other) if i in slots else next(own) for i in range(total)]


def control_specs(settings: RegimeSettings, negative: Sequence[str], probe: Probe, seed: int = 0
                  ) -> list[MethodSpec]:
    """The negative controls' specs over the regime's rank and targets, checked (including their adapter configs
    with ``probe``) without building anything; their labels must differ from each other and from the two arms."""
    if not negative:
        return []
    specs = check_methods(list(negative), MethodSpec(r=settings.r, targets=settings.targets), CONTROL_METHODS)
    clash = [s.label for s in specs if s.label in (REFERENCE, REHEARSAL)]
    if clash:
        raise InputError(f"negative control {clash[0]!r} has the label of an arm that always runs; write its options "
                         f"out (e.g. lora:r={settings.r}) or drop it")
    for spec in specs:
        spec.adapter_config(probe, seed)
    return specs


def measure_controls(source, task, probe: Probe, settings: RegimeSettings, n: int, n_rehearsal: int, seed: int = 0,
                     negative: Sequence[str] = DEFAULT_NEGATIVE, chat_template: str = "auto",
                     allow_code_execution: bool = False, progress: bool = True) -> ControlsMeasure:
    """Train every arm from ``probe``'s expert on ``source`` (a :class:`~spectral_peft.loading.ModelSource`) and
    score it on ``n`` test problems of ``task`` (the expert's skill) and on the injection data (module docstring).

    Every input is checked before any model is loaded or trained.
    """
    check_at_least(1, n=n)
    check_at_least(0, n_rehearsal=n_rehearsal)
    settings.validate(allow_code_execution)
    lora = settings.spec()
    negatives = control_specs(settings, negative, probe, seed)
    tok = source.tokenizer
    pairs, score_learned, metric = training_data(settings, tok, chat_template, allow_code_execution, seed)
    problems = task.examples("test", n=n, seed=seed)
    rehearsal = [(e.prompt, e.target) for e in task.examples("train", n=n_rehearsal, seed=seed)]

    def correct(model) -> list[float]:
        return [float(c) for c in skill_accuracy(model, tok, task, problems, progress=progress).correct]

    expert = fold_expert(source.fresh(), probe)
    expert_correct, expert_learned = correct(expert), score_learned(expert, progress)
    del expert

    runs = [(REFERENCE, lora, pairs), (REHEARSAL, lora, mix_in(pairs, rehearsal, seed)),
            *((s.label, s, pairs) for s in negatives)]
    arms = {}
    for label, spec, data in runs:
        model, history = train_at(settings, source.fresh(), tok, spec, data, score_learned, seed, probe=probe,
                                  desc=label, progress=progress)
        arms[label] = Arm(spec=spec.to_dict(), n_pairs=len(data), correct=correct(model),
                          learned=score_learned(model, progress), steps=history.steps,
                          reached_target=history.reached_stop_score, first_loss=history.losses[0],
                          last_loss=history.losses[-1], seconds=history.seconds)
        del model
    return ControlsMeasure(skill=task.name, probe=probe.source or "", settings=settings, n_rehearsal=n_rehearsal,
                           learned_metric=metric, expert_correct=expert_correct, expert_learned=expert_learned,
                           arms=arms)
