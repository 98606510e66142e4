"""GPT-2 <-> the lab's Transformer: import and export weights, exactly.

Notable here:
- GPT-2 is one configuration of `lablib.models.Transformer`: learned positions,
  pre-norm LayerNorm (eps 1e-5, with biases), GELU with the tanh approximation
  (GPT-2's "gelu_new"), biases in every Linear and a tied unembedding. The lab's
  fused q/k/v projection has GPT-2's layout ([q | k | v], heads contiguous inside
  each), so import is a renaming plus one transpose: GPT-2 stores its projections
  as `Conv1D` with (in, out) weights where `nn.Linear` keeps (out, in).
- `WEIGHT_MAP` is the whole correspondence, one row per tensor; import and export
  both read it.
- `from_gpt2(hf_model)` / `to_gpt2(model)` convert in memory; `load_gpt2(folder)`
  reads a GPT-2-family checkpoint folder already on disk (`save_pretrained`
  output: config.json + weights) and never downloads anything.
  `load_gpt2_tokenizer(folder)` reads its tokenizer (tokenizer.json, or GPT-2's
  vocab.json + merges.txt) with the `tokenizers` library, exposing what the
  lab's analyses use (`encode`, `decode`, `token_strings`, `eos_id`), so
  `lablib.interp.analysis.analyze_prompt(model, tokenizer, text)` works on GPT-2.
- GPT-2 variants the lab's model cannot express exactly (cross-attention,
  attention scaled by 1/layer, unscaled attention, an unknown activation) are
  refused with a one-line error instead of converted approximately.
- `transformers` is an optional dependency (the `dev` extra); it is imported only
  inside these functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lablib.config import ConfigError, ModelConfig
from lablib.models import Transformer

# GPT-2's activation_function -> the lab's activation name (both sides compute the same function).
ACTIVATION_FROM_GPT2 = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                        "relu": "relu", "silu": "silu", "swish": "silu"}
ACTIVATION_TO_GPT2 = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}

# (lab name, GPT2LMHeadModel name, transposed?) ; "{i}" stands for the block index.
# Conv1D keeps weights as (in, out), nn.Linear as (out, in): those rows are transposed.
WEIGHT_MAP: list[tuple[str, str, bool]] = [
    ("embed.weight", "transformer.wte.weight", False),
    ("pos_embed.weight", "transformer.wpe.weight", False),
    ("blocks.{i}.ln1.weight", "transformer.h.{i}.ln_1.weight", False),
    ("blocks.{i}.ln1.bias", "transformer.h.{i}.ln_1.bias", False),
    ("blocks.{i}.attn.c_attn.weight", "transformer.h.{i}.attn.c_attn.weight", True),
    ("blocks.{i}.attn.c_attn.bias", "transformer.h.{i}.attn.c_attn.bias", False),
    ("blocks.{i}.attn.c_proj.weight", "transformer.h.{i}.attn.c_proj.weight", True),
    ("blocks.{i}.attn.c_proj.bias", "transformer.h.{i}.attn.c_proj.bias", False),
    ("blocks.{i}.ln2.weight", "transformer.h.{i}.ln_2.weight", False),
    ("blocks.{i}.ln2.bias", "transformer.h.{i}.ln_2.bias", False),
    ("blocks.{i}.mlp.c_fc.weight", "transformer.h.{i}.mlp.c_fc.weight", True),
    ("blocks.{i}.mlp.c_fc.bias", "transformer.h.{i}.mlp.c_fc.bias", False),
    ("blocks.{i}.mlp.c_proj.weight", "transformer.h.{i}.mlp.c_proj.weight", True),
    ("blocks.{i}.mlp.c_proj.bias", "transformer.h.{i}.mlp.c_proj.bias", False),
    ("ln_final.weight", "transformer.ln_f.weight", False),
    ("ln_final.bias", "transformer.ln_f.bias", False),
    ("unembed.weight", "lm_head.weight", False),
]


def weight_pairs(n_layer: int) -> list[tuple[str, str, bool]]:
    """WEIGHT_MAP with the block rows expanded for n_layer blocks."""
    rows = []
    for lab, hf, transposed in WEIGHT_MAP:
        layers = range(n_layer) if "{i}" in lab else [None]
        rows.extend((lab.format(i=i), hf.format(i=i), transposed) for i in layers)
    return rows


def config_from_gpt2(hf_config: Any) -> ModelConfig:
    """The lab's ModelConfig that computes what a transformers GPT2Config computes."""
    refusals = {
        "add_cross_attention": (getattr(hf_config, "add_cross_attention", False), "cross-attention"),
        "scale_attn_by_inverse_layer_idx": (getattr(hf_config, "scale_attn_by_inverse_layer_idx", False),
                                            "attention scaled by 1/(layer+1)"),
        "scale_attn_weights": (not getattr(hf_config, "scale_attn_weights", True), "unscaled attention scores"),
    }
    for name, (present, what) in refusals.items():
        if present:
            raise ConfigError(f"GPT-2 config {name!r}: the lab's Transformer has no {what}; "
                              f"expected the GPT-2 default, got {getattr(hf_config, name)!r}")
    act = hf_config.activation_function
    if act not in ACTIVATION_FROM_GPT2:
        raise ConfigError(f"GPT-2 config 'activation_function': expected one of "
                          f"{', '.join(ACTIVATION_FROM_GPT2)}, got {act!r}")
    cfg = ModelConfig(vocab_size=hf_config.vocab_size, n_layer=hf_config.n_layer, n_head=hf_config.n_head,
                      d_model=hf_config.n_embd, d_mlp=hf_config.n_inner, max_seq_len=hf_config.n_positions,
                      mask="causal", pos="learned", tie_embeddings=bool(hf_config.tie_word_embeddings),
                      norm="layernorm", activation=ACTIVATION_FROM_GPT2[act], bias=True,
                      # the lab has one dropout rate; GPT-2's three are equal in every released checkpoint
                      dropout=float(hf_config.resid_pdrop), norm_eps=float(hf_config.layer_norm_epsilon))
    cfg.validate()
    return cfg


