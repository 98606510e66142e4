"""A fictional world of people and facts, its probes, and the reversal-curse data.

Notable here:
- `make_world(...)` draws people with two-word invented names (a first and a last name
  from shared pools, so a name is a two-token chunk), a birth year, a home city and an
  employer; every employer is based in a city. Everything is seeded.
- A fact is rendered through paraphrase templates (`TEMPLATES`); every template ends
  with the object, so a probe is "template prefix -> object tokens". Background text uses
  every template; the last one of each relation is never used for injected facts and is
  their semantic probe (a familiar wording the fact was never seen in).
- Probes of three kinds (`probes_for`): memorization (the injected sentence's own
  prefix), semantic (a held-out paraphrase) and compositional (a two-hop question:
  where is this person's employer based?). `target_logprobs` scores each probe as the
  summed log-probability of exactly its target tokens.
- `word_tokenizer` gives every word its own token (a `tokenizers` WordLevel model), so a
  name is exactly two tokens and a chunk of a sentence is a run of whole tokens.
- The reversal curse: `ReversalData` holds families (chains of generations, so a person
  is both a child and a parent) and friend/colleague facts, so a name is followed by
  several names and only the relation chunk decides the answer; some parent/child pairs
  are shown in both directions (to teach the reverse wording), the test pairs forward
  only. `seen_strings` lists every sentence any variant can write (no test answer is
  among them); `TRIVIAL_RULES` answer the reverse question without a model.
  `REVERSAL_VARIANTS` is the table of training-text transforms (plain, token-level
  reversal, chunk-level reversal, random chunk permutation); `ReversalStream` packs
  transformed sentences into reproducible training rows.
- `name_ranking` scores every entity name as the continuation of a prompt: the
  target's rank among all names, and greedy exact match. Names that share a first
  token share a forward pass (`candidate_logprobs`).
- `reversal_accuracy` scores a model forward and reverse on the reversal data (the
  experiment is `lablib.experiments.reversal_and_tracing`).
- Why a word-level tokenizer and not characters or BPE: the reverse direction is only
  learnable when a name survives the transform as a unit. With one token per word, a
  chunk-level transform moves whole names, while a token-level reversal splits every
  name into its two words in swapped order, the contrast the permutation paper draws.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lablib.data import SPECIAL_TOKENS, Tokenizer
from lablib.interp.analysis import greedy_continuation, sequence_logprobs

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr", "th"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
CODAS = ["", "n", "r", "l", "s", "th", "m"]
CITY_WORDS = ["Port", "Lake", "New", "Old", "Upper", "East", "West", "Fort"]

# relation -> paraphrase templates; {s} is the subject, {o} the object, which always ends the sentence.
TEMPLATES: dict[str, list[str]] = {
    "born": ["{s} was born in {o} .", "{s} came into the world in {o} .", "the birth year of {s} is {o} .",
             "records say that {s} was born in the year {o} ."],
    "city": ["{s} lives in {o} .", "{s} has made a home in {o} .", "the home town of {s} is {o} .",
             "these days {s} resides in the city of {o} ."],
    "employer": ["{s} works for {o} .", "{s} is employed by {o} .", "the employer of {s} is {o} .",
                 "every month {s} is paid a salary by {o} ."],
}
COMPANY_TEMPLATE = "{s} is based in {o} ."
TWO_HOP_TEMPLATE = "the employer of {s} is based in {o} ."  # shown for background people, asked of new ones
N_TRAIN_TEMPLATES = len(TEMPLATES["born"]) - 1  # the last template of each relation is the held-out paraphrase
PROBE_KINDS = ("memorization", "semantic", "compositional")


def invented_words(n: int, rng: np.random.Generator, syllables: tuple[int, int] = (2, 3),
                   taken: set[str] = frozenset()) -> list[str]:
    """`n` distinct capitalised pseudo-words made of random syllables, none of them in `taken`."""
    out: list[str] = []
    seen = set(taken)
    while len(out) < n:
        k = int(rng.integers(syllables[0], syllables[1] + 1))
        word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(k)).capitalize()
        if word not in seen:
            seen.add(word)
            out.append(word)
    return out


def two_word_names(n: int, rng: np.random.Generator, pool: int, taken: set[str] = frozenset()) -> list[str]:
    """`n` distinct "First Last" names built from pools of `pool` first and `pool` last names."""
    if pool * pool < n:
        raise ValueError(f"pool: {pool} first x {pool} last names cannot make {n} distinct names")
    firsts = invented_words(pool, rng, taken=taken)
    lasts = invented_words(pool, rng, taken=taken | set(firsts))
    combos = rng.permutation(pool * pool)[:n]
    return [f"{firsts[c // pool]} {lasts[c % pool]}" for c in combos]


@dataclass(frozen=True)
class Person:
    name: str
    born: str
    city: str
    employer: str

    def value(self, relation: str) -> str:
        return getattr(self, relation)


@dataclass
class World:
    """People (background and new), companies with their home cities, all seeded."""

    background: list[Person]
    new: list[Person]  # people who never appear in the background text: the facts to inject
    company_city: dict[str, str]

    @property
    def people(self) -> list[Person]:
        return self.background + self.new


def make_world(n_background: int, n_new: int, n_companies: int = 12, n_cities: int = 16, seed: int = 0) -> World:
    rng = np.random.default_rng(seed)
    names = two_word_names(n_background + n_new, rng, pool=max(8, int(np.ceil(np.sqrt(n_background + n_new))) + 4))
    taken = {w for n in names for w in n.split()}
    cities = [f"{rng.choice(CITY_WORDS)}{w.lower()}" for w in invented_words(n_cities, rng, (1, 2), taken)]
    companies = [f"{w}corp" for w in invented_words(n_companies, rng, (2, 2), taken)]
    company_city = {c: str(rng.choice(cities)) for c in companies}
    people = [Person(name, str(int(rng.integers(1850, 2000))), str(rng.choice(cities)), str(rng.choice(companies)))
              for name in names]
    return World(people[:n_background], people[n_background:], company_city)


def render(template: str, subject: str, obj: str) -> str:
    return template.format(s=subject, o=obj)


def split_probe(template: str, subject: str, obj: str) -> tuple[str, str]:
    """(prompt, target): the sentence up to its object, and the object."""
    prefix = template.split("{o}")[0].format(s=subject).strip()
    return prefix, obj


def biography(person: Person, template_index: int | Sequence[int]) -> str:
    """The person's three facts, each through template `template_index` (one per relation if a sequence)."""
    idx = [template_index] * len(TEMPLATES) if isinstance(template_index, int) else list(template_index)
    return " ".join(render(TEMPLATES[rel][i], person.name, person.value(rel)) for rel, i in zip(TEMPLATES, idx))


