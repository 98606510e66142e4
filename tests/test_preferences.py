"""Pretraining with preferences: the PEP 8 scorer, the feedback objectives and the experiment's data and metrics."""

import math

import numpy as np
import pytest
import torch

from lablib.config import ConfigError, ModelConfig
from lablib.data import char_tokenizer
from lablib.experiments import preferences as exp
from lablib.models import Transformer
from lablib.objectives import (CONTROL_TOKENS, ConditionalTraining, Filtering, ObjectiveConfig, RewardWeighted,
                               Unlikelihood, add_control_tokens, build_objective, control_ids, unlikelihood_loss)
from lablib.tasks import pep8
from lablib.tasks.pep8 import Segments


# --- the scorer ------------------------------------------------------------------------------

def codes(text):
    return sorted(code for _, code in pep8.violations(text))


def test_the_scorer_counts_known_violations():
    assert codes("x = 1\ny = [1, 2]\n") == []
    assert codes("x=1\n") == ["E225"]
    assert codes("import os, sys\n") == ["E401"]
    assert codes("f(a,b)\n") == ["E231"]
    assert codes("if x: y = 1\n") == ["E701"]
    assert codes("x = 1; y = 2\n") == ["E702"]
    assert codes("def f( a ):\n    return a\n") == ["E201", "E202"]
    assert codes("y = " + "1 + " * 25 + "1\n") == ["E501"]
    assert pep8.violation_rate("x=1\n") == pytest.approx(1 / 4)
    assert pep8.violation_rate("") == 0.0


def test_checks_that_need_lines_outside_a_segment_are_left_out():
    assert codes("        return x\n    y = 2\n") == []  # cut inside a block: no unexpected-indentation verdict
    assert codes('"""a docstring cut open\nx = 1\n') == []  # a string opened before the cut: no tokenizer error


def test_the_scorer_is_deterministic():
    text = "import os,sys\nx=1\ndef f( a ):\n  return a\n"
    assert all(pep8.violations(text) == pep8.violations(text) for _ in range(3))


def test_a_continuation_is_scored_on_the_lines_it_wrote():
    prompt = "x=1\ny = "
    assert pep8.continuation_violations(prompt, "2\n") == 0  # the prompt's own E225 on line 1 does not count
    assert pep8.continuation_violations(prompt, "f(a,b)\n") == 1
    assert pep8.continuation_rate(prompt, "") == 0.0


# --- the objectives --------------------------------------------------------------------------

def tiny_model(vocab=12, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, n_layer=1, n_head=2, d_model=16, max_seq_len=16))


