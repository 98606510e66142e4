"""One transformer family, readable top to bottom (in the spirit of nanoGPT's model.py).

Notable here:
- Pre-norm blocks; attention goes through `F.scaled_dot_product_attention` unless a
  hook asks for the attention pattern, in which case the pattern is computed
  explicitly so it can be read and edited.
- Mask modes: `causal`, `prefix` (bidirectional over the first `prefix_len` tokens
  of each row, causal after), `bidirectional`, and `custom` (a boolean
  `attn_mask`, True = may attend). The mode is the config's default and can be
  changed per call.
- Positional encodings: `learned`, `sinusoidal`, `rope` (on all or, as in GPT-NeoX,
  a leading share of each head's channels), `none` (NoPE). Added encodings are on the
  token embeddings' scale: learned positions start N(0, EMBED_STD) like tokens, and the
  sinusoidal table is scaled to root-mean-square EMBED_STD per channel (row norms equal).
- Blocks are sequential by default; `parallel_residual` feeds attention and MLP the
  same input, as GPT-NeoX (Pythia) and GPT-J do.
- Every interesting activation passes through a `HookPoint` with a stable dotted
  name (`blocks.0.attn.hook_pattern`, `blocks.0.hook_resid_post`, ...), as in
  TransformerLens. `run_with_cache` returns them; `hooks(...)` edits them. A hook
  point with nothing attached is an identity call.
- Inputs are token ids or, for models over non-text data, ready-made embeddings.
- Variants for the objectives suite, each built from the same blocks: `EncoderDecoder`
  (T5-shaped; `DecoderBlock` adds cross-attention), `MultiTokenTransformer` (Gloeckle
  et al.'s n heads on a shared trunk) and `FutureTokenTransformer` (Walker's
  pseudo-sequence decoder). Each has its own config subclass with its extra knobs.
- `TabularPFN`: the same transformer over table rows (TabPFN), for in-context classification.
- A mixture of experts: `n_experts` set in the config turns every block's MLP into
  `MixtureOfExperts` (top-k routing, Switch / OLMoE load-balancing loss, router logits and
  expert choices as hook points); the default (None) is the dense MLP.
- `MODELS`, the registry of model classes that a run folder may name: `@register_model`
  on a class (which declares its `config_class`) adds it. `build_registered(name, config,
  source)` is the only way a `model.json` becomes a model: a registered name and config
  values checked against that config class's fields and types, nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from lablib.config import Config, ConfigError, ModelConfig, knob

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new"
    "relu": F.relu,
    "silu": F.silu,
}


MODELS: dict[str, type[nn.Module]] = {}  # registered name -> model class; see register_model


def register_model(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: `cls` (with its `config_class`) may be rebuilt from a run folder's model.json."""
    config_class = cls.__dict__.get("config_class")
    if not (isinstance(config_class, type) and issubclass(config_class, ModelConfig) and dataclasses.is_dataclass(config_class)):
        raise TypeError(f"{cls.__name__}: a registered model declares config_class, a ModelConfig dataclass")
    if MODELS.get(cls.__name__, cls) is not cls:
        raise TypeError(f"model name {cls.__name__!r} is registered twice ({MODELS[cls.__name__].__module__} and {cls.__module__})")
    MODELS[cls.__name__] = cls
    return cls


def registered_name(model: nn.Module) -> str | None:
    """The registry name of model's class, or None when it is not registered."""
    name = type(model).__name__
    return name if MODELS.get(name) is type(model) else None


def model_config_values(model: nn.Module) -> dict:
    """The fields of model's declared config class, read from model.cfg (which may be a wider config)."""
    return {f.name: getattr(model.cfg, f.name) for f in dataclasses.fields(type(model).config_class)}


def build_registered(name: object, config: object, source: str = "model.json") -> nn.Module:
    """Construct registered model `name` from `config` values; anything else is a one-line ConfigError.

    `config` must be a dict whose keys are fields of the class's config_class and whose
    values fit their types and ranges (`Config.check`). No other code is reached: the
    name is looked up in MODELS, never imported or walked as an attribute path.
    """
    if not isinstance(name, str) or name not in MODELS:
        shown = repr(name)[:80]
        raise ConfigError(f"{source}: model {shown} is not a registered lab model class; expected one of "
                          f"{', '.join(sorted(MODELS))} (a class outside lablib.models registers when its module is imported)")
    cls = MODELS[name]
    config_class: type[Config] = cls.config_class
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: 'config' must be an object of {config_class.__name__} fields, got {type(config).__name__}")
    fields = config_class.fields_by_name()
    values = {}
    for key, value in config.items():
        if not isinstance(key, str) or key not in fields:
            raise ConfigError(f"{source}: {repr(key)[:60]} is not a field of {config_class.__name__}")
        try:
            values[key] = config_class.check(key, value)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    try:
        cfg = config_class(**values)
        cfg.validate()
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from None
    return cls(cfg)


