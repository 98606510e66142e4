"""The reversal-and-tracing experiment (notebooks/06_reversal_and_tracing.ipynb): the reversal curse
on fictional families (parent/child chains plus friend and colleague facts), then causal tracing and
single-layer edits of the same facts.

Notable here:
- `ReversalConfig` / `train_reversal_variant`: one fresh model per training-text variant
  (`lablib.tasks.facts.REVERSAL_VARIANTS`) and seed, scored forward and reverse by `reversal_accuracy`.
- `evaluation_splits`: the forward-only pairs in a `dev` split (the trivial rule is chosen
  there) and a `test` split (reported); `untrained_accuracy` and `trivial_rule_scores` are the
  baselines on the same items.
- `ReversalTracingConfig` adds the tracing and editing knobs; `trace_pairs`, `edit_sweep`
  and `trace_checkpoints` run `lablib.interp.tracing` on the experiment's forward facts.
  `EDIT_METHODS` is the table of edits the notebook sweeps.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from lablib.config import ConfigError, ModelConfig, TrainConfig, knob
from lablib.data import Tokenizer
from lablib.evidence import assign_splits
from lablib.interp.analysis import sequence_logprobs
from lablib.interp.tracing import (SITES, Trace, edit_layer, edit_scores, embedding_noise_std, mean_recovery,
                                   rank_one_edit, subject_positions, trace_fact)
from lablib.objectives import CausalLM
from lablib.seeding import seeded_transformer
from lablib.tasks.facts import (FORWARD_RELATION, REVERSAL_VARIANTS, TRIVIAL_RULES, ReversalData, ReversalStream,
                                make_reversal_data, reversal_accuracy, trivial_accuracy)
from lablib.train import train


@dataclass
class ReversalConfig(ModelConfig, TrainConfig):
    n_families: int = knob(40, "families, each a chain of `generations` people (so a person is a child and a parent)", min=2)
    generations: int = knob(3, "people per family chain; a family holds generations - 1 parent/child pairs", min=2)
    n_both: int = knob(24, "pairs also written in the reverse wording, to teach it; the rest are the test", min=0)
    variants: list[str] = knob(list(REVERSAL_VARIANTS), "training-text variants, one run each: " + ", ".join(REVERSAL_VARIANTS))
    transform_prob: float = knob(0.5, "probability that a training sentence is written through the variant's transform",
                                 min=0.0, max=1.0)

    presets: ClassVar[dict] = {
        "smoke": dict(n_families=6, n_both=4, steps=30, n_layer=2, n_head=2, d_model=32, seq_len=32, max_seq_len=32,
                      batch_size=16, warmup_steps=5, log_every=10, checkpoint_every=10, num_threads=1),
        "cpu": dict(n_families=32, n_both=20, steps=600, n_layer=4, n_head=4, d_model=128, seq_len=32, max_seq_len=32,
                    batch_size=32, learning_rate=2e-3, warmup_steps=100, weight_decay=0.1, log_every=50,
                    checkpoint_every=250,
                    num_threads=1),  # a model this small runs fastest on one thread, above all on a busy machine
        "gpu": dict(n_families=500, n_both=300, steps=6000, n_layer=8, n_head=8, d_model=512, seq_len=64, max_seq_len=64,
                    batch_size=128, learning_rate=6e-4, warmup_steps=300, log_every=50, checkpoint_every=1000),
    }

    def validate(self) -> None:
        super().validate()
        unknown = [v for v in self.variants if v not in REVERSAL_VARIANTS]
        if unknown or not self.variants:
            raise ConfigError(f"parameter 'variants': expected a non-empty list from {', '.join(REVERSAL_VARIANTS)}, "
                              f"got {self.variants}")
        if self.n_both >= self.n_pairs:
            raise ConfigError(f"parameter 'n_both': expected fewer than the {self.n_pairs} parent/child pairs "
                              f"(n_families * (generations - 1)), got {self.n_both}")

    @property
    def n_pairs(self) -> int:
        return self.n_families * (self.generations - 1)

    @property
    def n_names(self) -> int:
        return self.n_families * self.generations


def train_reversal_variant(cfg: ReversalConfig, data: ReversalData, tokenizer: Tokenizer, variant: str, run=None,
                           progress: bool = True):
    """A fresh model trained on `variant`'s text; returns (model, TrainResult)."""
    model = seeded_transformer(cfg, tokenizer.vocab_size)
    if run is not None:
        tokenizer.save(run.path / "tokenizer.json")
    stream = ReversalStream(data, tokenizer, variant, cfg.seq_len, cfg.transform_prob)
    result = train(model, CausalLM(), stream, cfg.project(TrainConfig), run, progress=progress)
    return model, result


