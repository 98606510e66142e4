"""Looking inside a model: attention, predictions, logit lens, probes and activation patching.

Notable here:
- Everything speaks the model's hook names (`blocks.0.attn.hook_pattern`,
  `blocks.1.hook_resid_post`, ...) through `run_with_cache` and `model.hooks(...)`,
  so it works on any checkpoint of any run whose model has those hook points.
- `analyze_prompt` computes what the checkpoint explorer shows (attention of every
  layer and head, top-k next-token predictions, per-token loss, logit lens) from one
  forward pass, as plain numpy arrays; widgets only draw them.
- `CheckpointModel` rebuilds a run's model once and swaps weights between
  checkpoints in place, so moving between steps costs one safetensors read.
- The logit lens decodes the residual stream after the embedding and after each
  block through the model's own final norm and unembedding (`model.head`).
- Probes are scikit-learn logistic regressions on cached activations, scored on
  held-out rows against the majority-class baseline.
- Activation patching runs one batched forward pass per layer: row i of the batch is
  the corrupted prompt with position i's activation taken from the clean prompt.
- `sequence_logprobs` and `greedy_continuation` score and write continuations of token
  prompts (tasks and edits build on them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lablib.checkpoints import list_checkpoints, load_checkpoint

# Where patching can act: each name is a per-layer hook whose activation has positions on dim 1.
PATCH_SITES = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "z": "blocks.{layer}.attn.hook_z",
}


def n_layers(model: torch.nn.Module) -> int:
    return len(model.blocks)


def as_batch(tokens: torch.Tensor | list[int]) -> torch.Tensor:
    """Token ids as a (B, T) long tensor; a single sequence becomes a batch of one."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens: expected a non-empty (T,) or (B, T) tensor of ids, got shape {tuple(tokens.shape)}")
    return tokens


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def encode_prompt(tokenizer, text: str, max_len: int) -> list[int]:
    """The prompt's token ids, cut to the model's context (`max_len`); an empty prompt is one <eos>."""
    if not isinstance(text, str):
        raise ValueError(f"prompt: expected a string, got {text!r}")
    ids = tokenizer.encode(text)[:max_len]
    return ids or [tokenizer.eos_id]


# --- single analyses -----------------------------------------------------------------

@torch.no_grad()
def attention_patterns(model: torch.nn.Module, tokens, **forward_kwargs) -> torch.Tensor:
    """Attention weights (B, layers, heads, T_query, T_key) after softmax."""
    tokens = as_batch(tokens).to(_device(model))
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(n_layers(model))]
    _, cache = model.run_with_cache(tokens, names=names, **forward_kwargs)
    return torch.stack([cache[n].float() for n in names], dim=1)


def top_k_predictions(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, token ids) of the k likeliest next tokens at every position: each (..., T, k)."""
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.topk(probs, min(k, probs.shape[-1]), dim=-1)


def per_token_loss(logits: torch.Tensor, tokens) -> torch.Tensor:
    """Cross-entropy of each next token: (B, T-1), entry t is the loss of token t+1 given tokens <= t."""
    tokens = as_batch(tokens).to(logits.device)
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none")


def residual_stream_names(model: torch.nn.Module) -> list[str]:
    """The residual stream after the embedding, then after each block."""
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(n_layers(model))]


def layer_labels(model: torch.nn.Module) -> list[str]:
    return ["embed"] + [f"block {i}" for i in range(n_layers(model))]


@torch.no_grad()
def decode_residuals(model: torch.nn.Module, cache: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logit lens from a cache: (B, layers+1, T, vocab) logits of each residual stream through final norm + unembed."""
    return torch.stack([model.head(cache[n]).float() for n in residual_stream_names(model)], dim=1)


@torch.no_grad()
def logit_lens(model: torch.nn.Module, tokens, **forward_kwargs) -> torch.Tensor:
    """(B, layers+1, T, vocab) logits read off the residual stream after the embedding and each block.

    The last entry equals the model's own logits.
    """
    tokens = as_batch(tokens).to(_device(model))
    _, cache = model.run_with_cache(tokens, names=residual_stream_names(model), **forward_kwargs)
    return decode_residuals(model, cache)


# --- everything the explorer shows, from one forward pass ------------------------------

