"""GPT-NeoX (Pythia) checkpoints -> the lab's Transformer and a run folder, exactly.

Notable here:
- GPT-NeoX is one configuration of `lablib.models.Transformer`: RoPE on a leading
  share of each head's channels (`rope_fraction`, Pythia: 0.25), parallel residual
  (`parallel_residual`), LayerNorm with biases, exact GELU and an untied unembedding.
- `WEIGHT_MAP` is the whole correspondence, one row per tensor. GPT-NeoX's fused
  `query_key_value` keeps each head's q, k, v together ([h0: q k v | h1: q k v | ...]);
  the lab keeps [q | k | v] with the heads contiguous inside each, so that row is
  regrouped (`"qkv"`); every other tensor is copied as it is.
- `load_neox(folder)` reads a checkpoint folder already on disk (`save_pretrained`
  output) and never downloads anything. Variants the lab's model cannot express
  exactly (scaled RoPE, attention without biases, an unknown activation) are refused
  with a one-line error instead of converted approximately.
- `import_run(folder, revisions)` builds a run folder (model.json, tokenizer.json,
  one checkpoint per revision, params.json, status) that `lablib.interp.analysis` and the
  widgets open like a trained run. A revision is a sub-folder (`step1000/`, Pythia's
  branch names) or, in a Hugging Face cache folder (`models--EleutherAI--pythia-70m`),
  a name under `refs/`; its step is the number in its name.
- `transformers` is an optional dependency (the `hf` extra); it is imported only
  inside these functions.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch

from lablib.config import ConfigError, ModelConfig
from lablib.gpt2 import ACTIVATION_FROM_GPT2 as ACTIVATION_FROM_HF  # the same transformers activation names
from lablib.gpt2 import load_local_hf
from lablib.models import Transformer

# (lab name, GPTNeoXForCausalLM name, conversion) ; "{i}" stands for the block index.
WEIGHT_MAP: list[tuple[str, str, str | None]] = [
    ("embed.weight", "gpt_neox.embed_in.weight", None),
    ("blocks.{i}.ln1.weight", "gpt_neox.layers.{i}.input_layernorm.weight", None),
    ("blocks.{i}.ln1.bias", "gpt_neox.layers.{i}.input_layernorm.bias", None),
    ("blocks.{i}.attn.c_attn.weight", "gpt_neox.layers.{i}.attention.query_key_value.weight", "qkv"),
    ("blocks.{i}.attn.c_attn.bias", "gpt_neox.layers.{i}.attention.query_key_value.bias", "qkv"),
    ("blocks.{i}.attn.c_proj.weight", "gpt_neox.layers.{i}.attention.dense.weight", None),
    ("blocks.{i}.attn.c_proj.bias", "gpt_neox.layers.{i}.attention.dense.bias", None),
    ("blocks.{i}.ln2.weight", "gpt_neox.layers.{i}.post_attention_layernorm.weight", None),
    ("blocks.{i}.ln2.bias", "gpt_neox.layers.{i}.post_attention_layernorm.bias", None),
    ("blocks.{i}.mlp.c_fc.weight", "gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight", None),
    ("blocks.{i}.mlp.c_fc.bias", "gpt_neox.layers.{i}.mlp.dense_h_to_4h.bias", None),
    ("blocks.{i}.mlp.c_proj.weight", "gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight", None),
    ("blocks.{i}.mlp.c_proj.bias", "gpt_neox.layers.{i}.mlp.dense_4h_to_h.bias", None),
    ("ln_final.weight", "gpt_neox.final_layer_norm.weight", None),
    ("ln_final.bias", "gpt_neox.final_layer_norm.bias", None),
    ("unembed.weight", "embed_out.weight", None),
]
REVISION_STEP = re.compile(r"step(\d+)$")


def weight_pairs(n_layer: int) -> list[tuple[str, str, str | None]]:
    """WEIGHT_MAP with the block rows expanded for n_layer blocks."""
    rows = []
    for lab, hf, conversion in WEIGHT_MAP:
        layers = range(n_layer) if "{i}" in lab else [None]
        rows.extend((lab.format(i=i), hf.format(i=i), conversion) for i in layers)
    return rows


def qkv_to_lab(tensor: torch.Tensor, n_head: int) -> torch.Tensor:
    """GPT-NeoX's per-head [q k v] rows -> the lab's [q (all heads) | k | v] rows (weight or bias)."""
    head_rows = tensor.shape[0] // (3 * n_head)
    return tensor.reshape(n_head, 3, head_rows, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)


def _rope(hf_config: Any) -> tuple[float, float]:
    """(base, fraction) of the config's RoPE, in the layout of any transformers version since 4.56."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ConfigError(f"GPT-NeoX config 'rope_type': the lab's Transformer has plain RoPE only; "
                          f"expected 'default', got {kind!r}")
    base = params.get("rope_theta", getattr(hf_config, "rotary_emb_base", 10000.0))
    fraction = params.get("partial_rotary_factor", getattr(hf_config, "rotary_pct", 1.0))
    return float(base), float(fraction)


