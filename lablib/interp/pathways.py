"""Expert pathways of a mixture-of-experts model (Li, Fan & Zhou 2025, "Where to find Grokking in LLM
Pretraining? Monitor Memorization-to-Generalization without Test", arXiv:2506.21551).

Notable here:
- The pathway of a sample is the sequence of its expert choices across layers, for each of its
  tokens in turn: token 1 at layer 0, 1, ..., then token 2, ... Within one layer the k chosen
  experts are sorted by id, so a pathway is a string over the alphabet of expert ids of length
  tokens x layers x k. `expert_pathways` reads it from the `blocks.N.mlp.hook_expert_choice`
  hook points with `run_with_cache`.
- `pathway_distance`: the mean edit (Levenshtein) distance between the pathways of all pairs of
  samples of a group, divided by the pathway length (0: every sample takes one shared route;
  near 1: unrelated routes). `edit_distance_matrix` computes all pairs at once, the dynamic
  programme's row loop running over every pair together (numpy, no Python loop over pairs).
- `pathway_complexity`: the paper's single-sample measure is the consistency of the experts a
  token is routed to between subsequent layers, the cosine similarity of their weighted expert
  embeddings. Our reading of it: a layer's expert embedding of a token is the sum over its k
  chosen experts of the gate weight times that expert's router row (unit length; the routers of
  all layers read the same residual stream, so the vectors are comparable across layers); the
  complexity of a sample is 1 minus the mean cosine similarity between consecutive layers'
  embeddings, averaged over its tokens (0: the same direction through the depth; up to 2).
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import torch

CHOICE = "blocks.{layer}.mlp.hook_expert_choice"
LOGITS = "blocks.{layer}.mlp.hook_router_logits"


def moe_layers(model) -> list[int]:
    """Indices of the blocks whose MLP is a mixture of experts."""
    points = model.hook_points()
    return [i for i in range(len(model.blocks)) if CHOICE.format(layer=i) in points]


@torch.no_grad()
def routing(model, rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(choices (L, B, T, k) expert ids, gates (L, B, T, k) router probabilities of those experts) for rows (B, T)."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("routing: the model has no mixture-of-experts layer (set n_experts in its config)")
    names = [n.format(layer=i) for i in layers for n in (CHOICE, LOGITS)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    _, cache = model.run_with_cache(rows.to(device), names=names, mask="causal")
    model.train(was_training)
    choices = torch.stack([cache[CHOICE.format(layer=i)] for i in layers])
    probs = torch.stack([torch.softmax(cache[LOGITS.format(layer=i)].float(), -1) for i in layers])
    return choices.cpu().numpy(), probs.gather(-1, choices).cpu().numpy()


def pathway_strings(choices: np.ndarray, token_index: np.ndarray) -> np.ndarray:
    """Pathways (S, tokens * L * k) from choices (L, B, T, k); token_index (S, tokens) of (row, position) pairs
    flattened as row * T + position, in the sample's token order."""
    L, B, T, k = choices.shape
    flat = np.sort(choices, axis=-1).reshape(L, B * T, k)  # within a layer the k experts are a set
    picked = flat[:, token_index]  # (L, S, tokens, k)
    return picked.transpose(1, 2, 0, 3).reshape(token_index.shape[0], -1)


def edit_distance_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Levenshtein distances between strings a[i] and b[i] (arrays (P, n) and (P, m) of symbols), all pairs at once."""
    P, n = a.shape
    m = b.shape[1]
    prev = np.broadcast_to(np.arange(m + 1), (P, m + 1)).copy()
    for i in range(1, n + 1):
        cur = np.empty_like(prev)
        cur[:, 0] = i
        sub = prev[:, :-1] + (a[:, i - 1:i] != b)  # (P, m): substitution or match
        best = np.minimum(sub, prev[:, 1:] + 1)  # or deletion
        for j in range(1, m + 1):  # insertion depends on the row being written
            cur[:, j] = np.minimum(best[:, j - 1], cur[:, j - 1] + 1)
        prev = cur
    return prev[:, m]


def pathway_distance(pathways: np.ndarray) -> float:
    """Mean normalised edit distance between the pathways (S, n) of every pair of samples."""
    S, n = pathways.shape
    if S < 2:
        raise ValueError(f"pathway_distance: expected at least 2 samples, got {S}")
    i, j = np.array(list(combinations(range(S), 2))).T
    return float(edit_distance_matrix(pathways[i], pathways[j]).mean() / n)


def pathway_complexity(model, choices: np.ndarray, gates: np.ndarray, token_index: np.ndarray) -> np.ndarray:
    """Per sample: 1 - mean cosine similarity of weighted expert embeddings between consecutive MoE layers
    (see the module docstring). choices, gates: (L, B, T, k); token_index: (S, tokens). Needs >= 2 layers."""
    layers = moe_layers(model)
    if len(layers) < 2:
        raise ValueError("pathway_complexity: needs at least two mixture-of-experts layers")
    L, B, T, k = choices.shape
    rows = [torch.nn.functional.normalize(model.blocks[i].mlp.router.weight.detach().float(), dim=-1).cpu().numpy()
            for i in layers]  # (E, d_model) per layer
    emb = np.stack([(rows[l][choices[l]] * gates[l][..., None]).sum(-2) for l in range(L)])  # (L, B, T, d)
    emb = emb.reshape(L, B * T, -1)[:, token_index]  # (L, S, tokens, d)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    cos = (emb[:-1] * emb[1:]).sum(-1)  # (L-1, S, tokens)
    return 1.0 - cos.mean(axis=(0, 2))