def batch(scores, T=8, vocab=10):
    tokens = torch.randint(4, vocab, (len(scores), T + 1), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = 3  # the start token
    return {"tokens": tokens, "score": torch.tensor(scores, dtype=torch.float32)}


def test_conditional_training_prefixes_the_right_token_by_threshold():
    obj = ConditionalTraining(threshold=0.05, good_id=10, bad_id=11, unconditional_fraction=0.0)
    b = batch([0.0, 0.05, 0.06, 0.5])
    rows = obj.rows(b["tokens"], b["score"], torch.Generator().manual_seed(0))
    assert rows[:, 0].tolist() == [10, 10, 11, 11]
    assert torch.equal(rows[:, 1:], b["tokens"][:, 1:])  # the code tokens are untouched


def test_conditional_training_leaves_a_fraction_of_rows_without_a_control_token():
    obj = ConditionalTraining(threshold=0.05, good_id=10, bad_id=11, unconditional_fraction=0.25)
    tokens = torch.full((4000, 3), 3)
    rows = obj.rows(tokens, torch.zeros(4000), torch.Generator().manual_seed(0))
    assert abs(float((rows[:, 0] == 3).float().mean()) - 0.25) < 0.03


def test_the_control_tokens_are_special_tokens_of_the_tokenizer():
    tok = add_control_tokens(char_tokenizer(["abc"]))
    before = tok.vocab_size
    good, bad = control_ids(tok)
    assert {good, bad} == {before - 2, before - 1}
    assert tok.encode("<|good|>a") == [good, tok.encode("a")[0]]
    assert tok.decode([good, *tok.encode("ab"), bad]) == "ab"
    assert add_control_tokens(tok).vocab_size == before  # adding them twice changes nothing
    with pytest.raises(ValueError, match="add_control_tokens"):
        control_ids(char_tokenizer(["abc"]))


def test_filtering_scores_good_rows_only():
    model = tiny_model()
    loss, metrics = Filtering(threshold=0.1)(model, batch([0.0, 0.5]), None)
    assert metrics["rows_kept"] == 0.5 and metrics["tokens_scored"] == 8
    assert math.isfinite(float(loss.detach()))


def test_unlikelihood_is_finite_and_pushes_bad_tokens_down():
    logits = torch.tensor([[[20.0, -20.0, 0.0]]])  # p(token 0) ~ 1: log(1 - p) must not be -inf
    assert torch.isfinite(unlikelihood_loss(logits, torch.tensor([[0]]))).all()
    model = tiny_model()
    b = batch([1.0, 1.0])  # both rows bad
    obj = Unlikelihood(threshold=0.1, alpha=1.0)
    logp = lambda: torch.log_softmax(model(b["tokens"][:, :-1]), -1).gather(-1, b["tokens"][:, 1:, None]).mean().detach()
    before = float(logp())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(10):
        loss, _ = obj(model, b, None)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(logp()) < before - 0.5


def test_reward_weighted_regression_weights_the_better_row_more():
    model = tiny_model()
    _, metrics = RewardWeighted(beta=0.01)(model, batch([0.0, 1.0]), None)
    assert metrics["max_weight"] == pytest.approx(2.0, abs=1e-3)  # nearly all weight on the clean row


def test_a_bad_objective_parameter_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="^parameter 'unlikelihood_alpha'") as err:
        ObjectiveConfig.resolve(None, objective="unlikelihood", unlikelihood_alpha=-1.0)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="^parameter 'bad_fraction'"):
        exp.PreferencesConfig.resolve("smoke", bad_fraction=1.5)
    with pytest.raises(ConfigError, match="^parameter 'variants'"):
        exp.PreferencesConfig.resolve("smoke", variants=["mle", "dpo"])
    with pytest.raises(ValueError, match="^filtering: expected a finite preference_threshold") as err:
        build_objective(ObjectiveConfig(objective="filtering"), None, 10)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="expected batches with a per-row 'score'"):
        Filtering(threshold=0.1)(tiny_model(), {"tokens": batch([0.0])["tokens"]}, None)


def test_mle_then_conditional_switches_at_the_feedback_fraction():
    tok = add_control_tokens(char_tokenizer(["abc"]))
    cfg = ObjectiveConfig(objective="mle_then_conditional", preference_threshold=0.1, feedback_fraction=0.25)
    sched = build_objective(cfg, tok, 100)
    assert [sched.phase_of(i) for i in (0, 74, 75, 99)] == [0, 0, 1, 1]
    assert sched.phases[1][0].name == "conditional"


# --- the experiment's data and metrics -------------------------------------------------------

def segments(scores, L=6):
    ids = torch.arange(len(scores) * L).reshape(len(scores), L) % 5 + 4
    return Segments(ids, np.asarray(scores, dtype=float), [f"f{i}.py" for i in range(len(scores))],
                    ["x = 1\n"] * len(scores))


def data_for(scores, threshold):
    tok = add_control_tokens(char_tokenizer(["abcdefgh = 1\n"]))
    seg = segments(scores)
    return exp.PreferenceData(tok, seg, seg, threshold, {}, {})


def test_filtering_keeps_the_token_budget():
    data = data_for([0.0, 0.5, 0.01, 0.9, 0.02, 0.0], threshold=0.05)
    mle = exp.ScoredBatches(exp.training_segments(data, "mle"), data.eos_id)
    kept = exp.ScoredBatches(exp.training_segments(data, "filtering"), data.eos_id)
    for index in range(5):
        a, b = mle.batch(index, 4, 0), kept.batch(index, 4, 0)
        assert a["tokens"].shape == b["tokens"].shape  # the same tokens per step
        assert (b["score"] <= 0.05).all()
        assert (b["tokens"][:, 0] == data.eos_id).all()