def background_documents(world: World, renders_per_person: int, seed: int = 0) -> list[str]:
    """Filler text: each background person's biography through random templates (all of them, so
    every wording is familiar), the two-hop sentence for each of them, and every company's city."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(renders_per_person):
        for p in world.background:
            bio = biography(p, rng.integers(0, len(TEMPLATES["born"]), len(TEMPLATES)).tolist())
            two_hop = render(TWO_HOP_TEMPLATE, p.name, world.company_city[p.employer])
            docs.append(f"{bio} {two_hop}")
        docs.extend(render(COMPANY_TEMPLATE, c, city) for c, city in world.company_city.items())
    order = rng.permutation(len(docs))
    return [docs[i] for i in order]


@dataclass(frozen=True)
class Probe:
    fact: str  # the person the probe asks about
    kind: str  # memorization | semantic | compositional
    prompt: str
    target: str


def probes_for(person: Person, world: World, injected_template: int = 0) -> list[Probe]:
    """Memorization (the injected wording), semantic (the held-out paraphrase) and compositional probes."""
    out = []
    for rel, templates in TEMPLATES.items():
        for kind, t in (("memorization", templates[injected_template]), ("semantic", templates[-1])):
            out.append(Probe(person.name, kind, *split_probe(t, person.name, person.value(rel))))
    out.append(Probe(person.name, "compositional",
                     *split_probe(TWO_HOP_TEMPLATE, person.name, world.company_city[person.employer])))
    return out


def world_texts(world: World) -> list[str]:
    """Every sentence the world can produce (for building the tokenizer's vocabulary)."""
    texts = [biography(p, i) for p in world.people for i in range(len(TEMPLATES["born"]))]
    texts += [render(TWO_HOP_TEMPLATE, p.name, world.company_city[p.employer]) for p in world.people]
    texts += [render(COMPANY_TEMPLATE, c, city) for c, city in world.company_city.items()]
    return texts


def word_tokenizer(texts: Sequence[str]) -> Tokenizer:
    """One token per whitespace-separated word seen in `texts` (sorted), plus the special tokens."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in sorted({w for t in texts for w in t.split()}):
        vocab.setdefault(word, len(vocab))
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return Tokenizer(backend)


# --- scoring -------------------------------------------------------------------------------

def encode_probe(tokenizer: Tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of a probe; the prompt starts with <eos>, as every sentence does in training."""
    return [tokenizer.eos_id] + tokenizer.encode(prompt), tokenizer.encode(target)


def target_logprobs(model: torch.nn.Module, tokenizer: Tokenizer, probes: Sequence[Probe]) -> np.ndarray:
    """Each probe's summed log-probability of its target tokens."""
    pairs = [encode_probe(tokenizer, p.prompt, p.target) for p in probes]
    return sequence_logprobs(model, [a for a, _ in pairs], [b for _, b in pairs]).numpy()


@torch.no_grad()
def candidate_logprobs(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                       candidates: Sequence[Sequence[int]]) -> np.ndarray:
    """(n_prompts, n_candidates) log p(candidate | prompt). Candidates that share all but their last
    token share one forward pass, so ranking all two-token names costs one pass per first name."""
    prefixes = sorted({tuple(c[:-1]) for c in candidates})
    rows = [list(p) + list(q) for p in prompts for q in prefixes]
    prefix_lp = sequence_logprobs(model, [list(p) for p in prompts for _ in prefixes],
                                  [list(q) for _ in prompts for q in prefixes]).view(len(prompts), len(prefixes))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    last = []
    for start in range(0, len(rows), 512):  # the next-token distribution after each prompt + prefix
        chunk = rows[start:start + 512]
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, :len(r)] = torch.tensor(r)
        logp = F.log_softmax(model(ids.to(device), mask="causal").float(), -1).cpu().double()
        last.append(logp[torch.arange(len(chunk)), torch.tensor([len(r) - 1 for r in chunk])])
    model.train(was_training)
    last_lp = torch.cat(last).view(len(prompts), len(prefixes), -1)
    where = {q: i for i, q in enumerate(prefixes)}
    cols = torch.tensor([where[tuple(c[:-1])] for c in candidates])
    final = torch.tensor([c[-1] for c in candidates])
    return (prefix_lp[:, cols] + last_lp[:, cols, final]).numpy()


