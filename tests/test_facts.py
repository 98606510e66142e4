"""The fictional world, its probes and scoring, and the reversal-curse training text."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lablib.config import ConfigError, ModelConfig
from lablib.models import Transformer
from lablib.experiments.reversal_and_tracing import ReversalConfig
from lablib.interp.analysis import sequence_logprobs
from lablib.tasks.facts import (REVERSAL_VARIANTS, TEMPLATES, ReversalStream, biography, candidate_logprobs,
                                make_reversal_data, make_world, name_ranking, permute_chunks, probes_for,
                                reversal_tokenizer, reverse_chunks, reverse_tokens, target_logprobs, word_tokenizer,
                                world_texts)


@pytest.fixture(scope="module")
def world():
    return make_world(n_background=30, n_new=6, seed=0)


@pytest.fixture(scope="module")
def tokenizer(world):
    return word_tokenizer(world_texts(world))


def tiny_model(vocab_size, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab_size, n_layer=2, n_head=2, d_model=32, max_seq_len=64)).eval()


def test_new_people_never_share_a_name_with_background_people(world):
    assert not {p.name for p in world.background} & {p.name for p in world.new}
    assert len({p.name for p in world.people}) == len(world.people)


def test_world_is_a_pure_function_of_its_seed():
    assert make_world(10, 2, seed=3) == make_world(10, 2, seed=3)
    assert make_world(10, 2, seed=3) != make_world(10, 2, seed=4)


def test_every_name_word_is_one_token_so_a_name_is_two(world, tokenizer):
    for person in world.people:
        assert len(tokenizer.encode(person.name)) == 2
    assert tokenizer.unk_id not in tokenizer.encode(biography(world.new[0], 0))


def test_probe_prompt_and_target_rebuild_the_injected_sentence(world):
    person = world.new[0]
    memorization = [p for p in probes_for(person, world) if p.kind == "memorization"]
    assert [f"{p.prompt} {p.target} ." for p in memorization] == \
        [t[0].format(s=person.name, o=person.value(rel)) for rel, t in TEMPLATES.items()]


def test_semantic_probes_use_a_wording_the_injected_text_never_uses(world):
    person = world.new[0]
    injected = " ".join(biography(person, i) for i in range(len(TEMPLATES["born"]) - 1))
    for probe in probes_for(person, world):
        assert (probe.prompt in injected) == (probe.kind == "memorization")


def test_compositional_probe_asks_for_the_employers_city(world):
    person = world.new[0]
    (probe,) = [p for p in probes_for(person, world) if p.kind == "compositional"]
    assert probe.target == world.company_city[person.employer]


def test_probe_score_is_the_log_probability_of_exactly_the_target_tokens():
    model = tiny_model(20)
    prompt, target = [3, 5, 7], [9, 11]
    logp = F.log_softmax(model(torch.tensor([prompt + target]))[0], -1)
    expected = logp[2, 9] + logp[3, 11]  # position i predicts token i+1
    assert sequence_logprobs(model, [prompt], [target])[0].item() == pytest.approx(expected.item(), abs=1e-5)


def test_probe_score_ignores_padding_and_other_rows_in_the_batch():
    model = tiny_model(20)
    alone = sequence_logprobs(model, [[3, 5]], [[9]])
    batched = sequence_logprobs(model, [[3, 5], [1, 2, 4, 6, 8, 10]], [[9], [12, 13, 14]])
    assert batched[0].item() == pytest.approx(alone[0].item(), abs=1e-5)


def test_target_logprobs_prepends_eos_like_training_rows(world, tokenizer):
    model = tiny_model(tokenizer.vocab_size)
    probe = probes_for(world.new[0], world)[0]
    prompt = [tokenizer.eos_id] + tokenizer.encode(probe.prompt)
    direct = sequence_logprobs(model, [prompt], [tokenizer.encode(probe.target)])
    assert target_logprobs(model, tokenizer, [probe])[0] == pytest.approx(direct[0].item(), abs=1e-6)


CHUNKS = [["Ana", "Bel"], ["is", "the", "parent", "of"], ["Cyr", "Dov"]]


def test_token_reversal_reverses_every_word_and_splits_names():
    assert reverse_tokens(CHUNKS, None) == ["Dov", "Cyr", "of", "parent", "the", "is", "Bel", "Ana"]


def test_chunk_reversal_keeps_names_and_relation_intact():
    assert reverse_chunks(CHUNKS, None) == ["Cyr", "Dov", "is", "the", "parent", "of", "Ana", "Bel"]


def test_chunk_permutation_is_never_the_identity_and_keeps_chunks_whole():
    rng = np.random.default_rng(0)
    seen = {tuple(permute_chunks(CHUNKS, rng)) for _ in range(200)}
    assert len(seen) == 5  # 3! orders minus the original
    for words in seen:
        text = " ".join(words)
        assert "Ana Bel" in text and "Cyr Dov" in text and "is the parent of" in text


def test_reverse_wording_is_shown_only_for_the_both_pairs():
    data = make_reversal_data(10, 3, seed=0)
    texts = data.texts()
    for a, b in data.pairs:
        assert f"{a} is the parent of {b} ." in texts
        assert (f"{b} is the child of {a} ." in texts) == ((a, b) in data.both)


@pytest.mark.parametrize("variant", list(REVERSAL_VARIANTS))
def test_reversal_rows_are_reproducible_and_start_at_a_sentence(variant):
    data = make_reversal_data(10, 3, seed=0)
    tok = reversal_tokenizer(data)
    stream = ReversalStream(data, tok, variant, seq_len=24)
    a, b = stream.batch(5, 4, seed=1)["tokens"], stream.batch(5, 4, seed=1)["tokens"]
    assert torch.equal(a, b) and a.shape == (4, 25)
    assert (a[:, 0] == tok.eos_id).all()
    assert tok.unk_id not in a


def test_plain_rows_hold_only_sentences_as_written():
    data = make_reversal_data(10, 3, seed=0)
    tok = reversal_tokenizer(data)
    row = tok.decode(ReversalStream(data, tok, "plain", seq_len=60).batch(0, 1, 0)["tokens"][0].tolist())
    complete = [s.strip() + " ." for s in row.replace("<eos>", "").split(" .")[:-1]]
    assert complete and all(s in data.texts() for s in complete)


class Bigram(torch.nn.Module):
    """A model whose next-token logits depend only on the current token (a lookup table)."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, idx, mask=None):
        return self.table[idx]


