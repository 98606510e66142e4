"""Where facts live: causal tracing (Meng et al. 2022, ROME) and single-layer edits (Hase et al. 2023).

Notable here:
- Corruption adds Gaussian noise to the subject tokens' embeddings through the model's
  `hook_embed` hook point; the noise is drawn once per sample from a seeded generator and
  shared by every row of the batch, so rows differ only in what they restore.
- `restored_probability` is the one primitive: each batch row names the (hook, position)
  states it takes from the clean run. Tracing a (layer, position) grid is one batched
  forward pass per site and noise sample.
- Sites (`SITES`): the residual stream after a block (`resid`), the attention output
  (`attn`) and the MLP output (`mlp`), by the model's stable hook names. As in ROME,
  attention and MLP states may be restored over a window of neighbouring layers.
- `Trace` holds the clean, corrupted and restored probabilities of the answer;
  `recovery` is the fraction of the corruption's damage that restoring undoes.
- Two single-layer edits, as in Hase et al.: `edit_layer`, a few Adam steps on one
  block's MLP output matrix and nothing else (fine-tuning at one layer), and
  `rank_one_edit`, ROME's rank-one update of that matrix (with an identity key
  covariance) for the key at one position. `edit_scores` says whether the new answer
  won, and whether other facts kept theirs.
- `trace_text` traces a prompt given as text; `mean_recovery` averages traces that share
  one layout.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lablib.data import Tokenizer
from lablib.interp.analysis import greedy_continuation

SITES = {
    "resid": "blocks.{layer}.hook_resid_post",
    "attn": "blocks.{layer}.hook_attn_out",
    "mlp": "blocks.{layer}.hook_mlp_out",
}


def site_name(site: str, layer: int) -> str:
    if site not in SITES:
        raise ValueError(f"site: expected one of {', '.join(SITES)}, got {site!r}")
    return SITES[site].format(layer=layer)


def embedding_noise_std(model: torch.nn.Module, scale: float = 3.0) -> float:
    """ROME's noise level: `scale` times the standard deviation of the token embeddings."""
    return scale * float(model.embed.weight.detach().std())


@torch.no_grad()
def clean_cache(model: torch.nn.Module, ids: torch.Tensor, names: Sequence[str]) -> tuple[torch.Tensor, dict]:
    """Logits at the last position and the named activations of the uncorrupted prompt ids (1-D)."""
    logits, cache = model.run_with_cache(ids[None], names=list(names), mask="causal")
    return logits[0, -1], cache


@torch.no_grad()
def restored_probability(model: torch.nn.Module, ids: torch.Tensor, subject: Sequence[int], target: int,
                         noise: torch.Tensor, restorations: Sequence[Sequence[tuple[str, int]]],
                         cache: dict[str, torch.Tensor]) -> np.ndarray:
    """p(target) at the last position with the subject embeddings corrupted by `noise`
    (len(subject), d_model), one value per row; row i puts back the clean states
    `restorations[i]` = [(hook name, position), ...] taken from `cache`."""
    n_rows = len(restorations)
    subject = torch.as_tensor(list(subject), dtype=torch.long)
    by_hook: dict[str, tuple[list[int], list[int]]] = {}
    for row, states in enumerate(restorations):
        for name, pos in states:
            rows, positions = by_hook.setdefault(name, ([], []))
            rows.append(row)
            positions.append(pos)

    def corrupt(x, name):
        x = x.clone()
        x[:, subject] += noise.to(x.dtype)
        return x

    def restore(x, name):
        rows, positions = by_hook[name]
        x = x.clone()
        x[rows, positions] = cache[name][0, positions].to(x.dtype)
        return x

    hooks = [("hook_embed", corrupt)] + [(name, restore) for name in by_hook]
    with model.hooks(hooks):
        logits = model(ids[None].expand(n_rows, -1), mask="causal")[:, -1]
    return F.softmax(logits.float(), -1)[:, target].cpu().numpy()


