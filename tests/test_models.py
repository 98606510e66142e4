import pytest
import torch

from lablib.config import ModelConfig
from lablib.models import Transformer, build_mask


def make(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, n_layer=2, n_head=2, d_model=32, max_seq_len=16)
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg)).eval()


def changed_positions(model, x, position, **kw):
    """Which output positions change when the token at `position` changes."""
    y = x.clone()
    y[0, position] = (y[0, position] + 1) % model.cfg.vocab_size
    with torch.no_grad():
        diff = (model(x, **kw) - model(y, **kw)).abs().amax(-1)[0]
    return set(torch.nonzero(diff > 1e-6).flatten().tolist())


x = torch.randint(0, 50, (1, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope", "none"])
def test_causal_mask_hides_the_future(pos):
    model = make(pos=pos)
    assert changed_positions(model, x, 6, mask="causal") == {6, 7, 8, 9}


def test_bidirectional_mask_sees_everything():
    assert changed_positions(make(), x, 6, mask="bidirectional") == set(range(10))


def test_prefix_mask_is_bidirectional_inside_the_prefix_and_causal_after():
    model = make()
    prefix = torch.tensor([5])
    assert changed_positions(model, x, 3, mask="prefix", prefix_len=prefix) == set(range(10))
    assert changed_positions(model, x, 7, mask="prefix", prefix_len=prefix) == {7, 8, 9}


def test_custom_mask_is_respected():
    allowed = torch.eye(10, dtype=torch.bool)  # each position sees only itself
    assert changed_positions(make(), x, 4, attn_mask=allowed) == {4}


def test_build_mask_shapes():
    m = build_mask("prefix", 4, torch.device("cpu"), prefix_len=torch.tensor([2, 0]))
    assert m.shape == (2, 1, 4, 4)
    assert m[0, 0].tolist() == [[True, True, False, False], [True, True, False, False],
                                [True, True, True, False], [True, True, True, True]]
    assert torch.equal(m[1, 0], torch.ones(4, 4, dtype=torch.bool).tril())


def test_nope_bidirectional_model_is_permutation_equivariant():
    model = make(pos="none")
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, out_perm = model(x, mask="bidirectional"), model(x[:, perm], mask="bidirectional")
    assert torch.allclose(out[:, perm], out_perm, atol=1e-5)


def test_rope_attention_scores_depend_only_on_relative_position():
    model = make(pos="rope", n_layer=1)
    tokens = torch.tensor([[3, 4]])
    scores = []
    for shift in (0, 5):
        seq = torch.cat([torch.zeros(1, shift, dtype=torch.long), tokens], 1)
        _, cache = model.run_with_cache(seq, names=["blocks.0.attn.hook_attn_scores"], mask="bidirectional")
        s = cache["blocks.0.attn.hook_attn_scores"][0, :, shift + 1, shift]
        scores.append(s)
    # the first block's input at a token is position-free under RoPE, so q.k depends on the offset only
    assert torch.allclose(scores[0], scores[1], atol=1e-5)


def test_tied_and_untied_heads():
    tied, untied = make(tie_embeddings=True), make(tie_embeddings=False)
    assert tied.unembed.weight is tied.embed.weight
    assert untied.unembed.weight is not untied.embed.weight
    assert untied.num_params() - tied.num_params() == 50 * 32


def test_hook_names_follow_transformerlens():
    names = set(make().hook_points())
    for n in ["hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre", "blocks.0.attn.hook_pattern",
              "blocks.0.attn.hook_q", "blocks.0.attn.hook_z", "blocks.1.hook_resid_post", "blocks.1.mlp.hook_post",
              "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out", "hook_final"]:
        assert n in names


def test_run_with_cache_returns_every_activation_with_the_right_shapes():
    model = make()
    logits, cache = model.run_with_cache(x)
    assert logits.shape == (1, 10, 50)
    assert cache["blocks.0.attn.hook_pattern"].shape == (1, 2, 10, 10)
    assert cache["blocks.1.hook_resid_post"].shape == (1, 10, 32)
    assert torch.allclose(cache["blocks.0.attn.hook_pattern"].sum(-1), torch.ones(1, 2, 10))
    assert cache["blocks.0.attn.hook_pattern"][0, 0].triu(1).abs().max() == 0  # causal
    with torch.no_grad():
        assert torch.allclose(model(x), logits, atol=1e-5)  # the explicit-pattern path equals SDPA


def test_hooks_can_replace_activations_and_are_removed_afterwards():
    model = make()
    with torch.no_grad():
        clean = model(x)
        with model.hooks([("blocks.1.hook_resid_post", lambda act, name: torch.zeros_like(act))]):
            zeroed = model(x)
        after = model(x)
    assert torch.allclose(zeroed, model.unembed(model.ln_final(torch.zeros(1, 10, 32))))
    assert torch.equal(clean, after)
    assert not any(p.active for p in model.hook_points().values())


def test_unknown_hook_name_is_a_clear_error():
    with pytest.raises(KeyError, match="no hook point matches 'blocks.9.nope'"):
        with make().hooks([("blocks.9.nope", lambda a, n: None)]):
            pass


def test_sequence_longer_than_max_is_refused():
    with pytest.raises(ValueError, match="longer than max_seq_len=16"):
        make()(torch.zeros(1, 17, dtype=torch.long))


def test_embeds_input_matches_token_input():
    model = make(pos="rope")
    with torch.no_grad():
        assert torch.allclose(model(x), model(embeds=model.embed(x)), atol=1e-6)


def test_parameter_count_and_flops():
    model = make()
    d, L, V, T = 32, 2, 50, 16
    per_block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    assert model.num_params() == V * d + T * d + L * per_block + 2 * d
    n = model.num_params() - T * d
    assert model.flops_per_token(16) == 6 * n + 12 * L * 2 * 16 * 16


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope", "none"])
def test_explicit_positions_match_the_default_and_shift_with_the_ids(pos):
    model = make(pos=pos)
    default = torch.arange(10)
    with torch.no_grad():
        assert torch.allclose(model(x), model(x, positions=default), atol=1e-6)
        assert torch.allclose(model(x), model(x, positions=default[None].expand(1, 10)), atol=1e-6)
        shifted = model(x[:, 4:], positions=torch.arange(4, 10))  # the suffix at its original positions
        restarted = model(x[:, 4:])
    if pos == "none":
        assert torch.allclose(shifted, restarted, atol=1e-6)
    elif pos == "rope":  # relative: a causal suffix only sees relative offsets, so the ids do not matter
        assert torch.allclose(shifted, restarted, atol=1e-5)
    else:
        assert not torch.allclose(shifted, restarted, atol=1e-4)


def test_out_of_range_positions_are_refused():
    model = make(pos="learned")
    with pytest.raises(ValueError, match="max_seq_len"):
        model(x, positions=torch.arange(10) + 10)
    with pytest.raises(ValueError, match="positions"):
        model(x, positions=torch.arange(9))


def test_the_registry_builds_only_registered_classes_from_checked_config_values():
    from lablib.config import ConfigError
    from lablib.models import MODELS, MultiTokenConfig, build_registered, register_model

    assert {"Transformer", "EncoderDecoder", "MultiTokenTransformer", "FutureTokenTransformer"} <= set(MODELS)
    model = build_registered("MultiTokenTransformer", {"vocab_size": 11, "n_layer": 2, "n_head": 1, "d_model": 8,
                                                       "max_seq_len": 4, "n_future": 3})
    assert isinstance(model.cfg, MultiTokenConfig) and len(model.future_heads) == 2
    for name, config, message in [
        ("HookPoint", {}, "'HookPoint' is not a registered lab model class"),
        ("Transformer", {"n_future": 2}, "'n_future' is not a field of ModelConfig"),
        ("Transformer", {"n_layer": True}, "parameter 'n_layer': expected an integer, got True"),
        ("Transformer", {"d_model": 10, "n_head": 4}, "expected a multiple of n_head=4"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build_registered(name, config, "m.json")
    with pytest.raises(TypeError, match="declares config_class"):
        register_model(type("Loose", (torch.nn.Module,), {}))


def test_generate_draws_what_the_full_forward_pass_would():
    """The head reads the last position only; the draws equal sampling from the full logits, past max_seq_len too."""
    model = make(pos="rope")
    prompt = torch.randint(0, 50, (6, 3), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model.generate(prompt, 20, temperature=0.7, top_k=10, generator=torch.Generator().manual_seed(3))
        idx, gen = prompt, torch.Generator().manual_seed(3)
        for _ in range(20):
            logits = model(idx[:, -model.cfg.max_seq_len:], mask="causal")[:, -1].float() / 0.7
            v, _ = torch.topk(logits, 10)
            logits[logits < v[:, [-1]]] = float("-inf")
            idx = torch.cat([idx, torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)], dim=1)
    assert out.shape == (6, 23) and torch.equal(out, idx)
