"""Grokking in a pretraining mixture, seen through mixture-of-experts pathways
(notebooks/10_grokking_pathways.ipynb; Li, Fan & Zhou 2025, arXiv:2506.21551, on the small-scale
setting of Power et al. 2022 and Nanda et al. 2023).

Notable here:
- `GrokkingConfig`: the lab's transformer with a mixture-of-experts MLP (`n_experts`, `moe_top_k`),
  AdamW with strong weight decay, and a pretraining stream that mixes modular-arithmetic groups
  (`groups`, `lablib.tasks.modular`) into the default text corpus (`lablib.data`).
- `MixtureBatches.batch(index, ...)` (a pure function of (seed, index), so a resumed run sees the
  same stream): `algorithmic_share` of the rows are equations of one group drawn from that
  group's training pairs only, the rest are blocks of the corpus. The objective is the lab's
  causal LM over every token; the load-balancing loss is added by the training loop.
- `probe_callback`: at step 0 and at every checkpoint step, per group, answer accuracy on its
  training pairs and its held-out dev / test pairs, and the two pathway metrics
  (`lablib.interp.pathways`) on a fixed set of its training equations only.
- `train_model` trains one seed of the MoE model, or of the dense control (one MLP as wide
  as the k active experts together, so the same active parameters up to the router).
- Analysis of the logged curves: `grokking_steps` (training accuracy saturates vs held-out test
  accuracy rises, and the gap), `delta_correlation` (the metrics' change against the held-out
  accuracy's change between consecutive checkpoints, pooled over seeds and groups, with a
  bootstrap over (seed, group) curves) and `onset_lead` (whether a metric's half-way point
  comes before the held-out accuracy's).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from lablib.checkpoints import checkpoint_schedule
from lablib.config import ConfigError, DataConfig, ModelConfig, TrainConfig, knob
from lablib.data import LMData, prepare_lm_data
from lablib.evidence import Baselines, Headline, aggregate_seeds, mean_interval
from lablib.interp import pathways as pw
from lablib.objectives import CausalLM
from lablib.seeding import numpy_rng, seeded_transformer
from lablib.tasks import modular as task
from lablib.train import train

EXPERIMENT = "grokking_pathways"
METRICS = ("pathway_distance", "pathway_complexity")
SETS = ("train", "dev", "test")


@dataclass
class GrokkingConfig(ModelConfig, TrainConfig, DataConfig):
    """A mixture-of-experts transformer pretrained on text mixed with modular arithmetic, over `seeds`."""

    groups: list[str] = knob(["add:23", "sub:29", "mul:31"], "algorithmic groups OP:P (OP in add, sub, mul, div, "
                                                             "square_sum; P prime)")
    train_fraction: float = knob(0.5, "share of each group's (a, b) pairs in training; the rest is held out",
                                 min=0.0, max=1.0, min_exclusive=True)
    split_seed: int = knob(0, "seed of the train / held-out split of the pairs (the same for every training seed)",
                           min=0)
    algorithmic_share: float = knob(0.75, "share of each micro-batch's rows that are equations (the rest is text)",
                                    min=0.0, max=1.0, min_exclusive=True)
    probe_samples: int = knob(48, "training equations per group whose pathways are measured", min=2)
    seeds: list[int] = knob([0, 1, 2], "training seeds (MoE and dense control)")
    dense_control: bool = knob(True, "also train the dense-MLP control of the same active parameters")
    dense_seeds: list[int] | None = knob(None, "seeds of the dense control (None: all of seeds)")
    saturation_level: float = knob(0.95, "training accuracy at which a group counts as memorised", min=0.0, max=1.0)
    rise_level: float = knob(0.5, "held-out accuracy at which a group counts as generalising", min=0.0, max=1.0)
    n_experts: int | None = knob(4, "experts per MLP", min=2)
    corpus_max_chars: int | None = knob(400_000, "characters of the default corpus", min=1)

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # seconds: plumbing only
        "smoke": dict(groups=["add:5", "sub:7"], n_layer=2, n_head=2, d_model=16, d_mlp=16, seq_len=29,
                      max_seq_len=29, batch_size=4, steps=8, warmup_steps=2, checkpoint_every=4, log_every=2,
                      eval_every=4, eval_batches=1, probe_samples=6, seeds=[0, 1], corpus_max_chars=20_000),
        # ~25 minutes on one busy shared core: 3 seeds of the MoE and one of the dense control, a 2-layer width-64
        # model, 6000 steps of 24 rows (21 of 12 equations, 3 of text); lr x weight decay sets the decay clock
        "cpu": dict(groups=["add:47", "sub:41", "mul:37"], train_fraction=0.5, algorithmic_share=0.875, n_layer=2,
                    n_head=4, d_model=64, d_mlp=128, n_experts=4, moe_top_k=1, pos="rope", seq_len=59, max_seq_len=59,
                    batch_size=24, steps=6000, learning_rate=2e-3, weight_decay=0.5, beta2=0.98, warmup_steps=50,
                    schedule="constant", checkpoint_every=250, log_every=50, eval_every=500, eval_batches=2),
        # closer to the paper: more and larger groups, 8 experts with top-2 routing, 5 seeds
        "gpu": dict(groups=["add:97", "sub:89", "mul:83", "div:79", "square_sum:73"], train_fraction=0.5,
                    algorithmic_share=0.875, n_layer=4, n_head=8, d_model=256, d_mlp=512, n_experts=8, moe_top_k=2,
                    pos="rope", seq_len=119, max_seq_len=119, batch_size=128, steps=30000, learning_rate=1e-3,
                    weight_decay=1.0, beta2=0.98, warmup_steps=200, schedule="constant", checkpoint_every=500,
                    log_every=50, eval_every=1000, seeds=[0, 1, 2, 3, 4], corpus_max_chars=None, probe_samples=128),
    }

    def validate(self) -> None:
        super().validate()
        if self.n_experts is None:
            raise ConfigError("parameter 'n_experts': this experiment's model is a mixture of experts; expected >= 2, "
                              "got None (the dense control is trained beside it with dense_control=True)")
        if self.n_layer < 2:
            raise ConfigError(f"parameter 'n_layer': pathway complexity compares consecutive layers; expected >= 2, "
                              f"got {self.n_layer}")
        for text in self.groups:
            try:
                task.parse_group(text)
            except ValueError as e:
                raise ConfigError(f"parameter 'groups': {e}") from None
        if not self.groups or len(set(self.groups)) != len(self.groups):
            raise ConfigError(f"parameter 'groups': expected distinct groups, got {self.groups}")
        if self.seq_len + 1 < task.EQUATION_LEN:
            raise ConfigError(f"parameter 'seq_len': a row must hold one equation; expected >= {task.EQUATION_LEN - 1}, "
                              f"got {self.seq_len}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"parameter 'seeds': expected distinct seeds, got {self.seeds}")
        if self.dense_seeds is not None and not set(self.dense_seeds) <= set(self.seeds):
            raise ConfigError(f"parameter 'dense_seeds': expected some of seeds={self.seeds}, got {self.dense_seeds}")


# --- data --------------------------------------------------------------------------------------

@dataclass
class GrokkingData:
    """The text corpus, the groups' splits, their token ids and the equations the probes read."""

    text: LMData
    splits: list[task.GroupSplit]
    vocab: task.ModularVocab
    train_equations: list[np.ndarray]
    probe_equations: list[np.ndarray]

    @property
    def names(self) -> list[str]:
        return [s.group.name for s in self.splits]

    def equations(self, g: int, which: str) -> np.ndarray:
        return task.equations(self.vocab, g, self.splits[g].group, getattr(self.splits[g], which))

    def summary(self) -> list[dict[str, Any]]:
        return [{"group": s.group.name, "rule": s.group.describe(), "p": s.group.p, "train pairs": len(s.train),
                 "dev pairs": len(s.dev), "test pairs": len(s.test)} for s in self.splits]