@dataclass
class Trace:
    tokens: list[str]
    subject: list[int]
    target: int
    p_clean: float
    p_corrupt: float
    restored: dict[str, np.ndarray]  # site -> (n_layer, n_positions) p(answer) with that state restored

    def effect(self, site: str) -> np.ndarray:
        """Indirect effect: how much restoring each state raises p(answer) above the corrupted run."""
        return self.restored[site] - self.p_corrupt

    def recovery(self, site: str) -> np.ndarray:
        """Fraction of the damage undone: 0 = as corrupted, 1 = as clean."""
        damage = self.p_clean - self.p_corrupt
        return self.effect(site) / damage if abs(damage) > 1e-12 else np.zeros_like(self.restored[site])


def trace_fact(model: torch.nn.Module, ids: Sequence[int], subject: Sequence[int], target: int,
               noise_std: float, n_samples: int = 10, sites: Sequence[str] = tuple(SITES), window: int = 1,
               seed: int = 0, token_strings: Sequence[str] | None = None) -> Trace:
    """Causal trace of one prompt: restore each (layer, position) state of each site under noise.

    window: attention and MLP states are restored at `window` consecutive layers centred on
    the layer (ROME uses 10 in 48-layer GPT-2 XL); the residual stream always at one.
    """
    model.eval()
    device = next(model.parameters()).device
    ids_t = torch.as_tensor(list(ids), device=device)
    n_layer, T = len(model.blocks), len(ids)
    names = [site_name(s, layer) for s in sites for layer in range(n_layer)]
    logits, cache = clean_cache(model, ids_t, names)
    p_clean = float(F.softmax(logits.float(), -1)[target])
    gen = torch.Generator().manual_seed(seed)
    d_model = model.embed.weight.shape[1]
    noises = [torch.randn(len(subject), d_model, generator=gen).to(device) * noise_std for _ in range(n_samples)]
    p_corrupt = float(np.mean([restored_probability(model, ids_t, subject, target, nz, [[]], cache)[0]
                               for nz in noises]))
    restored = {}
    for site in sites:
        width = 1 if site == "resid" else max(1, window)
        grid = [[(site_name(site, w), pos) for w in range(max(0, layer - width // 2), min(n_layer, layer - width // 2 + width))]
                for layer in range(n_layer) for pos in range(T)]
        p = np.mean([restored_probability(model, ids_t, subject, target, nz, grid, cache) for nz in noises], axis=0)
        restored[site] = p.reshape(n_layer, T)
    tokens = list(token_strings) if token_strings is not None else [str(i) for i in ids]
    return Trace(tokens, list(subject), target, p_clean, p_corrupt, restored)


def subject_positions(prompt_ids: Sequence[int], subject_ids: Sequence[int]) -> list[int]:
    """Positions of the first occurrence of `subject_ids` inside `prompt_ids`."""
    n = len(subject_ids)
    for start in range(len(prompt_ids) - n + 1):
        if list(prompt_ids[start:start + n]) == list(subject_ids):
            return list(range(start, start + n))
    raise ValueError(f"subject tokens {list(subject_ids)} do not occur in the prompt {list(prompt_ids)}")


# --- editing one layer --------------------------------------------------------------------------

def _target_nll(model, prompt: Sequence[int], target: Sequence[int]) -> torch.Tensor:
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt) + list(target)], device=device)
    logits = model(ids[:, :-1], mask="causal")[0, len(prompt) - 1:]
    return F.cross_entropy(logits.float(), ids[0, len(prompt):], reduction="sum")


