"""The lab's validity criteria (a)-(f) of ``docs/lab.md``: their thresholds and the verdict on measured values.

A verdict is ``pass``, ``fail`` or ``not measured`` (with the reason), beside the measured value and the rule in
words. The thresholds:

- (a) a real expert: on >= ``EXPERT_MIN_PROBLEMS`` held-out problems, the paired 95% CI of the expert's gain over the
  base lies above 0; otherwise no expert was learned;
- (b) informative skills: every skill, on >= ``SKILL_MIN_PROBLEMS`` problems of its test mix, has a 95% Wilson
  interval strictly above its chance level and strictly below ``SKILL_CEILING`` (so it can both fall and rise);
- (c) a realistic regime: at least 80% of the adapted matrices (the 10th and 90th percentiles) have
  ``||dW||_F / ||W||_F`` inside ``REGIME_BAND``;
- (d) matched comparisons: a rule of the comparison protocols (injection at matched recall, fine-tuning at matched
  gain), not a property of the lab; it has nothing to measure before a comparison;
- (e) controls: the positive control's retention gain over LoRA has a paired 95% CI above 0;
- (f) MergeFail and continual tasks: at least ``MIN_TASKS`` tasks whose base accuracy (point estimate) lies in
  ``HALF_KNOWN``, and at least one method x operator whose fail rate lies strictly inside ``FAIL_RATE_BAND``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

EXPERT_MIN_PROBLEMS = 500
SKILL_MIN_PROBLEMS = 500
SKILL_CEILING = 0.80
REGIME_BAND = (0.01, 0.05)
MIN_TASKS = 6
HALF_KNOWN = (0.20, 0.60)
FAIL_RATE_BAND = (0.05, 0.95)
PASS, FAIL, NOT_MEASURED = "pass", "fail", "not measured"


@dataclass(frozen=True)
class Verdict:
    """One criterion's verdict (``status``: pass, fail or not measured), the measured ``value``, the ``rule`` and a
    ``note`` (the reason when not measured, the failing parts when failed)."""

    criterion: str
    title: str
    status: str
    value: Any
    rule: str
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _status(ok: bool) -> str:
    return PASS if ok else FAIL


def expert_verdict(gain: Mapping[str, Any] | None, reason: str = "") -> Verdict:
    """(a) from the gain summary ``{estimate, ci_low, ci_high, n, ...}`` (``None``: not measured, for ``reason``)."""
    rule = f"paired 95% CI of the expert's gain over the base above 0, on >= {EXPERT_MIN_PROBLEMS} held-out problems"
    if gain is None:
        return Verdict("a", "a real expert", NOT_MEASURED, None, rule, reason)
    ok = gain["n"] >= EXPERT_MIN_PROBLEMS and gain["ci_low"] > 0
    measured = (f"gain {100 * gain['estimate']:+.1f} [{100 * gain['ci_low']:+.1f}, {100 * gain['ci_high']:+.1f}] "
                f"points on {gain['n']} problems")
    note = measured if ok else (f"no expert was learned: {measured}" if gain["ci_low"] <= 0 else
                                f"{measured}; need {EXPERT_MIN_PROBLEMS} problems")
    return Verdict("a", "a real expert", _status(ok), dict(gain), rule, note)


def skills_verdict(skills: Mapping[str, Mapping[str, Any]]) -> Verdict:
    """(b) from ``{skill: {accuracy, ci_low, ci_high, chance, n, ...}}``."""
    rule = (f"every skill's 95% Wilson CI above its chance level and below {SKILL_CEILING:.0%}, on >= "
            f"{SKILL_MIN_PROBLEMS} problems of its test mix")
    bad = []
    for name, s in skills.items():
        if s["n"] < SKILL_MIN_PROBLEMS:
            bad.append(f"{name}: only {s['n']} problems")
        elif s["ci_low"] <= s["chance"]:
            bad.append(f"{name}: not above chance ({s['accuracy']:.1%} vs chance {s['chance']:.1%})")
        elif s["ci_high"] >= SKILL_CEILING:
            bad.append(f"{name}: not below {SKILL_CEILING:.0%} ({s['accuracy']:.1%})")
    value = {name: {k: s[k] for k in ("accuracy", "ci_low", "ci_high", "chance")} for name, s in skills.items()}
    return Verdict("b", "informative skills", _status(bool(skills) and not bad), value, rule, "; ".join(bad))


def regime_verdict(fro: Mapping[str, float] | None, reason: str = "") -> Verdict:
    """(c) from the spread ``{median, p10, p90, ...}`` of LoRA's ``||dW||_F / ||W||_F`` over adapted matrices."""
    low, high = REGIME_BAND
    rule = (f"10th and 90th percentiles of LoRA's ||dW||_F / ||W||_F over adapted matrices inside "
            f"[{low:.0%}, {high:.0%}]")
    if fro is None:
        return Verdict("c", "a realistic regime", NOT_MEASURED, None, rule, reason)
    ok = fro["p10"] >= low and fro["p90"] <= high
    note = f"p10 {fro['p10']:.2%}, median {fro['median']:.2%}, p90 {fro['p90']:.2%}"
    return Verdict("c", "a realistic regime", _status(ok), dict(fro), rule, note)


def matched_verdict() -> Verdict:
    """(d): a rule the comparison protocols follow, measured with them."""
    return Verdict("d", "matched comparisons", NOT_MEASURED, None,
                   "injection compared at matched recall, fine-tuning at matched task gain; never at a 100% ceiling",
                   "a rule of the comparison protocols, checked when they run; the lab measures nothing for it")


def controls_verdict(positive: Mapping[str, Any] | None, reason: str = "") -> Verdict:
    """(e) from the positive control's retention gain over LoRA ``{estimate, ci_low, ci_high}``."""
    rule = "the positive control's retention gain over LoRA has a paired 95% CI above 0 (negative controls reported)"
    if positive is None:
        return Verdict("e", "controls", NOT_MEASURED, None, rule, reason)
    ok = positive["ci_low"] > 0
    return Verdict("e", "controls", _status(ok), dict(positive), rule,
                   "" if ok else "the positive control shows no retention gain")


def tasks_verdict(task_accuracy: Mapping[str, float], fail_rates: Mapping[str, float], reason: str = "") -> Verdict:
    """(f) from the base's accuracy on each candidate task and the ``{"method|operator": fail rate}`` map (empty:
    fail rates not measured, for ``reason``)."""
    low, high = HALF_KNOWN
    f_low, f_high = FAIL_RATE_BAND
    rule = (f">= {MIN_TASKS} tasks the base half-knows (accuracy in [{low:.0%}, {high:.0%}]) and >= 1 method x "
            f"operator with a fail rate strictly inside ({f_low:.0%}, {f_high:.0%})")
    half = sorted(t for t, a in task_accuracy.items() if low <= a <= high)
    value = {"half_known_tasks": half, "task_accuracy": dict(task_accuracy), "fail_rates": dict(fail_rates)}
    if len(half) < MIN_TASKS:
        return Verdict("f", "MergeFail and continual tasks", FAIL, value, rule,
                       f"{len(half)} of {len(task_accuracy)} candidate tasks are half-known; need {MIN_TASKS}")
    if not fail_rates:
        return Verdict("f", "MergeFail and continual tasks", NOT_MEASURED, value, rule, reason)
    ok = any(f_low < r < f_high for r in fail_rates.values())
    return Verdict("f", "MergeFail and continual tasks", _status(ok), value, rule,
                   "" if ok else "every fail rate is at the floor or the ceiling")
