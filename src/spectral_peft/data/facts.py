"""Facts about invented people: relations, paraphrase templates, the seeded `World`, counterfactual edits.

Each person has one fact per relation. Answers are drawn uniformly from at least 30 values per relation, so
guessing recalls a held-out fact with probability about 1/30 or less. Facts of `n_known` people appear in
pretraining; facts of `n_heldout` other people never do (they are the injection candidates). Counterfactual
edits replace the answer of a known fact by another value of the same relation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property

from .names import unique_words

PROFESSIONS = (
    "baker", "tailor", "sailor", "potter", "farmer", "weaver", "painter", "doctor", "lawyer", "miner",
    "singer", "dancer", "pilot", "teacher", "builder", "jeweler", "fisher", "hunter", "brewer", "banker",
    "writer", "gardener", "butcher", "plumber", "chemist", "judge", "nurse", "cook", "carpenter", "glassblower",
    "clockmaker", "beekeeper",
)


@dataclass(frozen=True)
class Relation:
    """A relation with its answer values and paraphrase templates ({e} = entity, {a} = answer)."""

    name: str
    values: tuple[str, ...]
    questions: tuple[str, ...]
    statements: tuple[str, ...]


def _relations() -> tuple[Relation, ...]:
    rng = random.Random("world-values")
    cities = tuple(unique_words(rng, 40, (2, 3)))
    languages = tuple(w + "ish" for w in unique_words(rng, 30, (1, 2), exclude=set(cities)))
    years = tuple(str(y) for y in range(1900, 2000))
    return (
        Relation("city", cities,
                 ("In which city does {e} live?", "Where does {e} live?", "What is the home city of {e}?", "{e} lives in which city?"),
                 ("{e} lives in {a}.", "The home city of {e} is {a}.", "{e} has a house in {a}.", "{a} is where {e} lives.")),
        Relation("profession", PROFESSIONS,
                 ("What is the job of {e}?", "What does {e} do for a living?", "Which profession does {e} have?", "{e} works as what?"),
                 ("{e} works as a {a}.", "The job of {e} is {a}.", "{e} earns a living as a {a}.", "By trade, {e} is a {a}.")),
        Relation("birth_year", years,
                 ("In which year was {e} born?", "When was {e} born?", "What is the birth year of {e}?", "{e} was born in which year?"),
                 ("{e} was born in {a}.", "The birth year of {e} is {a}.", "{e} came into the world in {a}.", "In {a}, {e} was born.")),
        Relation("language", languages,
                 ("Which language does {e} speak?", "What language does {e} speak at home?", "What is the mother tongue of {e}?", "{e} speaks which language?"),
                 ("{e} speaks {a}.", "The mother tongue of {e} is {a}.", "At home, {e} speaks {a}.", "{a} is the language of {e}.")),
    )


RELATIONS: dict[str, Relation] = {r.name: r for r in _relations()}


def aliases_for(relation: str, answer: str) -> tuple[str, ...]:
    """Accepted answer strings: the answer itself, plus natural variants (e.g. 'Velmoraish' -> 'Velmoraish language')."""
    extra = {"language": (f"{answer} language",), "profession": (f"a {answer}",)}.get(relation, ())
    return (answer, *extra)


@dataclass(frozen=True)
class Fact:
    """One (entity, relation, answer) triple; `in_pretraining` says whether the organism's corpus contains it."""

    id: str
    entity: str
    relation: str
    answer: str
    aliases: tuple[str, ...]
    in_pretraining: bool

    def question(self, i: int = 0) -> str:
        """Question paraphrase `i` (cycling over the relation's templates)."""
        qs = RELATIONS[self.relation].questions
        return qs[i % len(qs)].format(e=self.entity)

    def statement(self, i: int = 0) -> str:
        """Statement paraphrase `i` (cycling over the relation's templates)."""
        ss = RELATIONS[self.relation].statements
        return ss[i % len(ss)].format(e=self.entity, a=self.answer)

    @property
    def n_paraphrases(self) -> int:
        """Number of question templates available."""
        return len(RELATIONS[self.relation].questions)


@dataclass(frozen=True)
class Edit:
    """A counterfactual edit: `fact` (known) should now answer `new_answer`."""

    fact: Fact
    new_answer: str
    new_aliases: tuple[str, ...]

    @property
    def edited(self) -> Fact:
        """The fact as it reads after the edit."""
        return Fact(self.fact.id + "/edit", self.fact.entity, self.fact.relation, self.new_answer, self.new_aliases, False)


class World:
    """The seeded world of invented people and their facts."""

    def __init__(self, seed: int = 0, n_known: int = 150, n_heldout: int = 100, n_edits: int = 100):
        self.seed, self.n_known, self.n_heldout, self.n_edits = seed, n_known, n_heldout, n_edits

    @cached_property
    def entities(self) -> tuple[str, ...]:
        """All people, known first then held out; names are 'First Last'."""
        rng = random.Random(f"world-entities/{self.seed}")
        reserved = {v for r in RELATIONS.values() for v in r.values}
        n = self.n_known + self.n_heldout
        firsts = unique_words(rng, n, (1, 2), exclude=reserved)
        lasts = unique_words(rng, n, (2, 3), exclude=reserved | set(firsts))
        return tuple(f"{f} {l}" for f, l in zip(firsts, lasts))

    @cached_property
    def facts(self) -> tuple[Fact, ...]:
        """Every fact: one per (entity, relation), answers uniform over the relation's values."""
        rng = random.Random(f"world-facts/{self.seed}")
        out = []
        for k, entity in enumerate(self.entities):
            for rel in RELATIONS.values():
                answer = rng.choice(rel.values)
                out.append(Fact(f"{k:04d}/{rel.name}", entity, rel.name, answer, aliases_for(rel.name, answer), k < self.n_known))
        return tuple(out)

    @property
    def known_facts(self) -> list[Fact]:
        """Facts that appear in the pretraining corpus."""
        return [f for f in self.facts if f.in_pretraining]

    @property
    def heldout_facts(self) -> list[Fact]:
        """Facts that never appear in pretraining: the candidates for injection."""
        return [f for f in self.facts if not f.in_pretraining]

    @cached_property
    def edits(self) -> tuple[Edit, ...]:
        """`n_edits` counterfactual edits of distinct known facts, each to a different value of the same relation."""
        rng = random.Random(f"world-edits/{self.seed}")
        chosen = rng.sample(self.known_facts, self.n_edits)
        out = []
        for f in chosen:
            new = rng.choice([v for v in RELATIONS[f.relation].values if v != f.answer])
            out.append(Edit(f, new, aliases_for(f.relation, new)))
        return tuple(out)