def config_from_neox(hf_config: Any) -> ModelConfig:
    """The lab's ModelConfig that computes what a transformers GPTNeoXConfig computes."""
    if not getattr(hf_config, "attention_bias", True):
        raise ConfigError("GPT-NeoX config 'attention_bias': the lab's Transformer has biases in attention "
                          "whenever the MLP has them; expected True, got False")
    act = hf_config.hidden_act
    if act not in ACTIVATION_FROM_HF:
        raise ConfigError(f"GPT-NeoX config 'hidden_act': expected one of {', '.join(ACTIVATION_FROM_HF)}, got {act!r}")
    if hf_config.hidden_dropout != hf_config.attention_dropout:
        raise ConfigError(f"GPT-NeoX config 'attention_dropout': the lab has one dropout rate; expected it equal to "
                          f"hidden_dropout={hf_config.hidden_dropout}, got {hf_config.attention_dropout}")
    base, fraction = _rope(hf_config)
    cfg = ModelConfig(vocab_size=hf_config.vocab_size, n_layer=hf_config.num_hidden_layers,
                      n_head=hf_config.num_attention_heads, d_model=hf_config.hidden_size,
                      d_mlp=hf_config.intermediate_size, max_seq_len=hf_config.max_position_embeddings,
                      mask="causal", pos="rope", rope_base=base, rope_fraction=fraction,
                      parallel_residual=bool(hf_config.use_parallel_residual),
                      tie_embeddings=bool(hf_config.tie_word_embeddings), norm="layernorm",
                      activation=ACTIVATION_FROM_HF[act], bias=True, dropout=float(hf_config.hidden_dropout),
                      norm_eps=float(hf_config.layer_norm_eps))
    cfg.validate()  # rotary channels int(head size * fraction), as transformers counts them
    return cfg


@torch.no_grad()
def from_neox(hf_model: torch.nn.Module) -> Transformer:
    """A lab Transformer (fp32, eval mode) holding the weights of a transformers GPTNeoXForCausalLM."""
    model = Transformer(config_from_neox(hf_model.config))
    hf_state = hf_model.state_dict()
    if "embed_out.weight" not in hf_state:  # transformers 5 names the head lm_head; a tied one may be left out
        head = hf_state.get("lm_head.weight", hf_state["gpt_neox.embed_in.weight"])
        hf_state = {**hf_state, "embed_out.weight": head}
    lab_state = model.state_dict()
    for lab, hf, conversion in weight_pairs(model.cfg.n_layer):
        source = hf_state[hf].float()
        if conversion == "qkv":
            source = qkv_to_lab(source, model.cfg.n_head)
        if source.shape != lab_state[lab].shape:
            raise ValueError(f"GPT-NeoX tensor {hf} has shape {tuple(source.shape)}; "
                             f"the lab's {lab} expects {tuple(lab_state[lab].shape)}")
        lab_state[lab].copy_(source)
    return model.eval()


