"""Causal tracing and single-layer edits."""

import numpy as np
import pytest
import torch

from lablib.config import ModelConfig
from lablib.models import Transformer
from lablib.interp.tracing import (SITES, edit_layer, edit_scores, embedding_noise_std, rank_one_edit,
                                   restored_probability, site_name, subject_positions, trace_fact)

IDS = [3, 7, 8, 11, 12, 13, 14]
SUBJECT = [1, 2]
TARGET = 9


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=20, n_layer=3, n_head=2, d_model=32, max_seq_len=16)).eval()


def test_without_noise_restoring_anything_has_zero_effect(model):
    trace = trace_fact(model, IDS, SUBJECT, TARGET, noise_std=0.0, n_samples=2)
    assert trace.p_corrupt == pytest.approx(trace.p_clean, abs=1e-6)
    for site in SITES:
        assert np.abs(trace.effect(site)).max() < 1e-6


def test_noise_changes_the_answer_probability(model):
    trace = trace_fact(model, IDS, SUBJECT, TARGET, noise_std=embedding_noise_std(model) * 10, n_samples=2)
    assert abs(trace.p_corrupt - trace.p_clean) > 1e-4


def test_restoring_every_layer_at_every_position_recovers_the_clean_answer(model):
    ids = torch.tensor(IDS)
    names = [site_name("resid", layer) for layer in range(3)]
    _, cache = model.run_with_cache(ids[None], names=names)
    clean = torch.softmax(model(ids[None])[0, -1], -1)[TARGET].item()
    noise = torch.randn(len(SUBJECT), 32, generator=torch.Generator().manual_seed(0)) * 5
    everything = [[(name, pos) for name in names for pos in range(len(IDS))]]
    nothing = [[]]
    assert restored_probability(model, ids, SUBJECT, TARGET, noise, everything, cache)[0] == pytest.approx(clean, abs=1e-6)
    assert restored_probability(model, ids, SUBJECT, TARGET, noise, nothing, cache)[0] != pytest.approx(clean, abs=1e-4)


def test_restoring_the_last_residual_state_at_the_last_position_is_full_recovery(model):
    trace = trace_fact(model, IDS, SUBJECT, TARGET, noise_std=embedding_noise_std(model) * 10, n_samples=2)
    assert trace.recovery("resid")[-1, -1] == pytest.approx(1.0, abs=1e-4)


def test_states_before_the_subject_carry_nothing_to_restore(model):
    trace = trace_fact(model, IDS, SUBJECT, TARGET, noise_std=embedding_noise_std(model) * 10, n_samples=2)
    for site in SITES:
        assert np.abs(trace.effect(site)[:, 0]).max() < 1e-6  # position 0 precedes the corrupted subject


def test_trace_grids_have_one_row_per_layer_and_one_column_per_token(model):
    trace = trace_fact(model, IDS, SUBJECT, TARGET, noise_std=1.0, n_samples=1, window=3)
    assert {s: a.shape for s, a in trace.restored.items()} == {s: (3, len(IDS)) for s in SITES}


def test_subject_positions_finds_the_subject_tokens():
    assert subject_positions([3, 5, 6, 7, 8], [6, 7]) == [2, 3]
    with pytest.raises(ValueError, match="do not occur"):
        subject_positions([3, 5], [9])


def test_an_edit_changes_only_the_chosen_layers_mlp_output_matrix(model):
    edited = edit_layer(model, 1, IDS, [TARGET], steps=3, lr=1e-2)
    changed = {name for (name, a), (_, b) in zip(model.named_parameters(), edited.named_parameters())
               if not torch.equal(a, b)}
    assert changed == {"blocks.1.mlp.c_proj.weight"}


def test_enough_edit_steps_make_the_new_answer_the_continuation(model):
    edited = edit_layer(model, 2, IDS, [TARGET, 4], steps=60, lr=5e-2)
    scores = edit_scores(edited, IDS, [TARGET, 4], others=[([3, 5], [6])])
    assert scores["success"] == 1.0
    assert 0.0 <= scores["specificity"] <= 1.0


def test_a_rank_one_edit_changes_one_matrix_by_a_rank_one_update(model):
    edited = rank_one_edit(model, 1, IDS, SUBJECT[-1], [TARGET], steps=3, lr=1e-2)
    changed = {name for (name, a), (_, b) in zip(model.named_parameters(), edited.named_parameters())
               if not torch.equal(a, b)}
    assert changed == {"blocks.1.mlp.c_proj.weight"}
    update = edited.blocks[1].mlp.c_proj.weight - model.blocks[1].mlp.c_proj.weight
    assert torch.linalg.matrix_rank(update, atol=1e-6).item() == 1


def test_a_rank_one_edit_at_the_last_token_installs_a_new_answer(model):
    # An untrained model barely reads the subject position from the last one, so edit the key there.
    edited = rank_one_edit(model, 1, IDS, len(IDS) - 1, [TARGET], steps=40, lr=5e-2)
    assert edit_scores(edited, IDS, [TARGET], others=[])["success"] == 1.0
