import math

import pytest
import torch
import torch.nn.functional as F

from lablib.objectives import IGNORE, CausalLM, MaskedLM, PrefixLM, ObjectiveConfig, build_objective, build_objective_named, mask_tokens


class RecordingModel(torch.nn.Module):
    """Returns fixed logits and records how it was called."""

    def __init__(self, vocab=5):
        super().__init__()
        self.vocab, self.calls = vocab, []

    def forward(self, idx, **kw):
        self.calls.append((idx.clone(), kw))
        torch.manual_seed(0)
        return torch.randn(*idx.shape, self.vocab)


def test_causal_lm_loss_is_next_token_cross_entropy():
    model = RecordingModel()
    tokens = torch.tensor([[1, 2, 3, 4]])
    loss, metrics = CausalLM()(model, {"tokens": tokens}, torch.Generator())
    idx, kw = model.calls[0]
    assert idx.tolist() == [[1, 2, 3]] and kw["mask"] == "causal"
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 5)
    manual = -sum(torch.log_softmax(logits[0, i], -1)[t] for i, t in enumerate([2, 3, 4])) / 3
    assert math.isclose(float(loss), float(manual), rel_tol=1e-6)
    assert metrics["tokens_scored"] == 3


def test_prefix_lm_scores_only_targets_after_the_prefix():
    model = RecordingModel()
    tokens = torch.arange(1, 7)[None].remainder(5)  # 6 tokens -> 5 inputs
    gen = torch.Generator().manual_seed(3)
    loss, metrics = PrefixLM()(model, {"tokens": tokens}, gen)
    prefix = int(model.calls[0][1]["prefix_len"][0])
    assert model.calls[0][1]["mask"] == "prefix"
    # input position i predicts token i+1; positions i < prefix-1 predict tokens inside the prefix
    assert metrics["tokens_scored"] == 5 - (prefix - 1)
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 5)
    targets = tokens[0, 1:]
    manual = F.cross_entropy(logits[0, prefix - 1:], targets[prefix - 1:])
    assert math.isclose(float(loss), float(manual), rel_tol=1e-6)


def test_mask_tokens_follows_80_10_10_and_never_masks_specials():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 1000, (200, 200), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = 3  # a special token
    inputs, labels = mask_tokens(tokens, 0.15, mask_id=2, vocab_size=1000, generator=gen, special_ids=(3,))
    chosen = labels != IGNORE
    assert not chosen[:, 0].any()
    assert abs(chosen.float().mean().item() - 0.15 * 199 / 200) < 0.005
    assert torch.equal(labels[chosen], tokens[chosen])
    as_mask = (inputs == 2) & chosen
    kept = (inputs == tokens) & chosen
    n = chosen.sum().item()
    assert abs(as_mask.sum().item() / n - 0.8) < 0.02
    assert abs(kept.sum().item() / n - (0.1 + 0.1 / 1000)) < 0.02  # 10% kept (+ random draws of the same token)
    assert torch.equal(inputs[~chosen], tokens[~chosen])


def test_masked_lm_loss_is_cross_entropy_on_chosen_positions_with_bidirectional_attention():
    model = RecordingModel(vocab=50)
    tokens = torch.randint(4, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    objective = MaskedLM(mask_id=2, vocab_size=50, mask_ratio=0.5)
    loss, metrics = objective(model, {"tokens": tokens}, torch.Generator().manual_seed(5))
    _, labels = mask_tokens(tokens[:, :-1], 0.5, 2, 50, torch.Generator().manual_seed(5))
    assert model.calls[0][1]["mask"] == "bidirectional"
    torch.manual_seed(0)
    logits = torch.randn(2, 8, 50)
    manual = F.cross_entropy(logits.reshape(-1, 50), labels.reshape(-1), ignore_index=IGNORE)
    assert math.isclose(float(loss), float(manual), rel_tol=1e-6)
    assert metrics["tokens_scored"] == int((labels != IGNORE).sum())


def test_same_generator_seed_gives_same_masks():
    tokens = torch.randint(4, 50, (4, 32), generator=torch.Generator().manual_seed(0))
    a = mask_tokens(tokens, 0.3, 2, 50, torch.Generator().manual_seed(9))
    b = mask_tokens(tokens, 0.3, 2, 50, torch.Generator().manual_seed(9))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_objective_table_refuses_unknown_names():
    assert build_objective(ObjectiveConfig.resolve("smoke"), None, 1).name == "clm"
    with pytest.raises(ValueError, match="objective: expected one of"):
        build_objective_named("telepathy", ObjectiveConfig(), None, 1)
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskedLM(mask_id=1, vocab_size=10, mask_ratio=1.5)
