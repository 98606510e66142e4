"""lablib.interp.analysis: attention, top-k, per-token loss, logit lens, probes, patching, checkpoint switching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lablib.interp.analysis import (CheckpointModel, activation_patching, analyze_prompt, attention_patterns, fit_probe,
                             logit_difference, logit_lens, per_token_loss, probe_layers, top_k_predictions)
from lablib.config import ModelConfig, TrainConfig
from lablib.data import TokenBlocks, char_tokenizer
from lablib.models import Transformer
from lablib.objectives import CausalLM
from lablib.runs import create_run
from lablib.train import train

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 0\n    y = 1\n" * 20


def tiny_model(seed: int = 0, vocab_size: int = 40) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab_size, n_layer=2, n_head=2, d_model=32, max_seq_len=32)).eval()


def make_tiny_run(path, steps: int = 8, checkpoint_every: int = 4):
    """A real run folder: char tokenizer, 2-layer model, `steps` steps of causal LM with checkpoints."""
    tok = char_tokenizer([TEXT])
    ids = torch.tensor(tok.encode(TEXT))
    blocks = TokenBlocks(ids[: len(ids) // 17 * 17].reshape(-1, 17))
    run = create_run("tiny", {"steps": steps}, path)
    tok.save(run.path / "tokenizer.json")
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, max_seq_len=32))
    cfg = TrainConfig(steps=steps, batch_size=8, seq_len=16, warmup_steps=1, log_every=1, eval_every=2,
                      checkpoint_every=checkpoint_every, learning_rate=3e-3, device="cpu", compile="off")
    train(model, CausalLM(), blocks, cfg, run, val=blocks.eval_batches(1, 8), progress=False)
    return run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("run") / "tiny")


def test_attention_rows_are_causal_distributions():
    pattern = attention_patterns(tiny_model(), torch.randint(0, 40, (3, 10)))
    assert pattern.shape == (3, 2, 2, 10, 10)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(3, 2, 2, 10))
    assert pattern.triu(diagonal=1).abs().max() == 0


def test_top_k_is_the_sorted_softmax():
    logits = torch.randn(2, 5, 40)
    probs, ids = top_k_predictions(logits, k=3)
    full = torch.softmax(logits, -1)
    torch.testing.assert_close(probs, full.gather(-1, ids))
    assert (probs[..., :-1] >= probs[..., 1:]).all()
    assert torch.equal(ids[..., 0], full.argmax(-1))


def test_per_token_loss_averages_to_the_causal_lm_loss():
    model, tokens = tiny_model(), torch.randint(0, 40, (2, 12))
    logits = model(tokens)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 40), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(per_token_loss(logits, tokens).mean(), expected)


def test_logit_lens_last_layer_is_the_models_output():
    model, tokens = tiny_model(), torch.randint(0, 40, (2, 9))
    lens = logit_lens(model, tokens)
    assert lens.shape == (2, 3, 9, 40)
    torch.testing.assert_close(lens[:, -1], model(tokens))


def test_analyze_prompt_matches_the_single_analyses(tiny_run):
    checkpoint = CheckpointModel(tiny_run)
    model = checkpoint.at(8)
    text = "def add(a, b):"
    a = analyze_prompt(model, checkpoint.tokenizer, text, k=4)
    ids = torch.tensor([checkpoint.tokenizer.encode(text)])
    assert a.tokens == list(text) and a.attention.shape == (2, 2, len(text), len(text))
    np.testing.assert_allclose(a.attention, attention_patterns(model, ids)[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(a.token_loss[:-1], per_token_loss(model(ids), ids)[0].detach().numpy(), atol=1e-5)
    assert np.isnan(a.token_loss[-1]) and np.isnan(a.lens_next_prob[:, -1]).all()
    assert [row[0] for row in a.top_k_tokens] == a.lens_top_tokens[-1]


def test_switching_checkpoints_changes_the_analysis(tiny_run):
    checkpoint = CheckpointModel(tiny_run)
    assert checkpoint.steps() == [1, 2, 4, 8]
    early, late = checkpoint.analyze(1, "return a + b"), checkpoint.analyze(8, "return a + b")
    assert late.mean_loss < early.mean_loss


def test_probe_reads_a_linearly_encoded_feature():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    features = rng.normal(size=(400, 16)) + labels[:, None] * 2.0
    result = fit_probe(features, labels)
    assert result.test_accuracy > 0.95 > result.majority_baseline


def test_probe_layers_finds_token_identity_in_the_embedding():
    model = tiny_model()
    tokens = torch.randint(4, 40, (200, 6))
    table = probe_layers(model, tokens, (tokens[:, -1] % 2).numpy())
    assert list(table["layer"]) == ["embed", "block 0", "block 1"]
    assert table.loc[0, "test_accuracy"] > 0.9


def test_patching_the_differing_token_at_the_embedding_restores_the_clean_run():
    model = tiny_model()
    clean = torch.randint(4, 40, (8,))
    corrupted = clean.clone()
    corrupted[3] = (clean[3] + 1) % 40
    result = activation_patching(model, clean, corrupted, logit_difference(5, 6), site="resid_pre")
    assert result.effect.shape == (2, 8)
    assert result.restored[0, 3] == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(np.delete(result.effect[0], 3), 0.0, atol=1e-5)


def test_patching_refuses_prompts_of_different_lengths():
    with pytest.raises(ValueError, match="equal length"):
        activation_patching(tiny_model(), [1, 2, 3], [1, 2], logit_difference(1, 2))


def test_prompt_loss_by_step_has_one_row_per_checkpoint(tiny_run):
    table = CheckpointModel(tiny_run).prompt_loss_by_step("return a + b")
    assert list(table["step"]) == [1, 2, 4, 8]
    assert table["loss"].iloc[-1] < table["loss"].iloc[0]