class HookPoint(nn.Module):
    """Identity with a name; forward hooks attached here read or replace the activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @property
    def active(self) -> bool:
        return bool(self._forward_hooks)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


EMBED_STD = 0.02  # init std of token (and learned position) embeddings; the sinusoidal table is scaled to match


def sinusoidal_table(n_positions: int, dim: int, std: float = EMBED_STD) -> torch.Tensor:
    """The fixed encoding of 'Attention Is All You Need' (sin on even, cos on odd channels), scaled so
    every channel has root-mean-square `std`: each row's norm is std * sqrt(dim), the expected norm of
    an N(0, std) token embedding, so neither drowns the other in their sum (unscaled, a row's norm is
    sqrt(dim / 2), ~35x a token's at std 0.02)."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table * (std * math.sqrt(2.0))


def rope_tables(n_positions: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float32), inv_freq)  # (T, head_dim/2)
    return angles.cos(), angles.sin()


def rope_channels(cfg: ModelConfig) -> int:
    """Channels of each head that RoPE rotates (the leading ones; the rest pass through)."""
    return int(cfg.d_model // cfg.n_head * cfg.rope_fraction)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x[..., :r/2], x[..., r/2:r]) of x: (B, T, H, D) by position, r = 2 * cos.shape[-1];
    channels from r on pass through unchanged (partial rotary, GPT-NeoX)."""
    r = 2 * cos.shape[-1]
    x1, x2 = x[..., :r].float().chunk(2, dim=-1)
    if cos.dim() == 2:  # (T, D/2): the same positions for every row
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:  # (B, T, D/2): per-row positions
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)
    return rotated if r == x.shape[-1] else torch.cat([rotated, x[..., r:]], dim=-1)


def build_mask(mode: str, T: int, device: torch.device, prefix_len: torch.Tensor | None = None,
               attn_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean mask (True = may attend), broadcastable to (B, H, T, T); None when SDPA's flags do."""
    if mode in ("causal", "bidirectional"):
        return None
    if mode == "prefix":
        if prefix_len is None:
            raise ValueError("mask 'prefix' needs prefix_len: a (batch,) tensor of prefix lengths")
        idx = torch.arange(T, device=device)
        causal = idx[None, :] <= idx[:, None]  # (T, T): key j <= query i
        in_prefix = idx[None, None, :] < prefix_len.to(device)[:, None, None]  # (B, 1, T): key j in prefix
        return (causal[None] | in_prefix)[:, None]
    if mode == "custom":
        if attn_mask is None:
            raise ValueError("mask 'custom' needs attn_mask: a boolean (T, T) or (B, T, T) tensor, True = may attend")
        return attn_mask if attn_mask.dim() == 4 else (attn_mask[None, None] if attn_mask.dim() == 2 else attn_mask[:, None])
    raise ValueError(f"mask: expected one of causal, prefix, bidirectional, custom, got {mode!r}")


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()  # (B, T, H, D)
        self.hook_attn_scores = HookPoint()  # (B, H, Tq, Tk), before softmax
        self.hook_pattern = HookPoint()  # (B, H, Tq, Tk), after softmax
        self.hook_z = HookPoint()  # (B, T, H, D): heads' outputs before c_proj

    def forward(self, x: torch.Tensor, mode: str, mask: torch.Tensor | None,
                rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if self.hook_pattern.active or self.hook_attn_scores.active:
            z = self._explicit_attention(q, k, v, mode, mask)
        else:  # the fast path: flash / memory-efficient kernels
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=(mode == "causal"),
                                               dropout_p=self.dropout if self.training else 0.0)
        z = self.hook_z(z.transpose(1, 2))
        return self.c_proj(z.reshape(B, T, C))

    def _explicit_attention(self, q, k, v, mode, mask):
        T = q.shape[2]
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if mode == "causal":
            mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        pattern = self.hook_pattern(torch.softmax(self.hook_attn_scores(scores).float(), dim=-1).type_as(q))
        pattern = F.dropout(pattern, self.dropout, self.training)
        return pattern @ v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d_mlp = cfg.d_mlp or 4 * cfg.d_model
        self.c_fc = nn.Linear(cfg.d_model, d_mlp, bias=cfg.bias)
        self.c_proj = nn.Linear(d_mlp, cfg.d_model, bias=cfg.bias)
        self.act = ACTIVATIONS[cfg.activation]
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()  # (B, T, d_mlp) before / after the non-linearity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.hook_post(self.act(self.hook_pre(self.c_fc(x)))))


def load_balancing_loss(router_probs: torch.Tensor, expert_choice: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss (Fedus et al. 2021, eq. 4; OLMoE uses the same): n_experts * sum_i f_i P_i.

    f_i is the share of the tokens' k routing slots that went to expert i, P_i the mean router
    probability of expert i. Its minimum, 1, is reached by uniform routing; a router that sends
    everything to one expert scores n_experts. router_probs: (N, E); expert_choice: (N, k).
    """
    counts = torch.zeros(n_experts, device=router_probs.device, dtype=router_probs.dtype)
    counts.scatter_add_(0, expert_choice.reshape(-1), torch.ones(expert_choice.numel(), device=router_probs.device,
                                                                 dtype=router_probs.dtype))
    share = counts / expert_choice.numel()
    return n_experts * (share * router_probs.mean(0)).sum()


class MixtureOfExperts(nn.Module):
    """Top-k routed experts in place of the dense MLP (Switch / OLMoE style, no capacity limit: no token is dropped).

    A linear router scores the n_experts per token; each token goes to its k most probable
    experts (each an `MLP` of width d_mlp) and their outputs are summed, weighted by the
    router probabilities (not renormalised over the k, as in OLMoE, so top-1 routing still
    trains the router). The load-balancing loss of the last forward pass waits in
    `aux_loss` until the training loop takes it (`Transformer.pop_auxiliary_loss`).
    Hook points: `hook_router_logits` (B, T, E) and `hook_expert_choice` (B, T, k) expert ids,
    sorted by probability; a hook may replace either (the replaced choice is the one used).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.moe_top_k
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList([MLP(cfg) for _ in range(cfg.n_experts)])
        self.hook_router_logits, self.hook_expert_choice = HookPoint(), HookPoint()
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        probs = torch.softmax(self.hook_router_logits(self.router(x)).float(), dim=-1)  # (B, T, E)
        choice = self.hook_expert_choice(probs.topk(self.top_k, dim=-1).indices)  # (B, T, k)
        gates = probs.gather(-1, choice).type_as(x)
        flat, choice_flat, gates_flat = x.reshape(-1, C), choice.reshape(-1, self.top_k), gates.reshape(-1, self.top_k)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):  # sparse dispatch: each expert runs on its own tokens only
            token, slot = torch.nonzero(choice_flat == e, as_tuple=True)
            if token.numel():
                out.index_add_(0, token, expert(flat[token]) * gates_flat[token, slot, None])
        self.aux_loss = load_balancing_loss(probs.reshape(-1, self.n_experts), choice_flat, self.n_experts)
        return out.view(B, T, C)


def make_mlp(cfg: ModelConfig) -> nn.Module:
    """The block's MLP: dense, or a mixture of experts when cfg.n_experts is set."""
    return MLP(cfg) if cfg.n_experts is None else MixtureOfExperts(cfg)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1, self.attn = make_norm(cfg), Attention(cfg)
        self.ln2, self.mlp = make_norm(cfg), make_mlp(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.parallel = cfg.parallel_residual
        self.hook_resid_pre, self.hook_resid_mid, self.hook_resid_post = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_out, self.hook_mlp_out = HookPoint(), HookPoint()

    def forward(self, x, mode, mask, rope):
        x = self.hook_resid_pre(x)
        attn = self.drop(self.hook_attn_out(self.attn(self.ln1(x), mode, mask, rope)))
        if self.parallel:  # the MLP reads the block's input too; resid_mid is x + attention alone
            mlp = self.drop(self.hook_mlp_out(self.mlp(self.ln2(x))))
            return self.hook_resid_post(self.hook_resid_mid(x + attn) + mlp)
        x = self.hook_resid_mid(x + attn)
        return self.hook_resid_post(x + self.drop(self.hook_mlp_out(self.mlp(self.ln2(x)))))


def init_like_transformer(module: nn.Module, n_layer: int) -> None:
    """GPT-2 initialisation: N(0, 0.02), zero biases, residual projections scaled by 1/sqrt(2 * n_layer)."""
    module.apply(Transformer._init_weights)
    for name, p in module.named_parameters():
        if name.endswith("c_proj.weight"):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))


