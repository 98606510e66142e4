"""The reversal world: families and friends, the strings training can show, splits and trivial rules."""

import pytest

from lablib.config import ConfigError
from lablib.experiments.reversal_and_tracing import (ReversalTracingConfig, evaluation_splits, reversal_world,
                                                     trivial_rule_scores, with_seed)
from lablib.tasks.facts import (FORWARD_RELATION, OTHER_RELATIONS, REVERSAL_VARIANTS, REVERSE_RELATION, ReversalData,
                                ReversalStream, make_reversal_data, reversal_tokenizer, seen_strings, trivial_accuracy,
                                trivial_answers)


@pytest.fixture(scope="module")
def data():
    return make_reversal_data(12, 6, seed=3, generations=3)


def test_families_are_chains_so_middle_people_are_both_child_and_parent(data):
    parents = [a for a, _ in data.pairs]
    children = [b for _, b in data.pairs]
    assert len(data.pairs) == 12 * 2 and len(data.people) == 12 * 3 == len(set(data.people))
    both_roles = set(parents) & set(children)
    assert len(both_roles) == 12  # one middle generation per family
    assert len(set(children)) == len(children)  # everyone has at most one parent
    assert all(parents.count(p) == 1 for p in parents)  # ... and, in a chain, at most one child


def test_every_person_names_a_friend_outside_the_family_and_takes_part_in_several_facts(data):
    family = {}
    for a, b in data.pairs:
        family.setdefault(a, {a}).add(b)
        family.setdefault(b, {b}).add(a)
    subjects = {rel: [s for s, r, _ in data.others if r == rel] for rel in OTHER_RELATIONS}
    assert all(sorted(v) == sorted(data.people) for v in subjects.values())
    assert all(o != s and o not in family[s] for s, _, o in data.others)
    facts = [(a, b) for a, b in data.pairs] + [(s, o) for s, _, o in data.others]
    assert all(sum(person in f for f in facts) >= 2 for person in data.people)


def test_world_is_a_pure_function_of_its_seed():
    assert make_reversal_data(5, 2, seed=1).texts() == make_reversal_data(5, 2, seed=1).texts()
    assert make_reversal_data(5, 2, seed=1).texts() != make_reversal_data(5, 2, seed=2).texts()


def test_bad_sizes_are_refused_in_one_line():
    with pytest.raises(ValueError, match="n_both"):
        make_reversal_data(3, 6, generations=3)
    with pytest.raises(ValueError, match="generations"):
        make_reversal_data(3, 0, generations=1)


def test_no_variant_ever_writes_a_reverse_test_answer(data):
    """The reverse question's text and answer is not a substring of any sentence any variant can write
    (as written, token-reversed, or in any order of its chunks)."""
    seen = seen_strings(data)
    assert len(seen) > len(data.sentences())
    for a, b in data.forward_only:
        asked = f"{b} {REVERSE_RELATION} {a}"
        assert not any(asked in s for s in seen), asked
    # the check can fail: the pairs seen both ways are written in the reverse wording
    assert all(any(f"{b} {REVERSE_RELATION} {a}" in s for s in seen) for a, b in data.both)


@pytest.mark.parametrize("variant", list(REVERSAL_VARIANTS))
def test_training_rows_hold_no_reverse_test_answer(data, variant):
    tok = reversal_tokenizer(data)
    stream = ReversalStream(data, tok, variant, seq_len=64, transform_prob=1.0)
    text = " ".join(tok.decode(row.tolist()) for i in range(5) for row in stream.batch(i, 16, seed=0)["tokens"])
    for a, b in data.forward_only:
        assert f"{b} {REVERSE_RELATION} {a}" not in text


def test_after_a_middle_person_the_chunk_reversed_parent_relation_leads_to_two_names(data):
    """Chunk reversal writes "B is the parent of A" beside B's own "B is the parent of C": the relation
    chunk's direction, not the name B, decides the answer."""
    seen = seen_strings(data)
    middles = {b for _, b in data.pairs} & {a for a, _ in data.pairs}
    for b in middles:
        after = {s[len(f"{b} {FORWARD_RELATION} "):-2] for s in seen if s.startswith(f"{b} {FORWARD_RELATION} ")}
        assert len(after) == 2


def test_trivial_rules_answer_from_training_strings():
    pairs = [("Ana Bel", "Cyr Dov"), ("Cyr Dov", "Eda Fox")]
    data = ReversalData(pairs, 0, ["Ana Bel", "Cyr Dov", "Eda Fox", "Gus Hal"],
                        [("Gus Hal", "is the friend of", "Eda Fox"), ("Eda Fox", "is the friend of", "Gus Hal")])
    # Eda Fox: written before her are Cyr Dov (parent) and Gus Hal (friend): a tie, broken alphabetically
    assert trivial_answers(data, [pairs[1]], "most frequent name written before B") == ["Cyr Dov"]
    assert trivial_answers(data, [pairs[1]], "most frequent partner of B") == ["Gus Hal"]  # two sentences each way
    assert trivial_answers(data, [pairs[0]], "most frequent name written before B") == ["Ana Bel"]
    assert trivial_accuracy(data, pairs)["most frequent name written before B"] == 1.0
    with pytest.raises(ValueError, match="rule"):
        trivial_answers(data, pairs, "the oracle")


def test_dev_and_test_split_the_forward_only_pairs_and_the_rule_is_chosen_on_dev():
    cfg = with_seed(ReversalTracingConfig.resolve("cpu"), 1)
    data = reversal_world(cfg)
    groups = evaluation_splits(data, cfg.dev_fraction, seed=1)
    assert sorted(groups["dev"] + groups["test"]) == sorted(data.forward_only)
    assert not set(groups["dev"]) & set(groups["test"])
    scores = trivial_rule_scores(data, groups)
    assert scores["dev"][scores["chosen_on_dev"]] == max(scores["dev"].values())
    assert cfg.seed == 1 and cfg.preset == "cpu"


def test_seeds_must_be_distinct():
    with pytest.raises(ConfigError, match="seeds"):
        ReversalTracingConfig.resolve("smoke", seeds=[0, 0])