@dataclass
class PromptAnalysis:
    """One prompt through one checkpoint, as numpy arrays ready to draw.

    Positions are the prompt's tokens; `token_loss[t]` and `lens_next_prob[:, t]` are
    about predicting token t+1 from position t (NaN at the last position).
    """

    tokens: list[str]  # (T,) how each token reads
    token_ids: list[int]
    attention: np.ndarray  # (layers, heads, T, T)
    top_k_probs: np.ndarray  # (T, k)
    top_k_tokens: list[list[str]]  # (T, k)
    token_loss: np.ndarray  # (T,), NaN at the last position
    layers: list[str]  # logit-lens rows: "embed", "block 0", ...
    lens_top_tokens: list[list[str]]  # (layers+1, T) top-1 token of each residual stream
    lens_top_probs: np.ndarray  # (layers+1, T)
    lens_next_prob: np.ndarray  # (layers+1, T) probability of the actual next token, NaN at the last position
    step: int | None = None

    @property
    def mean_loss(self) -> float:
        return float(np.nanmean(self.token_loss)) if len(self.token_loss) > 1 else float("nan")


@torch.no_grad()
def analyze_prompt(model: torch.nn.Module, tokenizer, text: str, k: int = 5, step: int | None = None,
                   **forward_kwargs) -> PromptAnalysis:
    """Attention, top-k, per-token loss and logit lens of `text` under `model`, in one cached forward pass."""
    ids = encode_prompt(tokenizer, text, model.cfg.max_seq_len)
    tokens = as_batch(ids).to(_device(model))
    L = n_layers(model)
    attn_names = [f"blocks.{i}.attn.hook_pattern" for i in range(L)]
    logits, cache = model.run_with_cache(tokens, names=attn_names + residual_stream_names(model), **forward_kwargs)
    probs, top_ids = top_k_predictions(logits[0], k)
    lens_probs = torch.softmax(decode_residuals(model, cache)[0], dim=-1)  # (L+1, T, V)
    lens_top_probs, lens_top_ids = lens_probs.max(dim=-1)
    next_ids = tokens[0, 1:]
    nan_column = torch.full((L + 1, 1), float("nan"), device=lens_probs.device)
    lens_next = torch.cat([lens_probs[:, :-1].gather(-1, next_ids[None, :, None].expand(L + 1, -1, 1))[..., 0],
                           nan_column], dim=1)
    loss = torch.cat([per_token_loss(logits, tokens)[0], torch.tensor([float("nan")], device=logits.device)])
    strings = tokenizer.token_strings
    return PromptAnalysis(
        tokens=strings(ids), token_ids=list(ids),
        attention=torch.stack([cache[n][0].float() for n in attn_names]).cpu().numpy(),
        top_k_probs=probs.cpu().numpy(), top_k_tokens=[strings(row) for row in top_ids.tolist()],
        token_loss=loss.cpu().numpy(), layers=layer_labels(model),
        lens_top_tokens=[strings(row) for row in lens_top_ids.tolist()],
        lens_top_probs=lens_top_probs.cpu().numpy(), lens_next_prob=lens_next.cpu().numpy(), step=step)


class CheckpointModel:
    """A run's model built once; `at(step)` swaps in that checkpoint's weights (in place, eval mode)."""

    def __init__(self, run, device: str = "cpu"):
        from lablib.runs import open_run

        self.run = run if hasattr(run, "build_model") else open_run(run)
        self.device = device
        self.model: torch.nn.Module | None = None
        self.tokenizer = None
        self.step: int | None = None

    @property
    def path(self) -> Path:
        return self.run.path

    def steps(self) -> list[int]:
        return list_checkpoints(self.path)

    def at(self, step: int) -> torch.nn.Module:
        if self.model is None:
            self.model = self.run.build_model().to(self.device).eval()
            self.tokenizer = self.run.tokenizer()
            if self.tokenizer is None:
                raise FileNotFoundError(f"{self.path} has no tokenizer.json; the explorer needs it to read prompts")
        if step != self.step:
            load_checkpoint(self.path, step, self.model, device=self.device)
            self.step = step
        return self.model

    def analyze(self, step: int, text: str, k: int = 5) -> PromptAnalysis:
        return analyze_prompt(self.at(step), self.tokenizer, text, k=k, step=step)

    def prompt_loss_by_step(self, text: str, steps: list[int] | None = None):
        """Mean next-token loss of `text` at each checkpoint: a DataFrame with columns step, loss."""
        import pandas as pd

        return pd.DataFrame([{"step": s, "loss": self.analyze(s, text).mean_loss} for s in (steps or self.steps())])