@register_model
class Transformer(nn.Module):
    config_class = ModelConfig

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos == "learned":
            self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        if cfg.pos == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg.max_seq_len, rope_channels(cfg), cfg.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_final = make_norm(cfg)
        self.unembed = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight
        self.hook_embed, self.hook_pos_embed, self.hook_final = HookPoint(), HookPoint(), HookPoint()
        init_like_transformer(self, cfg.n_layer)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=EMBED_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # --- forward -----------------------------------------------------------------
    def embed_tokens(self, idx: torch.Tensor | None = None, embeds: torch.Tensor | None = None,
                     positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token (+ absolute position) embeddings. positions: optional (T,) or (B, T) position ids,
        default 0..T-1 (explicit ids let packed sequences restart or share positions)."""
        if (idx is None) == (embeds is None):
            raise ValueError("pass exactly one of idx (token ids) or embeds (B, T, d_model)")
        x = self.hook_embed(self.embed(idx) if embeds is None else embeds)
        self._check_positions(x.shape[1], positions)
        if self.cfg.pos == "learned":
            x = x + self.hook_pos_embed(self.pos_embed(self._position_ids(x.shape[1], x.device, positions)))
        elif self.cfg.pos == "sinusoidal":
            x = x + self.hook_pos_embed(self.pos_table[self._position_ids(x.shape[1], x.device, positions)].to(x.dtype))
        return self.drop(x)

    def _check_positions(self, T: int, positions: torch.Tensor | None) -> None:
        bounded = self.cfg.pos in ("learned", "sinusoidal", "rope")
        if positions is None:
            if T > self.cfg.max_seq_len and bounded:
                raise ValueError(f"sequence of {T} tokens is longer than max_seq_len={self.cfg.max_seq_len}")
            return
        if positions.shape[-1] != T or positions.dim() not in (1, 2):
            raise ValueError(f"positions: expected shape (T,) or (B, T) with T={T}, got {tuple(positions.shape)}")
        if bounded and (int(positions.min()) < 0 or int(positions.max()) >= self.cfg.max_seq_len):
            raise ValueError(f"positions: expected ids in [0, max_seq_len={self.cfg.max_seq_len}), got "
                             f"[{int(positions.min())}, {int(positions.max())}]")

    @staticmethod
    def _position_ids(T: int, device: torch.device, positions: torch.Tensor | None) -> torch.Tensor:
        return torch.arange(T, device=device) if positions is None else positions.to(device)

    def trunk(self, idx: torch.Tensor | None = None, *, embeds: torch.Tensor | None = None,
              mask: str | None = None, prefix_len: torch.Tensor | None = None,
              attn_mask: torch.Tensor | None = None, n_layers: int | None = None,
              positions: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream after the blocks (before the final norm): (B, T, d_model).

        positions: optional (T,) or (B, T) position ids for learned / sinusoidal / rope (default 0..T-1).
        """
        x = self.embed_tokens(idx, embeds, positions)
        mode = mask or self.cfg.mask
        if attn_mask is not None and mask is None:
            mode = "custom"
        m = build_mask(mode, x.shape[1], x.device, prefix_len, attn_mask)
        rope = self.rope(x.shape[1], positions)
        for block in self.blocks[:n_layers]:
            x = block(x, mode, m, rope)
        return x

    def rope(self, T: int, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """RoPE's (cos, sin) tables for T positions (or for explicit position ids: (T,) or (B, T)),
        or None when the model does not use RoPE."""
        if self.cfg.pos != "rope":
            return None
        if positions is None:
            return self.rope_cos[:T], self.rope_sin[:T]
        ids = positions.to(self.rope_cos.device)
        return self.rope_cos[ids], self.rope_sin[ids]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and unembedding: residual stream -> logits."""
        return self.unembed(self.hook_final(self.ln_final(h)))

    def forward(self, idx: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Logits (B, T, vocab). kwargs: embeds, mask, prefix_len, attn_mask, positions (see `trunk`)."""
        return self.head(self.trunk(idx, **kwargs))

    # --- hooks -------------------------------------------------------------------
    def hook_points(self) -> dict[str, HookPoint]:
        return {name: m for name, m in self.named_modules() if isinstance(m, HookPoint)}

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[str | Callable[[str], bool], Callable]]) -> Iterator["Transformer"]:
        """Attach hooks for the duration of a `with` block.

        Each hook is (name or name-predicate, fn(activation, name) -> replacement or None).
        """
        points = self.hook_points()
        handles = []
        try:
            for selector, fn in fwd_hooks:
                names = [n for n in points if (selector(n) if callable(selector) else n == selector)]
                if not names:
                    raise KeyError(f"no hook point matches {selector!r}; see model.hook_points()")
                for name in names:
                    handles.append(points[name].register_forward_hook(
                        lambda mod, inp, out, _fn=fn, _name=name: _fn(out, _name)))
            yield self
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def run_with_cache(self, idx: torch.Tensor | None = None, names: Iterable[str] | Callable[[str], bool] | None = None,
                       **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and a dict of every hooked activation (or those selected by `names`)."""
        points = self.hook_points()
        if names is None:
            wanted = list(points)
        elif callable(names):
            wanted = [n for n in points if names(n)]
        else:
            wanted = list(names)
            missing = [n for n in wanted if n not in points]
            if missing:
                raise KeyError(f"unknown hook point(s) {missing}; see model.hook_points()")
        cache: dict[str, torch.Tensor] = {}

        def save(act, name):
            cache[name] = act.detach()

        with self.hooks([(n, save) for n in wanted]):
            logits = self(idx, **kwargs)
        return logits, cache

    def pop_auxiliary_loss(self) -> torch.Tensor | None:
        """The weighted load-balancing loss of the last forward pass (summed over MoE layers), then cleared;
        None for a dense model. The training loop adds it to the objective's loss."""
        if not self.cfg.n_experts:  # dense: nothing to walk on the training loop's hot path
            return None
        losses = [m.aux_loss for m in self.modules() if isinstance(m, MixtureOfExperts) and m.aux_loss is not None]
        for m in self.modules():
            if isinstance(m, MixtureOfExperts):
                m.aux_loss = None
        return self.cfg.moe_aux_coef * torch.stack(losses).sum() if losses else None

    # --- sizes -------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel()
            if self.cfg.pos == "learned":
                n -= self.pos_embed.weight.numel()
        return n

    def num_active_params(self) -> int:
        """Parameters one token uses: all of them for a dense model; a mixture of experts counts k of its n experts."""
        idle = sum(p.numel() for m in self.modules() if isinstance(m, MixtureOfExperts)
                   for p in m.experts.parameters()) * (1 - self.cfg.moe_top_k / self.cfg.n_experts) if self.cfg.n_experts else 0
        return self.num_params() - int(idle)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6N + 12*L*H*Q*T (PaLM appendix B), N the active parameters."""
        n = self.num_active_params() - (self.pos_embed.weight.numel() if self.cfg.pos == "learned" else 0)
        L, H, Q = self.cfg.n_layer, self.cfg.n_head, self.cfg.d_model // self.cfg.n_head
        return 6 * n + 12 * L * H * Q * seq_len

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample continuations of idx (B, T) with the causal mask; the head reads the last position only."""
        for _ in range(max_new_tokens):
            ctx = idx[:, -self.cfg.max_seq_len:]
            logits = self.head(self.trunk(ctx, mask="causal")[:, -1:])[:, -1].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
                    logits[logits < v[:, [-1]]] = float("-inf")
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


# --- variants for the objectives suite: encoder-decoder, multi-token and future-token heads ---------------

def padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, T) True = real token -> (B, T, T) bidirectional mask over real keys; every query keeps itself."""
    eye = torch.eye(valid.shape[1], dtype=torch.bool, device=valid.device)
    return valid[:, None, :] | eye[None]


class CrossAttention(nn.Module):
    """Queries from the decoder's stream, keys and values from the encoder's output ("memory")."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.c_q = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.c_kv = nn.Linear(cfg.d_model, 2 * cfg.d_model, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()  # (B, T, H, D)
        self.hook_pattern = HookPoint()  # (B, H, Tq, Tk), after softmax
        self.hook_z = HookPoint()  # (B, Tq, H, D)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_valid: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q = self.hook_q(self.c_q(x).view(B, T, self.n_head, self.head_dim)).transpose(1, 2)
        k, v = self.c_kv(memory).view(B, memory.shape[1], 2, self.n_head, self.head_dim).unbind(2)
        k, v = self.hook_k(k).transpose(1, 2), self.hook_v(v).transpose(1, 2)
        mask = None if memory_valid is None else memory_valid[:, None, None, :]
        if self.hook_pattern.active:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            z = F.dropout(self.hook_pattern(torch.softmax(scores.float(), -1).type_as(q)), self.dropout, self.training) @ v
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(self.hook_z(z.transpose(1, 2)).reshape(B, T, C))