def name_ranking(model: torch.nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], answers: Sequence[str],
                 candidates: Sequence[str]) -> dict[str, np.ndarray]:
    """For each prompt: the answer's rank among all candidate names (1 = best), and greedy exact match."""
    index = {c: i for i, c in enumerate(candidates)}
    missing = [a for a in answers if a not in index]
    if missing:
        raise ValueError(f"answers: expected every answer among the candidates, missing {missing[:3]}")
    prompt_ids = [[tokenizer.eos_id] + tokenizer.encode(p) for p in prompts]
    cand_ids = [tokenizer.encode(c) for c in candidates]
    scores = candidate_logprobs(model, prompt_ids, cand_ids)
    answer_scores = scores[np.arange(len(prompts)), [index[a] for a in answers]]
    ranks = 1 + (scores > answer_scores[:, None]).sum(1)
    greedy = greedy_continuation(model, prompt_ids, max(map(len, cand_ids)))
    exact = np.array([g[:len(cand_ids[index[a]])] == cand_ids[index[a]] for g, a in zip(greedy, answers)])
    return {"rank": ranks, "exact": exact, "top1": ranks == 1}


# --- the reversal curse -------------------------------------------------------------------------

FORWARD_RELATION = "is the parent of"
REVERSE_RELATION = "is the child of"