def prepare_data(cfg: GrokkingConfig, text: LMData | None = None) -> GrokkingData:
    """The corpus (or the given `text`, blocks of seq_len + 1 tokens), the groups' splits and the probe equations."""
    text = text or prepare_lm_data(cfg.corpus, cfg.tokenizer, cfg.seq_len, bpe_vocab_size=cfg.bpe_vocab_size,
                                   max_chars=cfg.corpus_max_chars, val_fraction=cfg.val_fraction)
    groups = [task.parse_group(g) for g in cfg.groups]
    splits = [task.split_pairs(g, cfg.train_fraction, cfg.split_seed) for g in groups]
    vocab = task.ModularVocab.for_groups(text.tokenizer.vocab_size, groups)
    train_eqs = [task.equations(vocab, i, s.group, s.train) for i, s in enumerate(splits)]
    probes = []
    for i, eqs in enumerate(train_eqs):
        rng = numpy_rng(cfg.split_seed, "grokking", i)
        probes.append(eqs[np.sort(rng.choice(len(eqs), min(cfg.probe_samples, len(eqs)), replace=False))])
    return GrokkingData(text, splits, vocab, train_eqs, probes)


@dataclass
class MixtureBatches:
    """Micro-batch `index`: equation rows of randomly drawn groups (training pairs only), then text blocks."""

    cfg: GrokkingConfig
    data: GrokkingData

    def batch(self, index: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        rng = numpy_rng(seed, "grokking", index)
        n_algo = max(1, int(round(batch_size * self.cfg.algorithmic_share)))
        row_len = self.cfg.seq_len + 1
        k = task.per_row(row_len)
        rows = []
        for g in rng.integers(len(self.data.splits), size=n_algo):
            eqs = self.data.train_equations[g]
            rows.append(task.equation_rows(eqs[rng.integers(len(eqs), size=k)], row_len,
                                           self.data.text.tokenizer.eos_id))
        tokens = torch.from_numpy(np.concatenate(rows))
        if batch_size > n_algo:
            tokens = torch.cat([tokens, self.data.text.train.batch(index, batch_size - n_algo, seed)["tokens"]])
        return {"tokens": tokens}


# --- probes: accuracy and pathways at every checkpoint ----------------------------------------

def probe_token_index(n_samples: int, row_len: int) -> np.ndarray:
    """(n, 4) flat indices (row * (row_len - 1) + position) of each packed equation's op, a, b and '=' tokens."""
    k = task.per_row(row_len)
    s = np.arange(n_samples)
    start = (s // k) * (row_len - 1) + (s % k) * task.EQUATION_LEN
    return start[:, None] + np.arange(task.ANSWER_OFFSET + 1)[None, :]


def group_pathways(model, data: GrokkingData, g: int, row_len: int) -> dict[str, float]:
    """The two pathway metrics of group g's probe equations (training samples only)."""
    eqs = data.probe_equations[g]
    rows = torch.from_numpy(task.equation_rows(eqs, row_len, data.text.tokenizer.eos_id))[:, :-1]
    choices, gates = pw.routing(model, rows)
    index = probe_token_index(len(eqs), row_len)
    return {"pathway_distance": pw.pathway_distance(pw.pathway_strings(choices, index)),
            "pathway_complexity": float(pw.pathway_complexity(model, choices, gates, index).mean())}


def probe(model, data: GrokkingData, row_len: int) -> dict[str, float]:
    """Per group: accuracy on train / dev / test pairs and (for a MoE model) the pathway metrics."""
    fill = data.text.tokenizer.eos_id
    out: dict[str, float] = {}
    moe = bool(pw.moe_layers(model))
    for g, name in enumerate(data.names):
        for which in SETS:
            out[f"{which}_acc/{name}"] = task.answer_accuracy(model, data.equations(g, which), row_len, fill)
        if moe:
            out.update({f"{k}/{name}": v for k, v in group_pathways(model, data, g, row_len).items()})
    return out


def probe_callback(cfg: GrokkingConfig, data: GrokkingData):
    """(every, fn) for `train`: the probes at step 0 and at every step of the checkpoint schedule."""
    steps = set(checkpoint_schedule(cfg.steps, cfg.checkpoint_every)) | {0}

    def at_checkpoints(step: int, model) -> dict[str, float] | None:
        return probe(model, data, cfg.seq_len + 1) if step in steps else None

    return (1, at_checkpoints)


# --- training ----------------------------------------------------------------------------------

def model_run(run, name: str, cfg: GrokkingConfig):
    """The sub-folder run of one trained model inside the notebook's run: models/<name>/."""
    from lablib.runs import start_run

    if run is None:
        return None
    return start_run(EXPERIMENT, cfg, run.path / "models" / name, model=name)


def build_model(cfg: GrokkingConfig, data: GrokkingData, dense: bool = False):
    """The seeded MoE transformer, or the dense control: one MLP as wide as the k active experts together."""
    width = cfg.d_mlp or 4 * cfg.d_model
    changes = dict(n_experts=None, d_mlp=cfg.moe_top_k * width) if dense else {}
    return seeded_transformer(cfg, data.vocab.size, **changes)


def train_model(cfg: GrokkingConfig, seed: int, data: GrokkingData, run=None, *, dense: bool = False,
                progress: bool = True):
    """Train one seed (MoE, or the dense control) with the probes; returns (model, TrainResult, sub-run)."""
    seed_cfg = dataclasses.replace(cfg, seed=seed)
    seed_cfg.preset = cfg.preset
    name = f"{'dense' if dense else 'moe'}-seed{seed}"
    sub = model_run(run, name, seed_cfg)
    if sub is not None:
        data.text.tokenizer.save(sub.path / "tokenizer.json")
    model = build_model(seed_cfg, data, dense)
    val = data.text.val.eval_batches(cfg.eval_batches, cfg.batch_size)
    result = train(model, CausalLM(), MixtureBatches(seed_cfg, data), seed_cfg.project(TrainConfig), sub, val=val,
                   callbacks=[probe_callback(seed_cfg, data)], progress=progress)
    if sub is not None:
        sub.set_status("done")
    return model, result, sub


# --- analysis of the logged curves -------------------------------------------------------------

def group_curve(rows: Sequence[dict[str, Any]], name: str) -> dict[str, np.ndarray]:
    """One group's probe curve from metrics rows: step, train/dev/test accuracy and the pathway metrics."""
    keys = [f"{w}_acc/{name}" for w in SETS] + [f"{m}/{name}" for m in METRICS]
    picked = sorted((r for r in rows if f"test_acc/{name}" in r), key=lambda r: r["step"])
    curve = {"step": np.array([r["step"] for r in picked])}
    for key in keys:
        if any(key in r for r in picked):
            curve[key.split("/")[0]] = np.array([r.get(key, np.nan) for r in picked], dtype=float)
    return curve


def first_step(steps: np.ndarray, values: np.ndarray, level: float) -> int | None:
    """The first step whose value reaches `level`, or None."""
    hit = np.nonzero(values >= level)[0]
    return int(steps[hit[0]]) if hit.size else None


def grokking_steps(curve: dict[str, np.ndarray], saturation: float, rise: float) -> dict[str, int | None]:
    """Step where training accuracy saturates, step where held-out test accuracy rises, and the gap."""
    sat = first_step(curve["step"], curve["train_acc"], saturation)
    up = first_step(curve["step"], curve["test_acc"], rise)
    return {"saturation_step": sat, "rise_step": up, "gap": None if sat is None or up is None else up - sat}


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def curve_deltas(curve: dict[str, np.ndarray], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(change of the metric, change of held-out test accuracy) between consecutive probes."""
    return np.diff(curve[metric]), np.diff(curve["test_acc"])


def delta_correlation(curves: Sequence[dict[str, np.ndarray]], metric: str, resamples: int = 2000,
                      seed: int = 0) -> dict[str, Any]:
    """Pearson r of the metric's change against the held-out accuracy's change, pooled over curves
    ((seed, group) pairs), with a percentile bootstrap that resamples whole curves (seeded)."""
    pairs = [curve_deltas(c, metric) for c in curves]
    x, y = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    r = pearson(x, y)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        pick = rng.integers(len(pairs), size=len(pairs))
        draws.append(pearson(np.concatenate([pairs[i][0] for i in pick]), np.concatenate([pairs[i][1] for i in pick])))
    draws = np.array([d for d in draws if np.isfinite(d)])
    low, high = (np.quantile(draws, [0.025, 0.975]) if draws.size else (np.nan, np.nan))
    return {"r": r, "low": float(low), "high": float(high), "points": int(x.size), "curves": len(pairs),
            "method": "Pearson r, bootstrap over (seed, group) curves"}


def half_way_step(steps: np.ndarray, values: np.ndarray, start: int) -> int | None:
    """First step >= start where the values have covered half their change from `start` to the end."""
    after = steps >= start
    s, v = steps[after], values[after]
    if v.size < 2 or v[-1] == v[0]:
        return None
    half = (v[0] + v[-1]) / 2
    hit = np.nonzero((v - half) * np.sign(v[-1] - v[0]) >= 0)[0]
    return int(s[hit[0]])


def onset_lead(curve: dict[str, np.ndarray], metric: str, saturation_step: int) -> int | None:
    """Steps by which the metric's half-way point (after training accuracy saturated) precedes held-out accuracy's."""
    m = half_way_step(curve["step"], curve[metric], saturation_step)
    h = half_way_step(curve["step"], curve["test_acc"], saturation_step)
    return None if m is None or h is None else h - m


def interval(values: Sequence[float]) -> dict[str, Any] | None:
    return mean_interval(values).to_dict() if len(values) else None


def final_test_accuracy(curves: dict[str, dict[str, np.ndarray]]) -> float:
    """Held-out test accuracy at the last probe, averaged over groups."""
    return float(np.mean([c["test_acc"][-1] for c in curves.values()]))


def baselines(data: GrokkingData, curves: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
    """Chance (1/p), the untrained (step 0) model and the most-frequent-answer rule on the test pairs,
    each averaged over groups."""
    return {"chance": float(np.mean([1 / s.group.p for s in data.splits])),
            "untrained": float(np.mean([c["test_acc"][0] for c in curves.values()])),
            "trivial": float(np.mean([task.most_frequent_answer_accuracy(s, s.test) for s in data.splits]))}


def headline_dict(value: dict[int, float], references: dict[int, dict[str, float]]) -> dict[str, Any]:
    """Final held-out test accuracy (mean over groups) over seeds beside chance, untrained and trivial."""
    per_seed = {s: Headline.of("held-out test accuracy, mean over groups (MoE)", value[s],
                               Baselines.of(references[s]["chance"], references[s]["untrained"],
                                            references[s]["trivial"], "most frequent training answer"), "test")
                for s in value}
    return aggregate_seeds(per_seed).to_dict()


def run_command(preset: str, parameters: dict[str, Any]) -> str:
    """The `lablib run` command line of notebooks/10_grokking_pathways.ipynb with these parameters."""
    from lablib.report import lablib_run_command

    return lablib_run_command("notebooks/10_grokking_pathways.ipynb", preset, parameters)