class DecoderBlock(nn.Module):
    """Pre-norm decoder block: causal self-attention, cross-attention to the memory, MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1, self.attn = make_norm(cfg), Attention(cfg)
        self.ln_cross, self.cross = make_norm(cfg), CrossAttention(cfg)
        self.ln2, self.mlp = make_norm(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.hook_resid_pre, self.hook_resid_mid, self.hook_resid_post = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_out, self.hook_cross_out, self.hook_mlp_out = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x, memory, memory_valid, rope):
        x = self.hook_resid_pre(x)
        x = x + self.drop(self.hook_attn_out(self.attn(self.ln1(x), "causal", None, rope)))
        x = self.hook_resid_mid(x + self.drop(self.hook_cross_out(self.cross(self.ln_cross(x), memory, memory_valid))))
        return self.hook_resid_post(x + self.drop(self.hook_mlp_out(self.mlp(self.ln2(x)))))


@dataclass
class EncoderDecoderConfig(ModelConfig):
    n_decoder_layer: int | None = knob(None, "decoder blocks; None: n_layer (T5: as deep as the encoder)", min=1)


@register_model
class EncoderDecoder(nn.Module):
    """T5-shaped encoder-decoder built from the same blocks.

    The encoder is a `Transformer` with bidirectional attention (its embedding,
    positions and unembedding are shared with the decoder, as in T5); the decoder is
    a stack of `DecoderBlock`s. Hook names: `encoder.blocks.0.hook_resid_post`,
    `decoder.0.cross.hook_pattern`, ...
    """

    config_class = EncoderDecoderConfig

    def __init__(self, cfg: EncoderDecoderConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = Transformer(dataclasses.replace(ModelConfig(**{f.name: getattr(cfg, f.name) for f in
                                                                      dataclasses.fields(ModelConfig)}),
                                                       mask="bidirectional"))
        n_dec = cfg.n_decoder_layer or cfg.n_layer
        self.decoder = nn.ModuleList([DecoderBlock(cfg) for _ in range(n_dec)])
        self.ln_decoder = make_norm(cfg)
        init_like_transformer(self.decoder, cfg.n_layer + n_dec)

    hook_points = Transformer.hook_points
    hooks = Transformer.hooks

    def encode(self, src: torch.Tensor, src_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output after its final norm: (B, Ts, d_model). src_valid: (B, Ts) True = real token."""
        attn_mask = None if src_valid is None else padding_mask(src_valid)
        return self.encoder.ln_final(self.encoder.trunk(src, mask=None if attn_mask is None else "custom",
                                                        attn_mask=attn_mask))

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, memory_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, Tt, vocab) for decoder inputs `tgt` (teacher forcing) given the encoder memory."""
        x = self.encoder.embed_tokens(tgt)
        rope = self.encoder.rope(x.shape[1])
        for block in self.decoder:
            x = block(x, memory, memory_valid, rope)
        return self.encoder.unembed(self.ln_decoder(x))

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_valid: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(tgt, self.encode(src, src_valid), src_valid)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


@dataclass
class MultiTokenConfig(ModelConfig):
    n_future: int = knob(2, "tokens predicted at each position, one head per offset (Gloeckle et al. 2024)", min=1)


@register_model
class MultiTokenTransformer(Transformer):
    """Gloeckle et al.'s multi-token model: a shared trunk of n_layer-1 blocks and n_future one-block heads.

    Head 0 is the ordinary last block, so `forward` (and every hook name) is exactly
    the next-token `Transformer`; heads 1.. are `future_heads.k`, which predict the
    token k+1 steps further ahead. All heads share the final norm and unembedding.
    """

    config_class = MultiTokenConfig

    def __init__(self, cfg: MultiTokenConfig):
        if cfg.n_layer < 2:
            raise ValueError(f"n_layer: multi-token prediction needs a trunk and a head block, expected >= 2, got {cfg.n_layer}")
        super().__init__(cfg)
        self.future_heads = nn.ModuleList([Block(cfg) for _ in range(cfg.n_future - 1)])
        init_like_transformer(self.future_heads, cfg.n_layer)

    def multi_token_logits(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """[logits for token t+1, logits for t+2, ...] at every position t, each (B, T, vocab), causal."""
        h = self.trunk(idx, mask="causal", n_layers=self.cfg.n_layer - 1)
        rope = self.rope(h.shape[1])
        return [self.head(block(h, "causal", None, rope)) for block in (self.blocks[-1], *self.future_heads)]


@dataclass
class FutureTokenConfig(ModelConfig):
    n_future: int = knob(4, "tokens the small decoder predicts from each position (Walker 2024)", min=1)
    ftp_layers: int = knob(1, "blocks of the small future-token decoder", min=1)


@register_model
class FutureTokenTransformer(Transformer):
    """Walker's future-token prediction: the top-layer state at each position is expanded
    linearly into a pseudo-sequence of n_future vectors, and a small decoder cross-attends
    to it to predict the next n_future tokens (teacher-forced).

    `forward` and its hooks are the plain `Transformer` (the trunk is the encoder);
    `next_token_logits` is the model's own next-token prediction (decoder slot 0).
    """

    config_class = FutureTokenConfig

    def __init__(self, cfg: FutureTokenConfig):
        super().__init__(cfg)
        self.ftp_expand = nn.Linear(cfg.d_model, cfg.n_future * cfg.d_model, bias=cfg.bias)
        self.ftp_slot = nn.Embedding(cfg.n_future, cfg.d_model)  # which future offset a decoder slot is
        self.ftp_blocks = nn.ModuleList([DecoderBlock(cfg) for _ in range(cfg.ftp_layers)])
        self.ftp_ln = make_norm(cfg)
        init_like_transformer(nn.ModuleList([self.ftp_expand, self.ftp_slot, self.ftp_blocks]), cfg.n_layer)
        self.hook_pseudo_sequence = HookPoint()  # (B*T, n_future, d_model): the expanded top-layer states

    def future_logits(self, idx: torch.Tensor, slot_tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, n, vocab): slot j at position t reads tokens t..t+j and predicts token t+j+1.

        slot_tokens (B, T, n <= n_future): slot_tokens[:, t, j] is token t+j (slot 0 is idx itself).
        """
        B, T, n = slot_tokens.shape
        top = self.ln_final(self.trunk(idx, mask="causal"))
        memory = self.hook_pseudo_sequence(self.ftp_expand(top).view(B * T, self.cfg.n_future, -1))
        x = self.embed(slot_tokens.reshape(B * T, n)) + self.ftp_slot.weight[:n]
        for block in self.ftp_blocks:
            x = block(x, memory, None, None)
        return self.unembed(self.ftp_ln(x)).view(B, T, n, -1)

    def next_token_logits(self, idx: torch.Tensor) -> torch.Tensor:
        return self.future_logits(idx, idx[:, :, None])[:, :, 0]

