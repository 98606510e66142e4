"""The objectives suite on hand-checked small cases: what is masked, what each position
predicts, and that each loss equals the cross-entropy computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from lablib.config import ConfigError, ModelConfig
from lablib.experiments.objectives import ObjectivesRunConfig
from lablib.models import (EncoderDecoder, EncoderDecoderConfig, FutureTokenConfig, FutureTokenTransformer,
                           MultiTokenConfig, MultiTokenTransformer, Transformer)
from lablib.objectives import (GPTBERT, IGNORE, CausalLM, Contrastive, FutureTokenPrediction, MaskedLM, Mixture,
                               MultiTokenPrediction, ObjectiveBatches, ObjectiveConfig, PrefixLM, Schedule,
                               SpanCorruption, future_token_targets, info_nce, masked_next_token, pooled_embeddings,
                               random_segmentation, random_spans_noise_mask, span_corrupt)
from lablib.tasks.induction import InductionTask, induction_accuracy

V = 40
SMALL = dict(vocab_size=V, n_layer=2, n_head=2, d_model=16, max_seq_len=64)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def ce(logits, labels):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


def tokens(B=2, T=12, seed=0):
    return torch.randint(4, 30, (B, T + 1), generator=gen(seed))


# --- span corruption --------------------------------------------------------------------

def test_span_corrupt_replaces_each_span_with_one_sentinel_and_targets_restore_them():
    inputs, targets = span_corrupt([10, 11, 12, 13, 14, 15], [False, True, True, False, False, True], [100, 101], 3)
    assert inputs == [10, 100, 13, 14, 101]
    assert targets == [100, 11, 12, 101, 15, 3]


def test_span_corrupt_refuses_rows_needing_more_sentinels_than_exist():
    with pytest.raises(ValueError, match="n_sentinels"):
        span_corrupt([1, 2, 3, 4], [True, False, True, False], [100], 3)


def test_random_segmentation_splits_into_nonempty_runs_that_add_up():
    parts = random_segmentation(10, 4, gen())
    assert len(parts) == 4 and sum(parts) == 10 and min(parts) >= 1


def test_noise_mask_has_t5s_noise_count_and_span_count_and_never_starts_noisy():
    mask = random_spans_noise_mask(100, 0.15, 3.0, gen())
    spans = int((mask[1:] & ~mask[:-1]).sum())
    assert int(mask.sum()) == 15 and spans == 5 and not bool(mask[0])


def test_span_corruption_loss_on_encoder_decoder_matches_hand_computation():
    torch.manual_seed(0)
    model = EncoderDecoder(EncoderDecoderConfig(**SMALL)).eval()
    obj = SpanCorruption(sentinel_base=32, n_sentinels=8, eos_id=3, pad_id=0)
    batch = {"tokens": tokens(B=1)}
    inputs, targets = obj.corrupt(batch["tokens"][:, :-1], gen(1))
    logits = model(torch.tensor(inputs), torch.tensor([[0] + targets[0][:-1]]))
    expected = ce(logits, torch.tensor(targets))
    loss, metrics = obj(model, batch, gen(1))
    assert torch.allclose(loss, expected) and metrics["tokens_scored"] == len(targets[0])


def test_span_corruption_on_decoder_scores_only_the_targets_after_a_bidirectional_prefix():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SMALL)).eval()
    obj = SpanCorruption(sentinel_base=32, n_sentinels=8, eos_id=3)
    batch = {"tokens": tokens(B=1)}
    (inp,), (tgt,) = obj.corrupt(batch["tokens"][:, :-1], gen(1))
    seq = torch.tensor([inp + tgt])
    logits = model(seq[:, :-1], mask="prefix", prefix_len=torch.tensor([len(inp)]))
    expected = ce(logits[:, len(inp) - 1:], torch.tensor([tgt]))  # position len(inp)-1 predicts the first sentinel
    loss, metrics = obj(model, batch, gen(1))
    assert torch.allclose(loss, expected) and metrics["tokens_scored"] == len(tgt)


def test_prefix_lm_on_encoder_decoder_encodes_the_prefix_and_decodes_the_rest():
    torch.manual_seed(0)
    model = EncoderDecoder(EncoderDecoderConfig(**SMALL)).eval()
    batch = {"tokens": tokens()}
    cut = int(torch.randint(1, 12, (2,), generator=gen(2))[0])
    src, tgt = batch["tokens"][:, :cut], batch["tokens"][:, cut:]
    expected = ce(model(src, F.pad(tgt[:, :-1], (1, 0), value=0)), tgt)
    loss, metrics = PrefixLM(pad_id=0)(model, batch, gen(2))
    assert torch.allclose(loss, expected) and metrics["tokens_scored"] == tgt.numel()


# --- multi-token and future-token prediction -------------------------------------------------

def test_multi_token_head_k_is_scored_against_the_token_k_steps_further():
    torch.manual_seed(0)
    model = MultiTokenTransformer(MultiTokenConfig(**SMALL, n_future=3)).eval()
    batch = {"tokens": tokens()}
    t = batch["tokens"]
    heads = model.multi_token_logits(t[:, :-1])
    expected = torch.stack([ce(heads[k][:, : 12 - k], t[:, 1 + k:]) for k in range(3)]).mean()
    loss, metrics = MultiTokenPrediction()(model, batch, gen())
    assert torch.allclose(loss, expected) and metrics["tokens_scored"] == 24


def test_multi_token_model_forward_is_its_next_token_head():
    torch.manual_seed(0)
    model = MultiTokenTransformer(MultiTokenConfig(**SMALL, n_future=2)).eval()
    x = tokens()[:, :-1]
    assert torch.allclose(model(x, mask="causal"), model.multi_token_logits(x)[0], atol=1e-6)


def test_future_token_slots_read_token_t_plus_j_and_predict_t_plus_j_plus_1():
    slots, labels = future_token_targets(torch.tensor([[1, 2, 3, 4]]), 2, pad_id=0)
    assert slots.tolist() == [[[1, 2], [2, 3], [3, 4]]]
    assert labels.tolist() == [[[2, 3], [3, 4], [4, IGNORE]]]


def test_future_token_loss_weights_slot_j_by_gamma_to_the_j():
    torch.manual_seed(0)
    model = FutureTokenTransformer(FutureTokenConfig(**SMALL, n_future=3)).eval()
    batch = {"tokens": tokens()}
    slots, labels = future_token_targets(batch["tokens"], 3, 0)
    logits = model.future_logits(batch["tokens"][:, :-1], slots)
    w = torch.tensor([1.0, 0.5, 0.25]) / 1.75
    expected = sum(w[j] * ce(logits[:, :, j], labels[:, :, j]) for j in range(3))
    loss, _ = FutureTokenPrediction(gamma=0.5)(model, batch, gen())
    assert torch.allclose(loss, expected)


def test_future_token_model_next_token_is_decoder_slot_zero_and_causal():
    torch.manual_seed(0)
    model = FutureTokenTransformer(FutureTokenConfig(**SMALL, n_future=2)).eval()
    x = tokens()[:, :-1]
    changed = x.clone()
    changed[:, -1] = 5
    assert torch.allclose(model.next_token_logits(x)[:, :-1], model.next_token_logits(changed)[:, :-1], atol=1e-6)


# --- GPT-BERT ---------------------------------------------------------------------------

def test_masked_next_token_labels_position_i_with_the_masked_token_at_i_plus_1():
    t = tokens(B=4, T=30)
    inputs, labels = masked_next_token(t, 0.5, mask_id=2, vocab_size=V, generator=gen())
    x = t[:, :-1]
    scored = labels != IGNORE
    assert torch.equal(inputs[:, 0], x[:, 0]) and not scored[:, -1].any()
    assert torch.equal(labels[:, :-1][scored[:, :-1]], x[:, 1:][scored[:, :-1]])
    assert (inputs[:, 1:][scored[:, :-1]] == 2).float().mean() > 0.6  # mostly <mask>, as BERT's 80/10/10


def test_gpt_bert_mixes_causal_rows_and_masked_rows_by_row_fraction():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SMALL)).eval()
    batch = {"tokens": tokens(B=4)}
    t = batch["tokens"]
    causal = ce(model(t[:1, :-1], mask="causal"), t[:1, 1:])
    inputs, labels = masked_next_token(t[1:], 0.3, 2, V, gen(3))
    masked = ce(model(inputs, mask="bidirectional"), labels)
    loss, metrics = GPTBERT(mask_id=2, vocab_size=V, mask_ratio=0.3, causal_fraction=0.25)(model, batch, gen(3))
    assert torch.allclose(loss, 0.25 * causal + 0.75 * masked) and metrics["causal_rows"] == 1


# --- contrastive --------------------------------------------------------------------------

def test_info_nce_matches_the_hand_computed_value():
    e = torch.eye(2)
    assert math.isclose(float(info_nce(e, e, 1.0)), math.log(1 + math.exp(-1)), rel_tol=1e-6)


@pytest.mark.parametrize("mask", ["causal", "bidirectional"])
def test_pooled_embeddings_ignore_padding(mask):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SMALL)).eval()
    short = torch.tensor([[5, 6, 7]])
    padded = torch.tensor([[5, 6, 7, 0, 0]])
    assert torch.allclose(pooled_embeddings(model, short, 0, mask), pooled_embeddings(model, padded, 0, mask), atol=1e-5)


def test_contrastive_loss_is_info_nce_of_pooled_docstring_and_code():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SMALL)).eval()
    batch = {"tokens": tokens(), "doc_ids": torch.tensor([[5, 6, 0], [7, 8, 9]]), "code_ids": torch.tensor([[10, 11, 12], [13, 0, 0]])}
    expected = info_nce(pooled_embeddings(model, batch["doc_ids"], 0), pooled_embeddings(model, batch["code_ids"], 0), 0.1)
    loss, _ = Contrastive(pad_id=0, temperature=0.1)(model, batch, gen())
    assert torch.allclose(loss, expected)


def test_contrastive_without_pairs_says_what_the_batch_needs():
    with pytest.raises(ValueError, match="doc_ids"):
        Contrastive()(Transformer(ModelConfig(**SMALL)), {"tokens": tokens()}, gen())


# --- mixtures and schedules -----------------------------------------------------------------

def test_mixture_draws_from_the_generator_and_a_zero_weight_is_never_drawn():
    model = Transformer(ModelConfig(**SMALL))
    mix = Mixture({"clm": CausalLM(), "mlm": MaskedLM(2, V)}, {"clm": 1.0, "mlm": 0.0})
    draws = {mix(model, {"tokens": tokens()}, gen(s))[1]["component"] for s in range(10)}
    assert draws == {0}


def test_mixture_is_reproducible_for_a_seed():
    model = Transformer(ModelConfig(**SMALL))
    mix = Mixture({"clm": CausalLM(), "mlm": MaskedLM(2, V)}, {"clm": 1.0, "mlm": 1.0})
    picks = [[mix(model, {"tokens": tokens()}, gen(s))[1]["component"] for s in range(8)] for _ in range(2)]
    assert picks[0] == picks[1] and set(picks[0]) == {0, 1}


def test_biphasic_schedule_switches_at_the_split_and_evaluates_with_the_last_phase():
    sched = Schedule([(CausalLM(), 0.3), (MaskedLM(2, V), 0.7)], total_batches=10)
    assert [sched.phase_of(i) for i in range(10)] == [0, 0, 0] + [1] * 7
    assert sched.phase_of(None) == 1


def test_objective_batches_add_the_index_and_reproducible_pair_rows():
    class Blocks:
        def batch(self, index, batch_size, seed):
            return {"tokens": torch.zeros(batch_size, 3, dtype=torch.long)}

    src = ObjectiveBatches(Blocks(), {"doc_ids": torch.arange(20)[:, None], "code_ids": torch.arange(20)[:, None]})
    a, b = src.batch(7, 4, 0), src.batch(7, 4, 0)
    assert int(a["index"]) == 7 and torch.equal(a["doc_ids"], b["doc_ids"]) and torch.equal(a["doc_ids"], a["code_ids"])
    assert len(set(a["doc_ids"].flatten().tolist())) == 4


# --- configs and models ------------------------------------------------------------------

def test_mixture_weights_naming_an_unknown_objective_are_refused():
    with pytest.raises(ConfigError, match="mixture_weights"):
        ObjectiveConfig.resolve("cpu", objective="mixture", mixture_weights={"clm": 1.0, "bert": 1.0})


def test_encoder_decoder_refuses_objectives_it_cannot_train():
    with pytest.raises(ConfigError, match="encoder-decoder"):
        ObjectivesRunConfig.resolve("smoke", architecture="encdec", objective="mlm")


def test_encoder_decoder_decoder_is_causal_and_encoder_ignores_padding():
    torch.manual_seed(0)
    model = EncoderDecoder(EncoderDecoderConfig(**SMALL)).eval()
    src, tgt = torch.tensor([[5, 6, 7]]), torch.tensor([[0, 8, 9, 10]])
    out = model(src, tgt)
    later = tgt.clone()
    later[0, -1] = 11
    assert torch.allclose(model(src, later)[:, :-1], out[:, :-1], atol=1e-6)
    padded = torch.tensor([[5, 6, 7, 0, 0]])
    assert torch.allclose(model(padded, tgt, padded != 0), out, atol=1e-5)


# --- the induction task --------------------------------------------------------------------

def test_induction_rows_repeat_their_first_half_after_bos():
    task = InductionTask(vocab_size=10, half_len=5)
    t = task.batch(3, 4, seed=1)["tokens"]
    assert t.shape == (4, 11) and (t[:, 0] == 0).all() and torch.equal(t[:, 1:6], t[:, 6:])
    assert task.copy_positions().tolist() == [6, 7, 8, 9]


def test_induction_accuracy_is_one_for_a_model_that_copies():
    task = InductionTask(vocab_size=10, half_len=5)

    class Copier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, mask):  # at position i, predict x[i + 1 - half_len]: the copy
            return F.one_hot(torch.roll(x, shifts=task.half_len - 1, dims=1), 10).float()

    assert induction_accuracy(Copier(), task, n_rows=16) == 1.0