def test_scored_batches_are_a_pure_function_of_seed_and_index():
    data = data_for([0.0, 0.5, 0.01], threshold=0.05)
    src = exp.ScoredBatches(data.train, data.eos_id)
    assert torch.equal(src.batch(3, 2, 7)["tokens"], src.batch(3, 2, 7)["tokens"])


def test_control_tokens_are_excluded_from_the_heldout_loss():
    tok = add_control_tokens(char_tokenizer(["abcdefgh = 1\n"]))
    good, bad = control_ids(tok)
    ids = torch.randint(4, tok.vocab_size - 2, (5, 7), generator=torch.Generator().manual_seed(0))
    inputs_good, labels_good = exp.heldout_rows(ids, good)
    inputs_eos, labels_eos = exp.heldout_rows(ids, tok.eos_id)
    assert torch.equal(labels_good, labels_eos)  # the same targets whatever the start token
    scored = labels_good[labels_good != -100]
    assert len(scored) == 5 * 6 and not ({good, bad, tok.eos_id} & set(scored.tolist()))
    assert (inputs_good[:, 0] == good).all() and torch.equal(inputs_good[:, 1:], inputs_eos[:, 1:])
    model = tiny_model(vocab=tok.vocab_size)
    loss, n = exp.heldout_loss(model, ids, good, batch_size=2)
    assert n == 30 and math.isfinite(loss)


def test_the_start_token_follows_the_variant():
    data = data_for([0.0], threshold=0.05)
    good, _ = control_ids(data.tokenizer)
    assert data.start_id("conditional") == good == data.start_id("mle_then_conditional")
    assert data.start_id("mle") == data.eos_id == data.start_id("filtering")
    assert set(exp.VARIANTS) >= {"mle", "filtering", "conditional", "unlikelihood", "rwr", "mle_then_conditional"}
    assert CONTROL_TOKENS == ("<|good|>", "<|bad|>")


def test_models_trained_and_evaluated_side_by_side_match_one_at_a_time():
    data = data_for([0.0, 0.5, 0.01, 0.9, 0.02, 0.0], threshold=0.05)
    data.clean.update(dev=data.train, test=data.train)
    data.prompts.update(dev=data.train, test=data.train)
    base = dict(n_layer=1, n_head=2, d_model=16, seq_len=6, max_seq_len=16, batch_size=2, steps=3, warmup_steps=1,
                seeds=[0, 1], variants=["mle", "conditional"], n_samples=3, sample_tokens=4, n_prompts=2,
                prompt_tokens=2, eval_every=3, eval_batches=1, log_every=1, checkpoint_every=3)
    out = {}
    for workers in (1, 2):
        cfg = exp.PreferencesConfig.resolve("smoke", **base, workers=workers)
        models, results = exp.train_all(cfg, data)
        evals, untrained = exp.evaluate_all(cfg, data, models, temperature=1.0)
        out[workers] = models, results, evals, untrained
    (m1, r1, e1, u1), (m2, r2, e2, u2) = out[1], out[2]
    assert list(m1) == list(m2) == [("mle", 0), ("conditional", 0), ("mle", 1), ("conditional", 1)]
    for key in m1:
        a, b = m1[key].state_dict(), m2[key].state_dict()
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), key
        assert r1[key].steps == r2[key].steps == 3
        assert e1[key]["heldout_loss"] == pytest.approx(e2[key]["heldout_loss"], abs=1e-5)
    assert set(u1) == set(u2) == {("eos", 0), ("good", 0), ("eos", 1), ("good", 1)}
    first = lambda key: next(iter(m1[key].state_dict().values()))
    assert not torch.equal(first(("mle", 0)), first(("mle", 1)))  # the seeds are different models
