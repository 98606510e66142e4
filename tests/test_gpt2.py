"""The lab's Transformer is GPT-2: logits, loss and gradients match transformers' GPT2LMHeadModel.

The GPT-2 model is a small random one built from a GPT2Config (nothing is downloaded).
Tolerance 1e-4 in fp32: both sides run the same operations in a different order
(fused vs split projections, Linear vs Conv1D's addmm), so they differ by float32
rounding, about 1e-7 here; 1e-4 leaves room for other BLAS builds and still fails
on any real mismatch (a LayerNorm eps of 1e-3 instead of 1e-5 alone moves logits by 0.2).
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lablib.config import ConfigError, ModelConfig  # noqa: E402
from lablib.gpt2 import from_gpt2, gpt2_config, load_gpt2, load_gpt2_tokenizer, to_gpt2, weight_pairs  # noqa: E402
from lablib.models import Transformer  # noqa: E402
from lablib.objectives import CausalLM  # noqa: E402

ATOL = 1e-4


def small_gpt2(**overrides):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=97, n_positions=24, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=None, eos_token_id=None, **overrides)
    return transformers.GPT2LMHeadModel(config).eval()


def tokens(batch=3, length=17, vocab=97):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def test_imported_model_has_gpt2_logits():
    hf = small_gpt2()
    lab = from_gpt2(hf)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(lab(x), hf(x).logits, atol=ATOL, rtol=0)


def test_imported_model_has_gpt2_loss_and_gradients():
    hf = small_gpt2()
    lab = from_gpt2(hf)
    batch = tokens(length=18)
    lab_loss, _ = CausalLM()(lab, {"tokens": batch}, torch.Generator())
    hf_loss = hf(batch, labels=batch).loss  # transformers shifts the labels inside
    lab_loss.backward()
    hf_loss.backward()
    torch.testing.assert_close(lab_loss, hf_loss, atol=ATOL, rtol=0)
    lab_params, hf_params = dict(lab.named_parameters(remove_duplicate=False)), dict(hf.named_parameters(remove_duplicate=False))
    for lab_name, hf_name, transposed in weight_pairs(lab.cfg.n_layer):
        hf_grad = hf_params[hf_name].grad
        torch.testing.assert_close(lab_params[lab_name].grad, hf_grad.t() if transposed else hf_grad,
                                   atol=ATOL, rtol=0, msg=lambda m, n=lab_name: f"{n}: {m}")


def test_gpt2_variants_map_to_lab_settings():
    lab = from_gpt2(small_gpt2(activation_function="relu", n_inner=48, tie_word_embeddings=False))
    assert (lab.cfg.activation, lab.cfg.d_mlp, lab.cfg.tie_embeddings) == ("relu", 48, False)
    assert lab.unembed.weight is not lab.embed.weight


def test_untied_head_imports_exactly():
    hf = small_gpt2(tie_word_embeddings=False, activation_function="gelu")
    lab = from_gpt2(hf)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(lab(x), hf(x).logits, atol=ATOL, rtol=0)


def test_export_round_trip_gives_identical_weights_and_logits():
    torch.manual_seed(0)
    lab = Transformer(ModelConfig(vocab_size=61, n_layer=2, n_head=2, d_model=16, max_seq_len=20,
                                  activation="gelu_tanh")).eval()
    hf = to_gpt2(lab)
    x = tokens(vocab=61)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, lab(x), atol=ATOL, rtol=0)
    back = from_gpt2(hf)
    for name, tensor in lab.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, atol=0, rtol=0)


def test_model_without_biases_exports_with_zero_biases():
    torch.manual_seed(0)
    lab = Transformer(ModelConfig(vocab_size=61, n_layer=1, n_head=2, d_model=16, max_seq_len=20,
                                  activation="gelu_tanh", bias=False)).eval()
    x = tokens(vocab=61)
    with torch.no_grad():
        torch.testing.assert_close(to_gpt2(lab)(x).logits, lab(x), atol=ATOL, rtol=0)


def test_checkpoint_folder_on_disk_loads(tmp_path):
    hf = small_gpt2()
    hf.save_pretrained(tmp_path / "gpt2-tiny")
    lab = load_gpt2(tmp_path / "gpt2-tiny")
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(lab(x), hf(x).logits, atol=ATOL, rtol=0)


def test_checkpoint_on_disk_is_analysed_with_the_lab_tools(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lablib.interp.analysis import analyze_prompt

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20, trainers.BpeTrainer(
        vocab_size=97, special_tokens=["<|endoftext|>"], show_progress=False))  # ids fit the model's 97
    folder = tmp_path / "gpt2-tiny"
    small_gpt2().save_pretrained(folder)
    backend.save(str(folder / "tokenizer.json"))
    model, tokenizer = load_gpt2(folder), load_gpt2_tokenizer(folder)
    analysis = analyze_prompt(model, tokenizer, "def f(x):")
    assert "".join(analysis.tokens) == "def f(x):"
    assert analysis.attention.shape[:2] == (2, 4)  # layers, heads of the GPT-2 config


def test_missing_checkpoint_folder_is_refused_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_gpt2(tmp_path / "nowhere")


def test_gpt2_variant_without_lab_equivalent_is_refused():
    with pytest.raises(ConfigError, match="scale_attn_by_inverse_layer_idx"):
        from_gpt2(small_gpt2(scale_attn_by_inverse_layer_idx=True))


def test_lab_model_without_gpt2_equivalent_is_refused():
    with pytest.raises(ConfigError, match="'pos'"):
        gpt2_config(ModelConfig(pos="rope"))