def load_neox(folder: str | Path) -> Transformer:
    """A lab Transformer from a GPT-NeoX / Pythia checkpoint folder on disk (never downloads)."""
    from transformers import GPTNeoXForCausalLM

    return from_neox(load_local_hf(GPTNeoXForCausalLM, folder, "GPT-NeoX"))


def revision_folders(folder: str | Path, revisions: list[str] | None = None) -> dict[str, Path]:
    """{revision: checkpoint folder} for a checkpoint folder, a folder of revision sub-folders or a hub cache folder.

    revisions: which to take (default: all that are there). A single checkpoint folder is its own
    one revision, named after the folder.
    """
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} does not exist")
    if (path / "config.json").is_file():
        found = {path.name: path}
    elif (path / "refs").is_dir() and (path / "snapshots").is_dir():  # a Hugging Face cache folder
        found = {ref.name: path / "snapshots" / ref.read_text().strip() for ref in sorted((path / "refs").iterdir())}
    else:
        found = {p.name: p for p in sorted(path.iterdir()) if (p / "config.json").is_file()}
    if not found:
        raise FileNotFoundError(f"{str(folder)!r}: expected config.json, revision sub-folders holding one "
                                "(step1000/, ...) or a Hugging Face cache folder (refs/, snapshots/)")
    if revisions:
        missing = [r for r in revisions if r not in found]
        if missing:
            raise ConfigError(f"--revisions: {', '.join(missing)} not in {folder}; available: {', '.join(found)}")
        found = {r: found[r] for r in revisions}
    return found


def revision_step(name: str, fallback: int) -> int:
    match = REVISION_STEP.search(name)
    return int(match.group(1)) if match else fallback


def import_run(folder: str | Path, revisions: list[str] | None = None, run_dir: str | Path | None = None,
               experiment: str = "hf-import") -> Path:
    """Build a run folder from a GPT-NeoX checkpoint folder: one lab checkpoint per revision.

    Revisions whose names carry no step number (`main`, a single folder) are numbered after the
    others. Returns the run folder (default: runs/<experiment>/<folder name>).
    """
    from lablib.checkpoints import save_checkpoint
    from lablib.gpt2 import load_gpt2_tokenizer
    from lablib.runs import create_run, runs_root

    found = revision_folders(folder, revisions)
    next_free = max([revision_step(name, -1) for name in found]) + 1
    steps = {}
    for name in found:  # unnumbered revisions ('main', a lone folder) come after the numbered ones
        steps[name] = revision_step(name, next_free)
        next_free += steps[name] == next_free
    if len(set(steps.values())) != len(steps):
        raise ConfigError(f"revisions {', '.join(found)}: two of them name the same step")
    source = Path(folder).expanduser().resolve()
    target = Path(run_dir) if run_dir else runs_root() / experiment / source.name.replace("models--", "")
    tokenizer_from = next((p for p in found.values() if (p / "tokenizer.json").is_file()), None)
    if tokenizer_from is None:
        raise FileNotFoundError(f"{folder}: expected tokenizer.json beside a checkpoint's config.json")
    load_gpt2_tokenizer(tokenizer_from)  # refused here, before any weights are converted, if unreadable
    run = create_run(experiment, {"source": str(source), "revisions": dict(sorted(steps.items(), key=lambda kv: kv[1])),
                                  "tokenizer": "hf", "model_family": "gpt_neox"}, target)
    shutil.copyfile(tokenizer_from / "tokenizer.json", run.path / "tokenizer.json")
    first_cfg = None
    for name, path in sorted(found.items(), key=lambda kv: steps[kv[0]]):
        model = load_neox(path)
        if first_cfg is None:
            first_cfg = model.cfg
            run.save_model_spec(model)
        elif model.cfg != first_cfg:
            raise ConfigError(f"revision {name}: its config differs from the first revision's; "
                              "one run folder holds one architecture")
        save_checkpoint(run.path, steps[name], model, state={"revision": name, "source": str(path)})
    run.set_status("done")
    return run.path
