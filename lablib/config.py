"""Typed, validated configs and presets.

Notable here:
- Every knob is a dataclass field made with `knob(...)`, which records its range,
  choices and one-line help next to its default. The field's type annotation is
  the type that is enforced.
- An experiment's config is one flat dataclass that inherits the knob groups it uses
  (`ModelConfig`, `TrainConfig`, `DataConfig`) and adds its own; flat names keep
  notebook parameters and `lablib run -p NAME VALUE` simple.
- `presets` maps `smoke` / `cpu` / `gpu` to overrides of the defaults;
  `$LABLIB_PRESET` picks the preset when none is given (CI runs every notebook as
  `smoke`).
- A bad value raises `ConfigError` with one line: the parameter, what was expected,
  what was given, and for a misspelled name the closest known one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

PRESETS = ("smoke", "cpu", "gpu")
DEFAULT_PRESET = "cpu"


class ConfigError(ValueError):
    """A parameter was refused; the message is one line meant for the user."""


def knob(default: Any, help: str = "", *, min: float | None = None, max: float | None = None,
         min_exclusive: bool = False) -> Any:
    """A config field with its documentation and allowed range next to its default."""
    meta = {"help": help, "min": min, "max": max, "min_exclusive": min_exclusive}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def default_preset() -> str:
    preset = os.environ.get("LABLIB_PRESET") or DEFAULT_PRESET
    if preset not in PRESETS:
        raise ConfigError(f"LABLIB_PRESET: expected one of {', '.join(PRESETS)}, got {preset!r}")
    return preset


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        return f"a list of {_describe(inner)}"
    if origin is dict:
        return "a dict"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _matches(tp: Any, value: Any) -> tuple[bool, Any]:
    """Does `value` fit type `tp`? Returns (ok, value converted to the canonical type)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _matches(arg, value)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        (inner, *_) = typing.get_args(tp) or (Any,)
        out = []
        for item in value:
            ok, v = _matches(inner, item)
            if not ok:
                return False, value
            out.append(v)
        return True, list(out)
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    return isinstance(value, tp), value


def parse_cli_value(text: str) -> Any:
    """Turn a `-p NAME VALUE` string into a Python value: JSON first, then bare words."""
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text


def parse_for_field(tp: Any, text: str) -> Any:
    """Parse a command-line string for a field of type `tp`: a literal choice stays a string."""
    choices = [a for arg in (typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,))
               if typing.get_origin(arg) is Literal for a in typing.get_args(arg)]
    if text in choices:
        return text
    if len(text) >= 2 and text[0] == text[-1] == '"':  # a JSON string: quoted on purpose
        return json.loads(text)
    if typing.get_origin(tp) is list and not text.lstrip().startswith("["):  # NAME a,b: a list of bare words
        return [parse_for_field(typing.get_args(tp)[0], item) for item in text.split(",") if item]
    if tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp)):
        parsed = parse_cli_value(text)
        return parsed if parsed is None else text
    return parse_cli_value(text)