@dataclass
class ReversalTracingConfig(ReversalConfig):
    seeds: list[int] = knob([0], "seeds (world, initialisation, data order), one model per variant each; "
                                 "tracing and editing use the first")
    dev_fraction: float = knob(0.5, "share of the test pairs put in the dev split (choices are made there)",
                               min=0.0, max=1.0, min_exclusive=True)
    trace_facts: int = knob(12, "forward facts (from the test pairs) that are traced and edited", min=1)
    noise_scale: float = knob(3.0, "subject-embedding noise in units of the embeddings' std (ROME uses 3)", min=0.0)
    trace_samples: int = knob(10, "noise samples averaged per trace", min=1)
    trace_window: int = knob(1, "consecutive layers whose attention / MLP states are restored together", min=1)
    edit_steps: int = knob(10, "Adam steps of a single-layer edit", min=1)
    edit_lr: float = knob(1e-2, "learning rate of a single-layer edit", min=0.0, min_exclusive=True)

    presets: ClassVar[dict] = {
        "smoke": {**ReversalConfig.presets["smoke"], "trace_facts": 2, "trace_samples": 2, "edit_steps": 2,
                  "variants": ["plain", "chunk_reversal"], "seeds": [0, 1]},
        "cpu": {**ReversalConfig.presets["cpu"], "edit_steps": 20, "seeds": [0, 1, 2], "trace_facts": 8},
        "gpu": {**ReversalConfig.presets["gpu"], "trace_facts": 50, "trace_window": 3, "seeds": [0, 1, 2]},
    }

    def validate(self) -> None:
        super().validate()
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"parameter 'seeds': expected a non-empty list of distinct seeds, got {self.seeds}")
        if self.dev_fraction >= 1.0:
            raise ConfigError(f"parameter 'dev_fraction': expected a value below 1 (the test split must hold pairs), "
                              f"got {self.dev_fraction}")


def with_seed(cfg: ReversalTracingConfig, seed: int) -> ReversalTracingConfig:
    """The same config with `seed` (world, initialisation and data order) set."""
    out = copy.copy(cfg)  # keeps attributes set after construction (the preset's name)
    out.seed = cfg.check("seed", seed)
    out.validate()
    return out


def reversal_world(cfg: ReversalConfig) -> ReversalData:
    """The seed's world (families and acquaintances) with the config's sizes."""
    return make_reversal_data(cfg.n_families, cfg.n_both, seed=cfg.seed, generations=cfg.generations)


def evaluation_splits(data: ReversalData, dev_fraction: float = 0.5, seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """The forward-only pairs split into `dev` (choices: the trivial rule) and `test` (reported) by a
    stable hash of each pair; the pairs seen both ways are `both` (they check the reverse wording)."""
    split = assign_splits(data.forward_only, key=lambda pair: " -> ".join(pair), dev_fraction=dev_fraction, seed=seed)
    if not split["dev"] or not split["test"]:
        raise ValueError(f"evaluation splits: {len(data.forward_only)} forward-only pairs leave an empty split "
                         f"(dev {len(split['dev'])}, test {len(split['test'])}); use more families")
    return {"dev": split["dev"], "test": split["test"], "both": data.both}


def untrained_accuracy(cfg: ReversalConfig, data: ReversalData, tokenizer: Tokenizer,
                       groups: dict[str, Sequence[tuple[str, str]]]) -> dict[str, float]:
    """`reversal_accuracy` of the step-0 model (the seeded initialisation every variant starts from)."""
    return reversal_accuracy(seeded_transformer(cfg, tokenizer.vocab_size).eval(), tokenizer, data, groups)


def trivial_rule_scores(data: ReversalData, groups: dict[str, Sequence[tuple[str, str]]]) -> dict[str, Any]:
    """Every trivial rule's reverse exact match on dev and test, and the rule chosen on dev (the strongest there)."""
    scores = {name: trivial_accuracy(data, groups[name]) for name in ("dev", "test")}
    chosen = max(TRIVIAL_RULES, key=lambda rule: (scores["dev"][rule], -list(TRIVIAL_RULES).index(rule)))
    return {"dev": scores["dev"], "test": scores["test"], "chosen_on_dev": chosen}


def run_command(preset: str, parameters: dict[str, Any]) -> str:
    """The `lablib run` command line of notebooks/06_reversal_and_tracing.ipynb with these parameters."""
    from lablib.report import lablib_run_command

    return lablib_run_command("notebooks/06_reversal_and_tracing.ipynb", preset, parameters)


POSITION_LABELS = ["<eos>", "subject (first)", "subject (last)", *FORWARD_RELATION.split()]


def forward_fact_prompt(tokenizer: Tokenizer, parent: str, child: str) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, subject positions, answer ids) of "<eos> parent is the parent of" -> child."""
    subject_ids = tokenizer.encode(parent)
    prompt = [tokenizer.eos_id] + subject_ids + tokenizer.encode(FORWARD_RELATION)
    return prompt, subject_positions(prompt, subject_ids), tokenizer.encode(child)


def trace_pairs(model: torch.nn.Module, tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]],
                cfg: ReversalTracingConfig) -> list[Trace]:
    """A causal trace of the child's first token for each (parent, child) pair."""
    noise_std = embedding_noise_std(model, cfg.noise_scale)
    traces = []
    for parent, child in pairs:
        prompt, subject, answer = forward_fact_prompt(tokenizer, parent, child)
        traces.append(trace_fact(model, prompt, subject, answer[0], noise_std, cfg.trace_samples,
                                 window=cfg.trace_window, seed=cfg.seed, token_strings=tokenizer.token_strings(prompt)))
    return traces