def edit_layer(model: torch.nn.Module, layer: int, prompt: Sequence[int], new_target: Sequence[int],
               steps: int = 10, lr: float = 1e-2) -> torch.nn.Module:
    """A copy of `model` whose block `layer` MLP output matrix took `steps` Adam steps towards
    `new_target` after `prompt`; every other weight is untouched."""
    edited = copy.deepcopy(model)
    edited.eval()
    for p in edited.parameters():
        p.requires_grad_(False)
    weight = edited.blocks[layer].mlp.c_proj.weight
    weight.requires_grad_(True)
    opt = torch.optim.Adam([weight], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        _target_nll(edited, prompt, new_target).backward()
        opt.step()
    weight.requires_grad_(False)
    return edited


def rank_one_edit(model: torch.nn.Module, layer: int, prompt: Sequence[int], subject_last: int,
                  new_target: Sequence[int], steps: int = 10, lr: float = 1e-2) -> torch.nn.Module:
    """A copy of `model` with ROME's rank-one update of block `layer`'s MLP output matrix, with an
    identity key covariance: `steps` Adam steps find the change d of the MLP output at the last
    subject token that makes `new_target` likely; then W <- W + d k^T / (k^T k), where k is the
    MLP's hidden activation there, so the edited layer outputs exactly that change for this key."""
    edited = copy.deepcopy(model)
    edited.eval()
    for p in edited.parameters():
        p.requires_grad_(False)
    device = next(edited.parameters()).device
    _, cache = edited.run_with_cache(torch.tensor([list(prompt)], device=device),
                                     names=[f"blocks.{layer}.mlp.hook_post"], mask="causal")
    key = cache[f"blocks.{layer}.mlp.hook_post"][0, subject_last]
    delta = torch.zeros(edited.embed.weight.shape[1], device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr * 10)  # a free vector moves in larger steps than a weight matrix

    def add_delta(x, name):
        x = x.clone()
        x[:, subject_last] = x[:, subject_last] + delta
        return x

    for _ in range(steps):
        opt.zero_grad()
        with edited.hooks([(f"blocks.{layer}.hook_mlp_out", add_delta)]):
            _target_nll(edited, prompt, new_target).backward()
        opt.step()
    with torch.no_grad():
        edited.blocks[layer].mlp.c_proj.weight += torch.outer(delta, key) / key.dot(key)
    return edited


@torch.no_grad()
def edit_scores(edited: torch.nn.Module, prompt: Sequence[int], new_target: Sequence[int],
                others: Sequence[tuple[Sequence[int], Sequence[int]]]) -> dict[str, float]:
    """Did the edit take (greedy continuation = new target; its log-probability), and what fraction
    of `others` (prompt, answer) still continue with their own answer (specificity)?"""
    success = greedy_continuation(edited, [list(prompt)], len(new_target))[0] == list(new_target)
    kept = [True]
    if others:
        longest = max(len(a) for _, a in others)
        continuations = greedy_continuation(edited, [list(p) for p, _ in others], longest)
        kept = [g[:len(a)] == list(a) for g, (_, a) in zip(continuations, others)]
    return {"success": float(success), "new_logprob": float(-_target_nll(edited, prompt, new_target)),
            "specificity": float(np.mean(kept))}


def trace_text(model: torch.nn.Module, tokenizer: Tokenizer, prompt: str, subject: str, answer: str,
               noise_scale: float = 3.0, n_samples: int = 10, window: int = 1, seed: int = 0) -> Trace:
    """Causal trace of the answer's first token after `<eos> prompt`, corrupting `subject`'s tokens."""
    ids = [tokenizer.eos_id] + tokenizer.encode(prompt)
    return trace_fact(model, ids, subject_positions(ids, tokenizer.encode(subject)), tokenizer.encode(answer)[0],
                      embedding_noise_std(model, noise_scale), n_samples, window=window, seed=seed,
                      token_strings=tokenizer.token_strings(ids))


def mean_recovery(traces: Sequence[Trace], site: str) -> np.ndarray:
    """The (layer, position) recovery averaged over traces (the prompts share one layout)."""
    return np.mean([t.recovery(site) for t in traces], axis=0)