# --- the tabular PFN: in-context classification of table rows ------------------------------------
# `Transformer` with no positional encoding, fed ready-made row embeddings: a linear encoder of a
# row's features plus the embedding of its label. Labels are the transformer's tokens: ids
# 0..max_classes-1 are classes and id `max_classes` means "label hidden", so a query row carries the
# same features-only embedding whatever its true label. One custom attention mask does the in-context
# learning: every row attends to the training rows only. A variable number of features (zero-padded
# up to `max_features`, rescaled by max_features / used, as in TabPFN) and of classes (absent classes'
# logits masked). Hook points keep their names under `transformer.`.

@dataclass
class TabularPFNConfig(ModelConfig):
    """The transformer knobs plus the largest table the network takes."""

    max_features: int = knob(16, "features per row the network takes (fewer are zero-padded)", min=1)
    max_classes: int = knob(10, "classes the network can tell apart", min=2)
    vocab_size: int = knob(11, "label tokens: max_classes classes + 1 'label hidden' (set from max_classes)", min=3)
    mask: Literal["causal", "prefix", "bidirectional", "custom"] = knob("custom", "rows attend to training rows only")
    pos: Literal["learned", "sinusoidal", "rope", "none"] = knob("none", "rows are a set: no positions")
    tie_embeddings: bool = knob(False, "label embeddings and class head are separate, as in TabPFN")

    def __post_init__(self):
        self.vocab_size = self.max_classes + 1