def _tokens(chunks: Sequence[Sequence[str]]) -> list[str]:
    return [w for c in chunks for w in c]


def reverse_tokens(chunks, rng) -> list[str]:
    """Token-level reversal: every word in reverse order, names included (their two words swap)."""
    return _tokens(chunks)[::-1]


def reverse_chunks(chunks, rng) -> list[str]:
    """Chunk-level reversal: the semantic units (names, the relation phrase) in reverse order, each kept intact."""
    return _tokens(chunks[::-1])


def permute_chunks(chunks, rng) -> list[str]:
    """A random non-identity order of the semantic units, each kept intact."""
    orders = [o for o in itertools.permutations(range(len(chunks))) if list(o) != sorted(o)]
    order = orders[int(rng.integers(len(orders)))]
    return _tokens([chunks[i] for i in order])


# variant -> the transform of a sentence's chunks (None: the sentence as written, every time)
REVERSAL_VARIANTS: dict[str, Callable | None] = {
    "plain": None,
    "token_reversal": reverse_tokens,
    "chunk_reversal": reverse_chunks,
    "chunk_permutation": permute_chunks,
}


OTHER_RELATIONS = ("is the friend of",)  # written once per person, in one direction


@dataclass
class ReversalData:
    """A world of families and acquaintances for the reversal curse.

    `pairs` are (parent, child) links: each family is a chain of generations, so a person in
    the middle is the child of one pair and the parent of the next. `others` are further
    (subject, relation, object) facts of `OTHER_RELATIONS` (each person names a friend outside the family).
    So a name is followed by several names in training and only
    the relation chunk (and its direction) says which one answers a question. `both` pairs are
    written in both wordings; `forward_only` pairs only as "A is the parent of B", and their
    reverse ("B is the child of" -> A) is the test of the curse."""

    pairs: list[tuple[str, str]]  # (parent, child)
    n_both: int
    people: list[str] = field(default_factory=list)  # every person (the candidate answers)
    others: list[tuple[str, str, str]] = field(default_factory=list)  # (subject, relation, object)

    def __post_init__(self):
        if not self.people:
            self.people = list(dict.fromkeys(n for pair in self.pairs for n in pair))

    @property
    def both(self) -> list[tuple[str, str]]:
        return self.pairs[:self.n_both]

    @property
    def forward_only(self) -> list[tuple[str, str]]:
        return self.pairs[self.n_both:]

    @property
    def names(self) -> list[str]:
        return list(self.people)

    def sentences(self) -> list[list[list[str]]]:
        """Training sentences as chunks: [subject words], [relation words], [object words]."""
        out = [[a.split(), FORWARD_RELATION.split(), b.split()] for a, b in self.pairs]
        out += [[b.split(), REVERSE_RELATION.split(), a.split()] for a, b in self.both]
        out += [[s.split(), rel.split(), o.split()] for s, rel, o in self.others]
        return out

    def texts(self) -> list[str]:
        return [" ".join(_tokens(s)) + " ." for s in self.sentences()]

    def probes(self, pairs: Sequence[tuple[str, str]], direction: str) -> tuple[list[str], list[str]]:
        """(prompts, answers): forward asks for the child, reverse for the parent."""
        if direction == "forward":
            return [f"{a} {FORWARD_RELATION}" for a, _ in pairs], [b for _, b in pairs]
        return [f"{b} {REVERSE_RELATION}" for _, b in pairs], [a for a, _ in pairs]

    def summary(self) -> dict[str, int]:
        return {"people": len(self.people), "pairs": len(self.pairs), "both": len(self.both),
                "forward_only": len(self.forward_only), "other_facts": len(self.others),
                "sentences": len(self.sentences())}