def gpt2_config(cfg: ModelConfig):
    """The transformers GPT2Config for a lab ModelConfig (refused where GPT-2 cannot express it)."""
    from transformers import GPT2Config

    needs = {"pos": "learned", "norm": "layernorm"}
    for name, value in needs.items():
        if getattr(cfg, name) != value:
            raise ConfigError(f"parameter {name!r}: GPT-2 needs {value!r}, got {getattr(cfg, name)!r}")
    if cfg.activation not in ACTIVATION_TO_GPT2:
        raise ConfigError(f"parameter 'activation': GPT-2 needs one of {', '.join(ACTIVATION_TO_GPT2)}, "
                          f"got {cfg.activation!r}")
    return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
                      n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.d_mlp,
                      activation_function=ACTIVATION_TO_GPT2[cfg.activation],
                      resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                      layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
                      bos_token_id=None, eos_token_id=None)


@torch.no_grad()
def from_gpt2(hf_model: torch.nn.Module) -> Transformer:
    """A lab Transformer (fp32, eval mode) holding the weights of a transformers GPT2LMHeadModel."""
    model = Transformer(config_from_gpt2(hf_model.config))
    hf_state = hf_model.state_dict()
    if "lm_head.weight" not in hf_state:  # older transformers leave the tied head out of state_dict
        hf_state = {**hf_state, "lm_head.weight": hf_state["transformer.wte.weight"]}
    lab_state = model.state_dict()
    for lab, hf, transposed in weight_pairs(model.cfg.n_layer):
        source = hf_state[hf].t() if transposed else hf_state[hf]
        if source.shape != lab_state[lab].shape:
            raise ValueError(f"GPT-2 tensor {hf} has shape {tuple(source.shape)}; "
                             f"the lab's {lab} expects {tuple(lab_state[lab].shape)}")
        lab_state[lab].copy_(source)
    return model.eval()


@torch.no_grad()
def to_gpt2(model: Transformer):
    """A transformers GPT2LMHeadModel (fp32, eval mode) holding the weights of a lab Transformer.

    A lab model without biases exports with zero biases, which computes the same function.
    """
    from transformers import GPT2LMHeadModel

    hf_model = GPT2LMHeadModel(gpt2_config(model.cfg))
    lab_state = model.state_dict()
    hf_state = hf_model.state_dict()
    for lab, hf, transposed in weight_pairs(model.cfg.n_layer):
        if lab not in lab_state:  # bias=False
            hf_state[hf].zero_()
            continue
        hf_state[hf].copy_(lab_state[lab].t() if transposed else lab_state[lab])
    return hf_model.eval()


def load_gpt2(folder: str | Path) -> Transformer:
    """A lab Transformer from a GPT-2-family checkpoint folder on disk (never downloads).

    `folder` is what `GPT2LMHeadModel.save_pretrained(folder)` wrote (config.json and
    model.safetensors or pytorch_model.bin).
    """
    from transformers import GPT2LMHeadModel

    return from_gpt2(load_local_hf(GPT2LMHeadModel, folder, "GPT-2"))


def load_local_hf(model_class, folder: str | Path, family: str):
    """A `transformers` model of `model_class` from a save_pretrained folder on disk, in float32 (never downloads)."""
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{family} checkpoint {str(folder)!r}: expected a folder holding config.json "
                                "(the output of save_pretrained); nothing is downloaded")
    return model_class.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)


class GPT2Tokenizer:
    """A GPT-2 checkpoint's byte-level BPE with the interface `lablib.interp.analysis` reads.

    Unlike `lablib.data.Tokenizer` it has no <pad>/<unk>/<mask> tokens (GPT-2 never had
    them); `eos_id` is GPT-2's <|endoftext|>.
    """

    def __init__(self, backend, eos_token: str = "<|endoftext|>"):
        self.backend = backend
        self.eos_id = backend.token_to_id(eos_token)
        if self.eos_id is None:
            raise ValueError(f"GPT-2 tokenizer: expected the end-of-text token {eos_token!r} in its vocabulary")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids))

    def token_strings(self, ids) -> list[str]:
        return [self.backend.decode([i], skip_special_tokens=False) for i in ids]


def load_gpt2_tokenizer(folder: str | Path) -> GPT2Tokenizer:
    """The tokenizer saved beside a GPT-2 checkpoint: tokenizer.json, else vocab.json + merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path = Path(folder).expanduser()
    if (path / "tokenizer.json").is_file():
        return GPT2Tokenizer(Tokenizer.from_file(str(path / "tokenizer.json")))
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        backend = Tokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        return GPT2Tokenizer(backend)
    raise FileNotFoundError(f"GPT-2 tokenizer in {str(folder)!r}: expected tokenizer.json, or vocab.json and merges.txt")