@register_model
class TabularPFN(nn.Module):
    """Rows in, class logits out: (B, N, F) features and (B, N) labels -> (B, N, max_classes)."""

    config_class = TabularPFNConfig

    def __init__(self, cfg: TabularPFNConfig):
        super().__init__()
        self.cfg = cfg
        self.row_encoder = nn.Linear(cfg.max_features, cfg.d_model)
        self.transformer = Transformer(cfg)
        self.hidden_label = cfg.max_classes  # the token of a row whose label the model may not see

    def attention_mask(self, n_rows: int, n_train: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(n_rows, n_rows) boolean, True = may attend: every row attends to the training rows only."""
        keys = torch.arange(n_rows, device=device) < n_train
        return keys[None, :].expand(n_rows, n_rows)

    def embed_rows(self, x: torch.Tensor, y: torch.Tensor, n_train: int,
                   n_features: torch.Tensor | None = None) -> torch.Tensor:
        B, N, F_in = x.shape
        if F_in > self.cfg.max_features:
            raise ValueError(f"x has {F_in} features; this model takes at most max_features={self.cfg.max_features}")
        used = torch.full((B,), F_in, device=x.device) if n_features is None else n_features.to(x.device)
        x = F.pad(x, (0, self.cfg.max_features - F_in)) * (self.cfg.max_features / used.clamp(min=1))[:, None, None]
        is_query = torch.arange(N, device=x.device)[None, :] >= n_train
        tokens = torch.where(is_query, torch.full_like(y, self.hidden_label), y)  # query labels never enter
        return self.row_encoder(x) + self.transformer.embed(tokens)

    def forward(self, x: torch.Tensor, y: torch.Tensor, n_train: int | torch.Tensor,
                n_features: torch.Tensor | None = None, n_classes: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits for every row (B, N, max_classes); classes >= n_classes (per task) get -inf.

        x: (B, N, F<=max_features) standardised features; y: (B, N) labels, of which only
        the first n_train rows' are read; n_features: (B,) features actually used when x
        is zero-padded per task.
        """
        n_train = int(n_train)
        h = self.transformer.trunk(embeds=self.embed_rows(x, y, n_train, n_features),
                                   attn_mask=self.attention_mask(x.shape[1], n_train, x.device))
        logits = self.transformer.head(h)[..., : self.cfg.max_classes]
        if n_classes is not None:
            absent = torch.arange(self.cfg.max_classes, device=x.device)[None, :] >= n_classes.to(x.device)[:, None]
            logits = logits.masked_fill(absent[:, None, :], float("-inf"))
        return logits

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per row (the training loop's 'token'); see Transformer.flops_per_token."""
        return self.transformer.flops_per_token(seq_len) + 6 * self.row_encoder.weight.numel()


# --- in-context regression: (x, y) pairs as vectors ----------------------------------------------
# `Transformer` over ready-made embeddings, reading a sequence of k (x, y) pairs and predicting each
# y_t from x_t and the pairs before it (causal mask), as in Garg et al. 2022 and Raventós et al. 2023.
# Two ways to make tokens (`tokens`): `interleaved` is theirs, 2k tokens x_1, y_1, x_2, y_2, ... (an x
# token [x, 0], a y token [0, ..., 0, y], plus the embedding of the token's type, 0: x, 1: y) with the
# prediction read at each x token; `pairs` is k tokens, token t = [x_t, x_{t-1}, y_{t-1}] (zeros before
# the first pair), so every earlier pair sits whole in one token and the sequence is half as long.
# One linear read-in, one linear read-out. Hook points keep their names under `transformer.`.

@dataclass
class ICLRegressorConfig(ModelConfig):
    """The transformer knobs plus the dimension of x, the longest context and the token layout."""

    n_dims: int = knob(8, "dimension d of x", min=1)
    n_points: int = knob(16, "longest sequence in (x, y) pairs; max_seq_len is set from it", min=1)
    tokens: Literal["interleaved", "pairs"] = knob("interleaved", "x and y tokens in turn (Garg et al.), or one "
                                                   "token per position holding x_t and the pair before it")
    vocab_size: int = knob(2, "token types: x and y (set)", min=2)
    tie_embeddings: bool = knob(True, "the unused unembedding shares the type embedding (no extra weights)")

    def __post_init__(self):
        self.vocab_size = 2
        self.max_seq_len = (2 if self.tokens == "interleaved" else 1) * self.n_points


@register_model
class ICLRegressor(nn.Module):
    """(B, T, d) xs and (B, T) ys -> (B, T) predictions of y_t from x_t and the pairs before it."""

    config_class = ICLRegressorConfig

    def __init__(self, cfg: ICLRegressorConfig):
        super().__init__()
        self.cfg = cfg
        width = cfg.n_dims + 1 if cfg.tokens == "interleaved" else 2 * cfg.n_dims + 1
        self.read_in = nn.Linear(width, cfg.d_model)
        self.transformer = Transformer(cfg)
        self.read_out = nn.Linear(cfg.d_model, 1)
        init_like_transformer(nn.ModuleList([self.read_in, self.read_out]), cfg.n_layer)

    def embed_pairs(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """The read-in vectors (B, 2T or T, d_model) of the sequence's tokens."""
        B, T, d = xs.shape
        if d != self.cfg.n_dims:
            raise ValueError(f"xs: this model reads x of dimension n_dims={self.cfg.n_dims}, got {d}")
        if ys.shape != (B, T):
            raise ValueError(f"ys: expected shape {(B, T)} to match xs, got {tuple(ys.shape)}")
        if self.cfg.tokens == "pairs":
            before = F.pad(torch.cat([xs, ys[..., None]], dim=-1), (0, 0, 1, 0))[:, :T]  # pair t-1 at position t
            return self.read_in(torch.cat([xs, before], dim=-1)) + self.transformer.embed.weight[0]
        x_tok = F.pad(xs, (0, 1))
        y_tok = F.pad(ys[..., None], (d, 0))
        tokens = torch.stack([x_tok, y_tok], dim=2).reshape(B, 2 * T, d + 1)
        types = torch.arange(2 * T, device=xs.device) % 2
        return self.read_in(tokens) + self.transformer.embed(types)[None]

    def forward(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        h = self.transformer.trunk(embeds=self.embed_pairs(xs, ys), mask="causal")
        if self.cfg.tokens == "interleaved":
            h = h[:, 0::2]  # the x tokens
        return self.read_out(self.transformer.ln_final(h))[..., 0]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per (x, y) pair (the training loop's 'token'; seq_len is n_points)."""
        per = 2 if self.cfg.tokens == "interleaved" else 1
        return per * self.transformer.flops_per_token(per * seq_len)