def make_reversal_data(n_families: int, n_both: int, seed: int = 0, generations: int = 3,
                       other_relations: Sequence[str] = OTHER_RELATIONS) -> ReversalData:
    """`n_families` chains of `generations` people ((generations - 1) parent/child pairs each), in a
    random order of pairs, the first `n_both` shown both ways; every person also names one person
    outside the family per relation of `other_relations`."""
    if generations < 2:
        raise ValueError(f"generations: expected at least 2 (a parent and a child), got {generations}")
    n_pairs = n_families * (generations - 1)
    if not 0 <= n_both < n_pairs:
        raise ValueError(f"n_both: expected 0 <= n_both < {n_pairs} (the pairs of {n_families} families of "
                         f"{generations} generations), got {n_both}")
    if other_relations and n_families < 2:
        raise ValueError(f"n_families: other relations need at least 2 families, got {n_families}")
    rng = np.random.default_rng(seed)
    n_people = n_families * generations
    names = two_word_names(n_people, rng, pool=max(8, int(np.ceil(np.sqrt(n_people))) + 4))
    families = [names[f * generations:(f + 1) * generations] for f in range(n_families)]
    pairs = [(fam[g], fam[g + 1]) for fam in families for g in range(generations - 1)]
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    family_of = {n: f for f, fam in enumerate(families) for n in fam}
    others = []
    for rel in other_relations:
        for person in names:
            outside = [n for n in names if family_of[n] != family_of[person]]
            others.append((person, rel, outside[int(rng.integers(len(outside)))]))
    return ReversalData(pairs, n_both, list(names), others)