# edit method -> (editor, where its key sits: the last subject token, as in ROME, or the prompt's last token)
EDIT_METHODS = {
    "finetune": (lambda model, layer, prompt, key_pos, answer, cfg:
                 edit_layer(model, layer, prompt, answer, cfg.edit_steps, cfg.edit_lr), "last"),
    "rank_one_subject": (lambda model, layer, prompt, key_pos, answer, cfg:
                         rank_one_edit(model, layer, prompt, key_pos, answer, cfg.edit_steps, cfg.edit_lr), "subject"),
    "rank_one_last": (lambda model, layer, prompt, key_pos, answer, cfg:
                      rank_one_edit(model, layer, prompt, key_pos, answer, cfg.edit_steps, cfg.edit_lr), "last"),
}


def edit_sweep(model: torch.nn.Module, tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]],
               cfg: ReversalTracingConfig, traces: Sequence[Trace]) -> list[dict]:
    """Rewrite each pair's child to the next pair's child with each method at each layer in turn,
    from the trained weights every time. One row per (fact, method, layer): the edit's scores and
    the trace's MLP recovery at that layer at the method's position (fine-tuning changes every
    position, so it is set beside the last token, where this model's traces peak)."""
    rows = []
    facts = [forward_fact_prompt(tokenizer, p, c) for p, c in pairs]
    for i, ((prompt, subject, _), trace) in enumerate(zip(facts, traces)):
        new_answer = facts[(i + 1) % len(facts)][2]
        others = [(p, a) for j, (p, _, a) in enumerate(facts) if j != i]
        before = float(sequence_logprobs(model, [prompt], [new_answer])[0])
        positions = {"subject": subject[-1], "last": len(prompt) - 1}
        for method, (edit, where) in EDIT_METHODS.items():
            for layer in range(len(model.blocks)):
                edited = edit(model, layer, prompt, positions[where], new_answer, cfg)
                scores = edit_scores(edited, prompt, new_answer, others)
                rows.append({"fact": i, "method": method, "position": where, "layer": layer, **scores,
                             "logprob_gain": scores["new_logprob"] - before,
                             "trace_mlp": float(trace.recovery("mlp")[layer, positions[where]]),
                             "trace_resid": float(trace.recovery("resid")[layer, positions[where]])})
    return rows


def trace_checkpoints(run, steps: Sequence[int], pairs: Sequence[tuple[str, str]],
                      cfg: ReversalTracingConfig) -> list[dict]:
    """Per checkpoint and layer: mean p(answer) of the clean run and mean recovery at the last subject
    token, for each site — how the location of the facts forms during training."""
    rows = []
    for step in steps:
        model, tokenizer = run.load_model(step)
        traces = trace_pairs(model, tokenizer, pairs, cfg)
        last_subject = traces[0].subject[-1]
        for site in SITES:
            recovery = mean_recovery(traces, site)
            for layer in range(recovery.shape[0]):
                rows.append({"step": step, "site": site, "layer": layer, "recovery": float(recovery[layer, last_subject]),
                             "p_clean": float(np.mean([t.p_clean for t in traces])),
                             "p_corrupt": float(np.mean([t.p_corrupt for t in traces]))})
    return rows