@dataclass
class Config:
    """Base of every config: validation, presets, projection onto knob groups."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def fields_by_name(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def parse(cls, name: str, text: str) -> Any:
        """A command-line string for parameter `name`, parsed with the field's type in mind."""
        if name not in cls.fields_by_name():
            return parse_cli_value(text)
        return parse_for_field(typing.get_type_hints(cls)[name], text)

    @classmethod
    def check(cls, name: str, value: Any) -> Any:
        """Validate one parameter; return it in canonical form or raise a one-line ConfigError."""
        fields = cls.fields_by_name()
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known parameters: {', '.join(sorted(fields))}"
            raise ConfigError(f"unknown parameter {name!r}{hint}")
        f = fields[name]
        tp = typing.get_type_hints(cls)[name]
        given = value
        ok, value = _matches(tp, value)
        if not ok:
            raise ConfigError(f"parameter {name!r}: expected {_describe(tp)}, got {given!r}")
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if lo is not None and (value < lo or (f.metadata.get("min_exclusive") and value == lo)):
                op = ">" if f.metadata.get("min_exclusive") else ">="
                raise ConfigError(f"parameter {name!r}: expected a value {op} {lo}, got {given!r}")
            if hi is not None and value > hi:
                raise ConfigError(f"parameter {name!r}: expected a value <= {hi}, got {given!r}")
        return value

    @classmethod
    def resolve(cls, preset: str | None = None, **overrides: Any):
        """Defaults, then the preset's values, then overrides (None means 'keep the preset's')."""
        preset = preset or default_preset()
        if preset not in PRESETS and preset not in cls.presets:  # a class may add presets of its own (e.g. `paper`)
            known = ", ".join([*PRESETS, *(p for p in cls.presets if p not in PRESETS)])
            raise ConfigError(f"parameter 'preset': expected one of {known}, got {preset!r}")
        values: dict[str, Any] = {}
        for name, value in cls.presets.get(preset, {}).items():
            values[name] = cls.check(name, value)
        for name, value in overrides.items():
            if value is None and name in cls.fields_by_name() and not _accepts_none(cls, name):
                continue
            values[name] = cls.check(name, value)
        cfg = cls(**values)
        cfg.preset = preset
        cfg.validate()
        return cfg

    @classmethod
    def check_overrides(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        """Validate a dict of overrides without building a config (used by the CLI)."""
        return {name: (value if value is None else cls.check(name, value)) for name, value in overrides.items()}

    def validate(self) -> None:
        """Checks that involve several fields; subclasses extend it and raise ConfigError."""

    def project(self, group: type) -> Any:
        """The knob group `group` (e.g. ModelConfig) filled from this flat config."""
        names = {f.name for f in dataclasses.fields(group)}
        return group(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["preset"] = getattr(self, "preset", None)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = cls.fields_by_name()
        cfg = cls(**{k: v for k, v in data.items() if k in names})
        cfg.preset = data.get("preset")
        return cfg


def _accepts_none(cls: type, name: str) -> bool:
    return _matches(typing.get_type_hints(cls)[name], None)[0]


@dataclass
class ModelConfig(Config):
    """The transformer family of `lablib.models`."""

    vocab_size: int = knob(256, "tokens in the vocabulary (set from the tokenizer)", min=2)
    n_layer: int = knob(4, "transformer blocks", min=1)
    n_head: int = knob(4, "attention heads per block", min=1)
    d_model: int = knob(128, "width of the residual stream", min=1)
    d_mlp: int | None = knob(None, "MLP hidden width; None means 4 * d_model", min=1)
    max_seq_len: int = knob(256, "longest sequence the model accepts", min=1)
    mask: Literal["causal", "prefix", "bidirectional", "custom"] = knob("causal", "default attention mask")
    pos: Literal["learned", "sinusoidal", "rope", "none"] = knob("learned", "positional encoding")
    rope_base: float = knob(10000.0, "RoPE frequency base", min=1.0)
    rope_fraction: float = knob(1.0, "share of each head's channels RoPE rotates (GPT-NeoX / Pythia: 0.25)",
                                min=0.0, max=1.0, min_exclusive=True)
    parallel_residual: bool = knob(False, "attention and MLP both read the block's input (GPT-NeoX / Pythia)")
    tie_embeddings: bool = knob(True, "share the token embedding with the LM head")
    norm: Literal["layernorm", "rmsnorm"] = knob("layernorm", "normalisation in each block")
    activation: Literal["gelu", "gelu_tanh", "relu", "silu"] = knob("gelu", "MLP non-linearity")
    bias: bool = knob(True, "biases in Linears and LayerNorms, like GPT-2")
    dropout: float = knob(0.0, "dropout on attention, residual and embeddings", min=0.0, max=1.0)
    norm_eps: float = knob(1e-5, "epsilon of the norms", min=0.0)
    n_experts: int | None = knob(None, "experts per MLP (a mixture of experts, each of width d_mlp); "
                                       "None: one dense MLP", min=2)
    moe_top_k: int = knob(1, "experts each token is routed to (mixture of experts)", min=1)
    moe_aux_coef: float = knob(0.01, "weight of the load-balancing loss added to the objective's loss "
                                     "(Switch / OLMoE: 0.01)", min=0.0)

    def validate(self) -> None:
        super().validate()
        if self.n_experts is not None and self.moe_top_k > self.n_experts:
            raise ConfigError(f"parameter 'moe_top_k': expected at most n_experts={self.n_experts}, got {self.moe_top_k}")
        if self.d_model % self.n_head:
            raise ConfigError(f"parameter 'd_model': expected a multiple of n_head={self.n_head}, got {self.d_model}")
        if self.pos == "rope" and (self.d_model // self.n_head) % 2:
            raise ConfigError(f"parameter 'pos': 'rope' needs an even head size, got d_model/n_head={self.d_model // self.n_head}")
        rotary = int(self.d_model // self.n_head * self.rope_fraction)
        if self.pos == "rope" and (rotary < 2 or rotary % 2):
            raise ConfigError(f"parameter 'rope_fraction': expected it to rotate an even number (>= 2) of the "
                              f"{self.d_model // self.n_head} head channels, got {self.rope_fraction} ({rotary})")


@dataclass
class TrainConfig(Config):
    """The training loop and its hardware policy (`lablib.train`)."""

    steps: int = knob(1000, "optimizer steps", min=1)
    batch_size: int = knob(16, "sequences per micro-batch", min=1)
    seq_len: int = knob(128, "tokens per training sequence", min=2)
    batch_tokens: int | None = knob(None, "target tokens per optimizer step; reached by gradient accumulation", min=1)
    learning_rate: float = knob(1e-3, "peak learning rate", min=0.0, min_exclusive=True)
    min_lr_ratio: float = knob(0.1, "final learning rate as a fraction of the peak", min=0.0, max=1.0)
    warmup_steps: int = knob(50, "linear warm-up steps", min=0)
    schedule: Literal["cosine", "wsd", "constant"] = knob("cosine", "learning-rate schedule after warm-up")
    decay_fraction: float = knob(0.2, "wsd: fraction of steps spent decaying at the end", min=0.0, max=1.0)
    weight_decay: float = knob(0.1, "AdamW weight decay on matrices", min=0.0)
    beta1: float = knob(0.9, "AdamW beta1", min=0.0, max=1.0)
    beta2: float = knob(0.95, "AdamW beta2", min=0.0, max=1.0)
    grad_clip: float = knob(1.0, "clip the gradient norm to this; 0 turns clipping off", min=0.0)
    seed: int = knob(0, "seed of initialisation, data order and masking", min=0)
    eval_every: int = knob(100, "steps between held-out evaluations", min=1)
    eval_batches: int = knob(8, "micro-batches per held-out evaluation", min=1)
    log_every: int = knob(10, "steps between metric lines", min=1)
    checkpoint_every: int = knob(500, "steps between checkpoints after the log-spaced early ones", min=1)
    keep_last: int | None = knob(None, "keep only this many newest checkpoints (None keeps all)", min=1)
    keep_optimizer: int | None = knob(1, "checkpoints that keep optimizer state for resuming, newest first "
                                         "(None: all); the others keep their weights", min=1)
    device: Literal["auto", "cpu", "cuda", "mps"] = knob("auto", "where to train")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = knob("auto", "autocast dtype")
    compile: Literal["auto", "on", "off"] = knob("auto", "torch.compile the model")
    fused_adamw: Literal["auto", "on", "off"] = knob("auto", "fused AdamW kernel")
    num_threads: int | None = knob(None, "CPU threads for torch (None: torch's default)", min=1)
    loggers: list[Literal["tensorboard", "trackio"]] = knob([], "also send every metrics row to these "
                                                             "(lablib.loggers; -p loggers tensorboard,trackio)")

    def validate(self) -> None:
        super().validate()
        if self.warmup_steps > self.steps:
            raise ConfigError(f"parameter 'warmup_steps': expected at most steps={self.steps}, got {self.warmup_steps}")


@dataclass
class DataConfig(Config):
    """Corpus and tokenizer (`lablib.data`)."""

    corpus: str = knob("stdlib", "'stdlib' (offline default), a local file or folder, or 'hf:NAME[:CONFIG]'")
    tokenizer: Literal["char", "bpe"] = knob("char", "character-level or byte-level BPE")
    bpe_vocab_size: int = knob(2048, "BPE vocabulary size (tokenizer='bpe')", min=260)
    corpus_max_chars: int | None = knob(None, "read at most this many characters of the corpus", min=1)
    val_fraction: float = knob(0.05, "fraction of documents held out", min=0.0, max=0.5, min_exclusive=True)


def notebook_config(cls: type[Config], namespace: dict[str, Any]) -> Config:
    """Build `cls` from a notebook's parameters: `preset`, `overrides` (a dict) and any knob names.

    Call it right after the parameters cell with `globals()`: every global whose name
    is a field of `cls` and whose value is not None overrides the preset; `overrides`
    carries knobs that the parameters cell does not list (`lablib run -p` puts them there).
    """
    fields = cls.fields_by_name()
    given = {name: namespace[name] for name in fields if name in namespace and namespace[name] is not None}
    overrides = namespace.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"parameter 'overrides': expected a dict of parameter names to values, got {overrides!r}")
    return cls.resolve(namespace.get("preset"), **{**given, **overrides})