@dataclass
class ReversalStream:
    """Training rows of `<eos>`-separated sentences; each sentence is written as is or, with
    probability `transform_prob`, through the variant's transform. Row `r` of micro-batch `index`
    is a pure function of (seed, index, r)."""

    data: ReversalData
    tokenizer: Tokenizer
    variant: str
    seq_len: int
    transform_prob: float = 0.5
    _sentences: list = field(init=False, repr=False)

    def __post_init__(self):
        if self.variant not in REVERSAL_VARIANTS:
            raise ValueError(f"variant: expected one of {', '.join(REVERSAL_VARIANTS)}, got {self.variant!r}")
        self._sentences = self.data.sentences()

    def sentence_ids(self, i: int, rng: np.random.Generator) -> list[int]:
        chunks = self._sentences[i]
        transform = REVERSAL_VARIANTS[self.variant]
        words = transform(chunks, rng) if transform and rng.random() < self.transform_prob else _tokens(chunks)
        return self.tokenizer.encode(" ".join(words) + " .") + [self.tokenizer.eos_id]

    def batch(self, index: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        rows = []
        for r in range(batch_size):
            rng = np.random.default_rng([seed, index, r])
            ids = [self.tokenizer.eos_id]
            while len(ids) < self.seq_len + 1:
                ids += self.sentence_ids(int(rng.integers(len(self._sentences))), rng)
            rows.append(ids[:self.seq_len + 1])
        return {"tokens": torch.tensor(rows)}


def reversal_tokenizer(data: ReversalData) -> Tokenizer:
    """Word tokens for every name word and relation word, in either direction."""
    return word_tokenizer(data.texts() + [f"{b} {REVERSE_RELATION} {a} ." for a, b in data.pairs])


# --- scoring the reversal data ------------------------------------------------------------------

def reversal_accuracy(model, tokenizer: Tokenizer, data: ReversalData,
                      groups: dict[str, Sequence[tuple[str, str]]] | None = None) -> dict[str, float]:
    """Forward and reverse exact match, top-1 and mean rank among all names, per group of pairs
    (default: the forward-only pairs as `test` and the pairs seen both ways as `both`); with chance levels."""
    out: dict[str, float] = {}
    groups = groups if groups is not None else {"test": data.forward_only, "both": data.both}
    for group, pairs in groups.items():
        if not pairs:
            continue
        for direction in ("forward", "reverse"):
            prompts, answers = data.probes(pairs, direction)
            scores = name_ranking(model, tokenizer, prompts, answers, data.names)
            out[f"{direction}_exact_{group}"] = float(scores["exact"].mean())
            out[f"{direction}_top1_{group}"] = float(scores["top1"].mean())
            out[f"{direction}_mean_rank_{group}"] = float(scores["rank"].mean())
    n = len(data.names)
    out["chance_top1"], out["chance_mean_rank"] = 1.0 / n, (n + 1) / 2
    return out


def seen_strings(data: ReversalData) -> list[str]:
    """Every sentence any training variant can write: each training sentence as written, token by
    token reversed, and in every order of its chunks."""
    out = set()
    for chunks in data.sentences():
        out.add(" ".join(reverse_tokens(chunks, None)) + " .")
        for order in itertools.permutations(chunks):
            out.add(" ".join(_tokens(order)) + " .")
    return sorted(out)


# --- trivial rules for the reverse question ------------------------------------------------------
# Each answers "B is the child of" from the training sentences as written, without a model.

def _training_triples(data: ReversalData) -> list[tuple[str, str, str]]:
    return ([(a, FORWARD_RELATION, b) for a, b in data.pairs] + [(b, REVERSE_RELATION, a) for a, b in data.both]
            + list(data.others))


def _most_common(names: list[str], fallback: str) -> str:
    from collections import Counter

    if not names:
        return fallback
    counts = Counter(names)
    top = max(counts.values())
    return min(n for n, c in counts.items() if c == top)  # ties: alphabetical, blind to the facts' order and roles


def _rule_partner(data, triples, child):
    return [o if s == child else s for s, _, o in triples if child in (s, o)]


def _rule_before(data, triples, child):
    return [s for s, _, o in triples if o == child]


def _rule_after_relation(data, triples, child):
    return [o for _, rel, o in triples if rel == REVERSE_RELATION]


# rule -> the candidates it counts for child B (the most frequent one, alphabetical first on ties, is its answer)
TRIVIAL_RULES: dict[str, Callable] = {
    "most frequent partner of B": _rule_partner,
    "most frequent name written before B": _rule_before,
    "most frequent answer of the reverse wording": _rule_after_relation,
}


def trivial_answers(data: ReversalData, pairs: Sequence[tuple[str, str]], rule: str) -> list[str]:
    """The rule's answer to "B is the child of" for each (parent, child) pair."""
    if rule not in TRIVIAL_RULES:
        raise ValueError(f"rule: expected one of {', '.join(TRIVIAL_RULES)}, got {rule!r}")
    triples = _training_triples(data)
    return [_most_common(TRIVIAL_RULES[rule](data, triples, b), data.names[0]) for _, b in pairs]


def trivial_accuracy(data: ReversalData, pairs: Sequence[tuple[str, str]]) -> dict[str, float]:
    """Reverse exact match of every trivial rule on these pairs."""
    if not pairs:
        raise ValueError("trivial_accuracy: expected at least one pair, got none")
    return {rule: float(np.mean([ans == a for ans, (a, _) in zip(trivial_answers(data, pairs, rule), pairs)]))
            for rule in TRIVIAL_RULES}