def test_name_ranking_ranks_the_favoured_name_first_and_greedy_matches_it():
    data = make_reversal_data(4, 0, seed=0)
    tok = reversal_tokenizer(data)
    prompts, answers = data.probes(data.pairs, "forward")
    first, last = tok.encode(answers[0])
    table = torch.zeros(tok.vocab_size, tok.vocab_size)
    table[:, first] = 5.0  # after any token, the favoured name's first word ...
    table[first] = 0.0
    table[first, last] = 5.0  # ... and after it, its last word
    scores = name_ranking(Bigram(table), tok, prompts, answers, data.names)
    assert scores["rank"][0] == 1 and scores["exact"][0]
    assert (scores["rank"][1:] > 1).all() and not scores["exact"][1:].any()


def test_reversal_config_refuses_an_unknown_variant():
    with pytest.raises(ConfigError, match="variants"):
        ReversalConfig.resolve("smoke", variants=["plain", "mirror"])


def test_candidate_scores_match_scoring_each_candidate_alone():
    model = tiny_model(20)
    prompts, candidates = [[1, 2, 3], [4, 5]], [[6, 7], [6, 8], [9, 7], [10]]
    shared = candidate_logprobs(model, prompts, candidates)
    alone = np.array([[sequence_logprobs(model, [p], [c])[0].item() for c in candidates] for p in prompts])
    assert shared == pytest.approx(alone, abs=1e-5)