# --- linear probes ---------------------------------------------------------------------

@torch.no_grad()
def collect_activations(model: torch.nn.Module, tokens, names: list[str], position: int | None = -1,
                        batch_size: int = 64, **forward_kwargs) -> dict[str, np.ndarray]:
    """Activations at hook `names` as (rows, features) arrays.

    position: one position per sequence (rows = sequences; -1 = the last token), or
    None for every position (rows = sequences * positions, in row-major order).
    """
    tokens = as_batch(tokens)
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, tokens.shape[0], batch_size):
        chunk = tokens[start:start + batch_size].to(_device(model))
        _, cache = model.run_with_cache(chunk, names=names, **forward_kwargs)
        for n in names:
            act = cache[n].float()
            act = act[:, position] if position is not None else act.reshape(-1, *act.shape[2:])
            out[n].append(act.reshape(act.shape[0], -1).cpu().numpy())
    return {n: np.concatenate(parts) for n, parts in out.items()}


@dataclass
class ProbeResult:
    train_accuracy: float
    test_accuracy: float
    majority_baseline: float  # accuracy of always guessing the most common training label, on the test rows
    n_train: int
    n_test: int
    classifier: Any = field(repr=False)


def fit_probe(features: np.ndarray, labels, test_fraction: float = 0.25, seed: int = 0,
              regularization: float = 1.0) -> ProbeResult:
    """A logistic-regression probe (standardised features) scored on a held-out split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features, labels = np.asarray(features), np.asarray(labels)
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"fit_probe: expected features (rows, dims) and one label per row, got "
                         f"{features.shape} and {labels.shape}")
    if len(np.unique(labels)) < 2:
        raise ValueError("fit_probe: labels: expected at least two classes, got one")
    x_train, x_test, y_train, y_test = train_test_split(features, labels, test_size=test_fraction, random_state=seed)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=regularization, max_iter=2000))
    clf.fit(x_train, y_train)
    values, counts = np.unique(y_train, return_counts=True)
    return ProbeResult(float(clf.score(x_train, y_train)), float(clf.score(x_test, y_test)),
                       float(np.mean(y_test == values[counts.argmax()])), len(y_train), len(y_test), clf)


def probe_layers(model: torch.nn.Module, tokens, labels, position: int | None = -1, test_fraction: float = 0.25,
                 seed: int = 0, names: list[str] | None = None):
    """Fit one probe per residual-stream layer (or per hook in `names`); a DataFrame with one row each."""
    import pandas as pd

    names = names or residual_stream_names(model)
    acts = collect_activations(model, tokens, names, position)
    labels = np.asarray(labels).reshape(-1)
    label_of = dict(zip(residual_stream_names(model), layer_labels(model)))
    rows = []
    for n in names:
        r = fit_probe(acts[n], labels, test_fraction, seed)
        rows.append({"layer": label_of.get(n, n), "hook": n, "train_accuracy": r.train_accuracy,
                     "test_accuracy": r.test_accuracy, "majority_baseline": r.majority_baseline})
    return pd.DataFrame(rows)


# --- activation patching -----------------------------------------------------------------

def logit_difference(correct: int, wrong: int, position: int = -1) -> Callable[[torch.Tensor], torch.Tensor]:
    """Metric for patching: logit of `correct` minus logit of `wrong` at `position`, one value per batch row."""
    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, position, correct] - logits[:, position, wrong]
    return metric


@dataclass
class PatchingResult:
    effect: np.ndarray  # (layers, T): metric(patched) - metric(corrupted)
    clean: float  # metric on the clean prompt
    corrupted: float  # metric on the corrupted prompt
    site: str

    @property
    def restored(self) -> np.ndarray:
        """The effect as a fraction of the clean-minus-corrupted gap (1 = patching restores the clean metric)."""
        gap = self.clean - self.corrupted
        return self.effect / gap if gap != 0 else np.full_like(self.effect, np.nan)


@torch.no_grad()
def activation_patching(model: torch.nn.Module, clean, corrupted, metric: Callable[[torch.Tensor], torch.Tensor],
                        site: str = "resid_pre", **forward_kwargs) -> PatchingResult:
    """Effect on `metric` of copying the clean run's activation at `site` into the corrupted run, per (layer, position).

    clean, corrupted: token ids of equal length. metric: logits (B, T, V) -> (B,) values.
    site: a key of PATCH_SITES or a hook-name template with "{layer}" in it.
    """
    clean, corrupted = as_batch(clean), as_batch(corrupted)
    if clean.shape != corrupted.shape or clean.shape[0] != 1:
        raise ValueError(f"activation_patching: expected one clean and one corrupted prompt of equal length, "
                         f"got shapes {tuple(clean.shape)} and {tuple(corrupted.shape)}")
    template = PATCH_SITES.get(site, site)
    if "{layer}" not in template:
        raise ValueError(f"site: expected one of {', '.join(PATCH_SITES)} or a hook template with '{{layer}}', got {site!r}")
    device = _device(model)
    clean, corrupted = clean.to(device), corrupted.to(device)
    L, T = n_layers(model), clean.shape[1]
    names = [template.format(layer=i) for i in range(L)]
    clean_logits, cache = model.run_with_cache(clean, names=names, **forward_kwargs)
    clean_value = float(metric(clean_logits)[0])
    corrupted_value = float(metric(model(corrupted, **forward_kwargs))[0])
    rows = torch.arange(T, device=device)
    batch = corrupted.expand(T, T)  # row i will get position i patched
    effect = np.zeros((L, T))
    for layer, name in enumerate(names):
        clean_act = cache[name][0]  # (T, ...)

        def patch(act, _name, clean_act=clean_act):
            act = act.clone()
            act[rows, rows] = clean_act[rows]
            return act

        with model.hooks([(name, patch)]):
            effect[layer] = (metric(model(batch, **forward_kwargs)).float() - corrupted_value).cpu().numpy()
    return PatchingResult(effect, clean_value, corrupted_value, site)


# --- scoring continuations ------------------------------------------------------------------

@torch.no_grad()
def sequence_logprobs(model: torch.nn.Module, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
                      batch_size: int = 512) -> torch.Tensor:
    """log p(target | prompt) summed over exactly the target tokens, one value per pair (float64, CPU).

    Rows are right-padded: under the causal mask padding after the target cannot change it.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"prompts and targets: expected equal lengths, got {len(prompts)} and {len(targets)}")
    was_training = model.training
    model.eval()
    device = _device(model)
    out = []
    for start in range(0, len(prompts), batch_size):
        ps, ts = prompts[start:start + batch_size], targets[start:start + batch_size]
        rows = [list(p) + list(t) for p, t in zip(ps, ts)]
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        scored = torch.zeros(len(rows), width, dtype=torch.bool)  # True where the *next* token is a target token
        for i, (p, t) in enumerate(zip(ps, ts)):
            ids[i, :len(p) + len(t)] = torch.tensor(list(p) + list(t))
            scored[i, len(p) - 1:len(p) + len(t) - 1] = True
        logp = F.log_softmax(model(ids.to(device), mask="causal").float(), dim=-1).cpu().double()
        next_ids = torch.roll(ids, -1, dims=1)
        token_logp = logp.gather(-1, next_ids[..., None])[..., 0]
        out.append((token_logp * scored).sum(1))
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@torch.no_grad()
def greedy_continuation(model: torch.nn.Module, prompts: Sequence[Sequence[int]], n_tokens: int) -> list[list[int]]:
    """The argmax continuation of `n_tokens` tokens for each prompt (prompts of equal length batch together)."""
    model.eval()
    device = _device(model)
    out: list[list[int]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for rows in by_len.values():
        idx = torch.tensor([list(prompts[i]) for i in rows], device=device)
        for _ in range(n_tokens):
            nxt = model(idx, mask="causal")[:, -1].argmax(-1, keepdim=True)
            idx = torch.cat([idx, nxt], 1)
        for r, i in enumerate(rows):
            out[i] = idx[r, -n_tokens:].tolist()
    return out
