import math

import numpy as np
import pytest

from lablib.ngram import BigramLM, UnigramLM, fit_on_dev, heldout_baselines

STREAM = [0, 1, 0, 1, 2]  # counts 0:2 1:2 2:1; pairs (0,1) x2, (1,0), (1,2)


def test_add_k_unigram_matches_the_hand_computed_loss():
    lm = UnigramLM.fit(STREAM, vocab_size=3, k=1.0)
    np.testing.assert_allclose(lm.probs(), [3 / 8, 3 / 8, 2 / 8])
    assert lm.nll([0, 2]) == pytest.approx(-(math.log(3 / 8) + math.log(2 / 8)) / 2)


def test_an_unseen_token_keeps_probability_k_over_n_plus_kv():
    lm = UnigramLM.fit(STREAM, vocab_size=4, k=0.5)
    assert lm.probs()[3] == pytest.approx(0.5 / (5 + 0.5 * 4))
    assert lm.probs().sum() == pytest.approx(1.0)


def test_interpolated_bigram_matches_the_hand_computed_loss_on_block_targets():
    lm = BigramLM.fit(STREAM, vocab_size=3, lam=0.5, k=1.0)
    # p(1|0) = .5*2/2 + .5*3/8; p(2|1) = .5*1/2 + .5*2/8; context 2 never seen: p(0|2) = 3/8; p(2|0) = .5*2/8
    expected = [0.5 + 0.5 * 3 / 8, 0.25 + 0.5 * 2 / 8, 3 / 8, 0.5 * 2 / 8]
    blocks = np.array([[0, 1, 2], [2, 0, 2]])  # targets (0->1), (1->2) | (2->0), (0->2)
    assert lm.nll_blocks(blocks) == pytest.approx(-np.mean(np.log(expected)))


def test_bigram_conditionals_sum_to_one_for_every_context():
    rng = np.random.default_rng(0)
    lm = BigramLM.fit(rng.integers(0, 6, size=200), vocab_size=7, lam=0.8, k=0.1)
    for prev in range(7):
        assert lm.prob(np.full(7, prev), np.arange(7)).sum() == pytest.approx(1.0)


def test_block_scoring_never_pairs_tokens_across_blocks():
    lm = BigramLM.fit(STREAM, vocab_size=3, lam=0.5, k=1.0)
    assert lm.nll_blocks(np.array([[0, 1], [1, 2]])) == pytest.approx(lm.nll_pairs([0, 1], [1, 2]))


def test_smoothing_is_chosen_on_the_dev_part_of_the_training_tokens():
    stream = [0, 1] * 500  # fully predictable from the previous token; token 2 never appears
    models = fit_on_dev(stream, vocab_size=3, dev_fraction=0.1)
    assert models.bigram.lam == 0.99 and models.unigram.k == 0.001
    assert models.dev_tokens == 100
    assert models.unigram.counts.tolist() == [500, 500, 0]  # refit on every training token
    assert set(models.dev_losses["bigram"]) >= {0.5, 0.99}


def test_heldout_baselines_score_exactly_the_causal_lm_targets():
    rng = np.random.default_rng(1)
    train = rng.integers(0, 5, size=(40, 9))
    heldout = rng.integers(0, 5, size=(4, 9))
    out = heldout_baselines(train, heldout, vocab_size=8)
    models = fit_on_dev(train, 8)
    assert out["chance"] == pytest.approx(math.log(8))
    assert out["unigram"] == pytest.approx(models.unigram.nll(heldout[:, 1:]))
    assert out["bigram"] == pytest.approx(models.bigram.nll_blocks(heldout))
    assert out["tokens_scored"] == 4 * 8
    assert out["unigram"] < out["chance"]  # three vocabulary entries never occur


def test_bad_input_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 3\)"):
        UnigramLM.fit([0, 3], vocab_size=3)
    with pytest.raises(ValueError, match="k > 0"):
        UnigramLM.fit([0], vocab_size=3, k=0)
    with pytest.raises(ValueError, match="dev_fraction"):
        fit_on_dev([0, 1, 2], vocab_size=3, dev_fraction=0.1)
