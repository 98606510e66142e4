"""Pretraining with human preferences on code style (notebooks/09_pretraining_with_preferences.ipynb):
Korbak et al. 2023 ("Pretraining Language Models with Human Preferences", arXiv:2302.08582), the
PEP 8 task. The scorer and the scored segments are `lablib.tasks.pep8`; the objectives are
entries of the one registry, `lablib.objectives`.

Notable here:
- `VARIANTS` is the table of what is compared: each row names its registry objective, which
  training segments it reads (filtering reads the good ones only, so it keeps MLE's token
  budget) and the start token its samples and held-out loss are conditioned on (`<|good|>` for
  the objectives that learned the control tokens, `<eos>` otherwise).
- Every training row is `<eos>` followed by one scored segment of `seq_len` code tokens;
  conditional training writes the row's control token over that start token. `ScoredBatches`
  gives the rows with their scores and micro-batch index (a pure function of (seed, index)).
- The threshold is the (1 - bad_fraction) quantile of the training segments' scores (fixed, not
  tuned). Held-out files (split by file) give the clean held-out code (score at most the
  threshold) for the capability metric and the adversarial prompts (the worst-styled held-out
  segments); both are split into dev and test by a stable hash of each segment. The sampling
  temperature is chosen on dev: the one at which MLE's dev samples (draws apart from the test
  ones) come closest to the training data's own violation rate (a choice that favours no
  objective); test is reported.
- `train_all` / `evaluate_all` / `choose_temperature` run the (objective, seed) models as
  independent jobs through `lablib.parallel.map_jobs`, `workers` at a time; each model is the
  same whichever process trains it, and resuming reopens each model's folder.
- `evaluate_model` measures a model's held-out loss (the same code tokens for every objective,
  the start token read but never scored), the violation rate of its unconditional samples and
  of its continuations of the adversarial prompts (violations per character, pooled).
- The headline: the violation rate of conditional training's `<|good|>`-conditioned samples
  beside chance (uniformly random tokens), the untrained model and MLE (its paired difference
  is conditional minus MLE over seeds), with the training data and the other objectives as
  further reference points.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from lablib.config import ConfigError, DataConfig, ModelConfig, TrainConfig, knob
from lablib.data import Tokenizer, load_corpus, split_documents, train_tokenizer
from lablib.evidence import assign_splits, headline_over_seeds, mean_interval, paired_difference
from lablib.models import Transformer
from lablib.objectives import IGNORE, ObjectiveConfig, add_control_tokens, build_objective, control_ids
from lablib.parallel import map_jobs
from lablib.seeding import seeded_model, torch_generator
from lablib.tasks import pep8
from lablib.tasks.pep8 import Segments

EXPERIMENT = "preferences"
PER_CHARS = 1000  # violation rates are reported per 1,000 characters (the scorer's score is per character)


@dataclass(frozen=True)
class Variant:
    objective: str  # a key of lablib.objectives.OBJECTIVES
    rows: str  # "all" training segments, or the "good" ones only
    start: str  # the start token of samples and of the held-out loss: "eos" or "good"
    label: str


VARIANTS: dict[str, Variant] = {
    "mle": Variant("clm", "all", "eos", "MLE"),
    "filtering": Variant("filtering", "good", "eos", "filtering"),
    "conditional": Variant("conditional", "all", "good", "conditional training"),
    "unlikelihood": Variant("unlikelihood", "all", "eos", "unlikelihood"),
    "rwr": Variant("rwr", "all", "eos", "reward-weighted regression"),
    "mle_then_conditional": Variant("mle_then_conditional", "all", "good", "MLE, then conditional fine-tuning"),
}


@dataclass
class PreferencesConfig(ModelConfig, TrainConfig, DataConfig, ObjectiveConfig):
    """Every objective of VARIANTS over `seeds`, one small transformer each, on scored stdlib code."""

    variants: list[str] = knob(list(VARIANTS), "objectives compared (keys of VARIANTS; 'mle' is the reference)")
    seeds: list[int] = knob([0, 1, 2], "training seeds of every objective")
    bad_fraction: float = knob(0.5, "share of training segments labelled bad (sets preference_threshold)",
                               min=0.0, max=1.0, min_exclusive=True)
    n_samples: int = knob(64, "unconditional samples per model", min=1)
    sample_tokens: int = knob(64, "tokens per sample and per continuation", min=1)
    n_prompts: int = knob(64, "adversarial prompts per split (the worst-styled held-out segments)", min=1)
    prompt_tokens: int = knob(32, "tokens of each adversarial prompt", min=1)
    heldout_segments: int = knob(128, "clean held-out segments per split for the held-out loss", min=1)
    temperatures: list[float] = knob([0.5, 0.7, 1.0], "sampling temperatures, one chosen on dev")
    eval_batch_size: int = knob(64, "rows per forward pass when evaluating and sampling", min=1)
    workers: int = knob(1, "processes that train and evaluate the (objective, seed) models side by side "
                           "(the cores are split between them)", min=1)

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # seconds: plumbing only
        "smoke": dict(corpus_max_chars=300_000, tokenizer="bpe", bpe_vocab_size=512, n_layer=1, n_head=2,
                      d_model=32, seq_len=32, max_seq_len=64, batch_size=8, steps=8, warmup_steps=2, seeds=[0, 1],
                      variants=["mle", "conditional", "filtering"], n_samples=6, sample_tokens=12, n_prompts=4,
                      prompt_tokens=8, heldout_segments=8, eval_every=8, eval_batches=1, log_every=4,
                      checkpoint_every=8, keep_last=1, val_fraction=0.2),
        # 6 objectives x 8 seeds of a 2-layer width-64 transformer (0.3M parameters), two models at a time (one
        # per core): 600 steps of 32 rows x 65 tokens each (~70 s a model), evaluation ~17 s a model (512
        # samples: the sampling noise of one model's rate is then ~0.3 per 1,000 characters, well below the
        # objectives' gaps); temperature 0.3, the one the rule picks on dev training seeds 100-102. Seeds 0-3
        # were the earlier looks at test, whose spread between MLE seeds was as large as the effect; 4-11 are
        # fresh (docs/LOG.md)
        "cpu": dict(corpus_max_chars=3_000_000, tokenizer="bpe", bpe_vocab_size=2048, n_layer=2, n_head=4,
                    d_model=64, seq_len=64, max_seq_len=128, batch_size=32, steps=600, warmup_steps=50,
                    learning_rate=3e-3, eval_every=300, eval_batches=1, log_every=20, checkpoint_every=600,
                    keep_last=1, val_fraction=0.1, n_samples=512, temperatures=[0.3], eval_batch_size=256,
                    seeds=list(range(4, 12)), workers=2),
        # the whole stdlib and a wider model
        "gpu": dict(corpus_max_chars=None, tokenizer="bpe", bpe_vocab_size=8192, n_layer=8, n_head=8, d_model=512,
                    seq_len=128, max_seq_len=256, batch_size=64, steps=8000, warmup_steps=400, learning_rate=6e-4,
                    eval_every=1000, eval_batches=8, log_every=50, checkpoint_every=4000, keep_last=1,
                    n_samples=512, sample_tokens=128, n_prompts=256, prompt_tokens=64, heldout_segments=1024,
                    seeds=[0, 1, 2, 3, 4], val_fraction=0.05),
    }

    def validate(self) -> None:
        super().validate()
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise ConfigError(f"parameter 'variants': expected a non-empty list among {', '.join(VARIANTS)}, "
                              f"got {self.variants}")
        if "mle" not in self.variants:
            raise ConfigError(f"parameter 'variants': expected 'mle' among them (the reference), got {self.variants}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"parameter 'seeds': expected distinct seeds, got {self.seeds}")
        if not self.temperatures or any(not t > 0 for t in self.temperatures):
            raise ConfigError(f"parameter 'temperatures': expected numbers > 0, got {self.temperatures}")
        need = self.seq_len + 1
        if self.max_seq_len < max(need, 1 + self.prompt_tokens + self.sample_tokens):
            raise ConfigError(f"parameter 'max_seq_len': expected >= "
                              f"{max(need, 1 + self.prompt_tokens + self.sample_tokens)} (a training row and a "
                              f"prompt with its continuation must fit), got {self.max_seq_len}")
        if self.prompt_tokens >= self.seq_len:
            raise ConfigError(f"parameter 'prompt_tokens': expected fewer than seq_len={self.seq_len}, "
                              f"got {self.prompt_tokens}")


# --- data ---------------------------------------------------------------------------------------

@dataclass
class PreferenceData:
    tokenizer: Tokenizer
    train: Segments
    heldout: Segments
    threshold: float
    clean: dict[str, Segments]  # dev / test: clean held-out segments (score <= threshold)
    prompts: dict[str, Segments]  # dev / test: the worst-styled held-out segments

    def data_rate(self) -> float:
        """The training data's own violation rate, per PER_CHARS characters (the reference line)."""
        return PER_CHARS * self.train.mean_rate()

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    def start_id(self, variant: str) -> int:
        return control_ids(self.tokenizer)[0] if VARIANTS[variant].start == "good" else self.eos_id

    def summary(self) -> dict[str, Any]:
        return {"train_segments": len(self.train), "heldout_segments": len(self.heldout),
                "threshold": self.threshold, "train_bad_share": float((self.train.score > self.threshold).mean()),
                "train_violations_per_1000_chars": PER_CHARS * self.train.mean_rate(),
                "heldout_violations_per_1000_chars": PER_CHARS * self.heldout.mean_rate(),
                **{f"clean_{k}": len(v) for k, v in self.clean.items()},
                **{f"prompts_{k}": len(v) for k, v in self.prompts.items()},
                "vocab_size": self.tokenizer.vocab_size, "checker": f"pycodestyle {pep8.checker_version()}"}


def _split(seg: Segments, rows: np.ndarray, per_split: int) -> dict[str, Segments]:
    keyed = assign_splits([int(i) for i in rows], key=lambda i: f"{seg.source[i]}#{i}")
    return {name: seg.select(idx[:per_split]) for name, idx in keyed.items()}


def prepare_data(cfg: PreferencesConfig) -> PreferenceData:
    """Corpus -> file split -> tokenizer (+ control tokens) -> scored segments, threshold, held-out sets."""
    ds = load_corpus(cfg.corpus, cfg.corpus_max_chars)
    train_docs, held_docs = split_documents(ds, cfg.val_fraction, seed=0)
    tokenizer = add_control_tokens(train_tokenizer(cfg.tokenizer, (t for t in train_docs["text"]), cfg.bpe_vocab_size))
    train = Segments.of(pep8.scored_segments(train_docs, tokenizer, cfg.seq_len))
    heldout = Segments.of(pep8.scored_segments(held_docs, tokenizer, cfg.seq_len))
    threshold = float(np.quantile(train.score, 1.0 - cfg.bad_fraction))
    clean_rows = np.flatnonzero(heldout.score <= threshold)
    worst = np.argsort(-heldout.score, kind="stable")
    worst = worst[heldout.score[worst] > threshold]
    clean = _split(heldout, clean_rows, cfg.heldout_segments)
    prompts = _split(heldout, worst, cfg.n_prompts)
    for name, sets in (("clean held-out", clean), ("adversarial prompt", prompts)):
        empty = [k for k, v in sets.items() if len(v) == 0]
        if empty:
            raise ConfigError(f"parameter 'corpus_max_chars': the held-out files give no {name} segment in "
                              f"{', '.join(empty)}; use a larger corpus_max_chars or val_fraction")
    return PreferenceData(tokenizer, train, heldout, threshold, clean, prompts)


@dataclass
class ScoredBatches:
    """Training rows `<eos>` + segment with their scores; micro-batch `index` is a pure function of
    (seed, index), walking a fresh permutation of the segments each epoch."""

    segments: Segments
    eos_id: int

    def batch(self, index: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        n = len(self.segments)
        rows: list[int] = []
        start = index * batch_size
        while len(rows) < batch_size:
            epoch, offset = divmod(start + len(rows), n)
            perm = torch.randperm(n, generator=torch_generator(seed, "preferences", epoch))
            take = min(batch_size - len(rows), n - offset)
            rows.extend(perm[offset:offset + take].tolist())
        ids = self.segments.ids[rows]
        tokens = torch.cat([torch.full((len(rows), 1), self.eos_id, dtype=ids.dtype), ids], dim=1)
        return {"tokens": tokens, "score": torch.as_tensor(self.segments.score[rows], dtype=torch.float32),
                "index": torch.tensor(index)}


def training_segments(data: PreferenceData, variant: str) -> Segments:
    if VARIANTS[variant].rows == "good":
        return data.train.select(np.flatnonzero(data.train.score <= data.threshold))
    return data.train


# --- models and training -----------------------------------------------------------------------

def objective_config(cfg: PreferencesConfig, data: PreferenceData, variant: str) -> PreferencesConfig:
    threshold = data.threshold if cfg.preference_threshold is None else cfg.preference_threshold
    return dataclasses.replace(cfg, objective=VARIANTS[variant].objective, preference_threshold=threshold)


def build_model(cfg: PreferencesConfig, data: PreferenceData, seed: int):
    model_cfg = dataclasses.replace(cfg.project(ModelConfig), vocab_size=data.tokenizer.vocab_size)
    return seeded_model(Transformer, model_cfg, seed)


def train_variant(cfg: PreferencesConfig, data: PreferenceData, variant: str, seed: int, run=None, *,
                  progress: bool = True):
    """One (objective, seed) model trained in models/<variant>-seed<seed>/ of the run; returns
    (model, TrainResult). Its untrained (step-0) copy is `build_model(cfg, data, seed)`, the same
    for every objective of a seed."""
    from lablib.runs import start_run
    from lablib.train import train

    ocfg = objective_config(cfg, data, variant)
    ocfg.seed = seed
    ocfg.preset = cfg.preset
    model = build_model(cfg, data, seed)
    sub = None
    if run is not None:
        sub = start_run(EXPERIMENT, ocfg, run.path / "models" / f"{variant}-seed{seed}", model=variant)
        data.tokenizer.save(sub.path / "tokenizer.json")
    objective = build_objective(ocfg, data.tokenizer, cfg.steps)
    val = [ScoredBatches(data.clean["dev"], data.eos_id).batch(0, min(cfg.batch_size, len(data.clean["dev"])), 0)]
    result = train(model, objective, ScoredBatches(training_segments(data, variant), data.eos_id),
                   ocfg.project(TrainConfig), sub, val=val, progress=progress)
    model.eval()
    return model, result


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _loaded(cfg: PreferencesConfig, data: PreferenceData, state: dict[str, torch.Tensor]):
    model = build_model(cfg, data, 0)
    model.load_state_dict(state)
    return model.eval()


def _train_job(data: PreferenceData, cfg: PreferencesConfig, variant: str, seed: int, run_path, progress: bool):
    from lablib.runs import Run

    model, result = train_variant(cfg, data, variant, seed, Run(run_path) if run_path else None, progress=progress)
    return _state(model), result


def train_all(cfg: PreferencesConfig, data: PreferenceData, run=None) -> tuple[dict, dict]:
    """Every (variant, seed) of `cfg` trained, `cfg.workers` at a time; returns ({(variant, seed):
    model}, {(variant, seed): TrainResult})."""
    keys = [(variant, seed) for seed in cfg.seeds for variant in cfg.variants]
    path = str(run.path) if run is not None else None
    out = map_jobs(_train_job, [(cfg, v, s, path, cfg.workers == 1) for v, s in keys], data, workers=cfg.workers,
                   desc="training", name=lambda j: f"{j[1]} seed {j[2]}")
    models = {k: _loaded(cfg, data, state) for k, (state, _) in zip(keys, out)}
    return models, {k: result for k, (_, result) in zip(keys, out)}


# --- evaluation --------------------------------------------------------------------------------

def heldout_rows(ids: torch.Tensor, start_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of the held-out loss: inputs `start_id` + ids[:, :-1]; labels ids[:, 1:] at the
    positions after the first code token (its prediction reads the start token alone), IGNORE elsewhere.
    So every model is scored on the same code tokens, and the start (control) token is never a target."""
    tokens = torch.cat([torch.full((len(ids), 1), start_id, dtype=ids.dtype), ids], dim=1)
    labels = tokens[:, 1:].clone()
    labels[:, 0] = IGNORE
    return tokens[:, :-1], labels


@torch.no_grad()
def heldout_loss(model, ids: torch.Tensor, start_id: int, batch_size: int = 64) -> tuple[float, int]:
    """Mean next-token loss (nats per token) of the code tokens of `heldout_rows`, and their number."""
    total, count = 0.0, 0
    for k in range(0, len(ids), batch_size):
        inputs, labels = heldout_rows(ids[k:k + batch_size], start_id)
        logits = model(inputs, mask="causal")
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                         labels.reshape(-1), ignore_index=IGNORE, reduction="sum"))
        count += int((labels != IGNORE).sum())
    return total / count, count


def _cut(ids: list[int], stop: set[int]) -> list[int]:
    """A sample up to (not including) its first special token."""
    for i, t in enumerate(ids):
        if t in stop:
            return ids[:i]
    return ids


@torch.no_grad()
def sample(model, prompts: torch.Tensor, new_tokens: int, temperature: float, generator: torch.Generator,
           batch_size: int = 64) -> list[list[int]]:
    """Continuations of each prompt row (B, P), `new_tokens` each, sampled with `model.generate` in batches."""
    out: list[list[int]] = []
    for k in range(0, len(prompts), batch_size):
        idx = model.generate(prompts[k:k + batch_size], new_tokens, temperature, generator=generator)
        out.extend(idx[:, prompts.shape[1]:].tolist())
    return out


def special_ids(tokenizer: Tokenizer) -> set[int]:
    return set(tokenizer.special_ids) | set(control_ids(tokenizer))


def unconditional_rate(model, data: PreferenceData, start_id: int, n: int, new_tokens: int, temperature: float,
                       seed: int, batch_size: int = 64) -> dict[str, Any]:
    """Violations per PER_CHARS characters of n samples started from `start_id` (pooled over the samples)."""
    gen = torch_generator(seed, "preferences", 1_000_000)
    prompts = torch.full((n, 1), start_id, dtype=torch.long)
    stop = special_ids(data.tokenizer)
    texts = [data.tokenizer.decode(_cut(s, stop)) for s in sample(model, prompts, new_tokens, temperature, gen,
                                                                  batch_size)]
    found = [len(pep8.violations(t)) for t in texts]
    chars = sum(map(len, texts))
    return {"rate": PER_CHARS * sum(found) / max(1, chars), "chars": chars, "texts": texts}


def adversarial_rate(model, data: PreferenceData, split: str, start_id: int, prompt_tokens: int, new_tokens: int,
                     temperature: float, seed: int, batch_size: int = 64) -> dict[str, Any]:
    """Violations per PER_CHARS characters of the continuations of the adversarial prompts of `split` (pooled)."""
    gen = torch_generator(seed, "preferences", 2_000_000)
    heads = data.prompts[split].ids[:, :prompt_tokens]
    prompts = torch.cat([torch.full((len(heads), 1), start_id, dtype=torch.long), heads], dim=1)
    stop = special_ids(data.tokenizer)
    found = chars = 0
    texts = []
    for head, cont in zip(heads.tolist(), sample(model, prompts, new_tokens, temperature, gen, batch_size)):
        prompt, text = data.tokenizer.decode(head), data.tokenizer.decode(_cut(cont, stop))
        found += pep8.continuation_violations(prompt, text)
        chars += len(text)
        texts.append((prompt, text))
    return {"rate": PER_CHARS * found / max(1, chars), "chars": chars, "texts": texts}


def evaluate_model(model, data: PreferenceData, cfg: PreferencesConfig, start: int, seed: int,
                   temperature: float, split: str = "test") -> dict[str, Any]:
    """Held-out loss on clean code, violation rate of unconditional samples and of adversarial
    continuations, all read after the start token `start` (`data.start_id(variant)`). The sampling
    draws depend on the seed only, so two objectives of one seed share them."""
    loss, n = heldout_loss(model, data.clean[split].ids, start, cfg.eval_batch_size)
    unc = unconditional_rate(model, data, start, cfg.n_samples, cfg.sample_tokens, temperature, seed,
                             cfg.eval_batch_size)
    adv = adversarial_rate(model, data, split, start, cfg.prompt_tokens, cfg.sample_tokens, temperature, seed,
                           cfg.eval_batch_size)
    return {"heldout_loss": loss, "heldout_tokens": n, "violation_rate": unc["rate"],
            "adversarial_violation_rate": adv["rate"], "samples": unc["texts"][:8],
            "continuations": adv["texts"][:4]}


def _evaluate_job(data: PreferenceData, cfg: PreferencesConfig, state: dict | None, seed: int, start: int,
                  temperature: float) -> dict[str, Any]:
    model = build_model(cfg, data, seed).eval() if state is None else _loaded(cfg, data, state)
    return evaluate_model(model, data, cfg, start, seed, temperature)


def evaluate_all(cfg: PreferencesConfig, data: PreferenceData, models: dict, temperature: float
                 ) -> tuple[dict, dict]:
    """Test evaluation of every trained model and of each seed's untrained model (once per start
    token), `cfg.workers` at a time; returns ({(variant, seed): eval}, {(start, seed): eval})."""
    starts = sorted({VARIANTS[v].start for v in cfg.variants})
    start_id = lambda name: data.eos_id if name == "eos" else control_ids(data.tokenizer)[0]
    keys = [("untrained", name, seed) for seed in cfg.seeds for name in starts]
    keys += [("trained", v, seed) for seed in cfg.seeds for v in cfg.variants]
    jobs = [(cfg, None, seed, start_id(name), temperature) if kind == "untrained" else
            (cfg, _state(models[name, seed]), seed, data.start_id(name), temperature) for kind, name, seed in keys]
    out = map_jobs(_evaluate_job, jobs, data, workers=cfg.workers, desc="evaluation",
                   name=lambda j: f"seed {j[2]}, start token {j[3]}")
    evals = {(name, seed): e for (kind, name, seed), e in zip(keys, out) if kind == "trained"}
    untrained = {(name, seed): e for (kind, name, seed), e in zip(keys, out) if kind == "untrained"}
    return evals, untrained


def _dev_rate_job(data: PreferenceData, cfg: PreferencesConfig, state: dict, seed: int, temperature: float) -> float:
    return unconditional_rate(_loaded(cfg, data, state), data, data.eos_id, cfg.n_samples, cfg.sample_tokens,
                              temperature, seed + 7, cfg.eval_batch_size)["rate"]


def choose_temperature(mle_models: dict[int, Any], data: PreferenceData, cfg: PreferencesConfig) -> dict[str, Any]:
    """The temperature at which MLE's dev samples' violation rate comes closest to the training data's."""
    target = data.data_rate()
    jobs = [(cfg, _state(m), seed, t) for t in cfg.temperatures for seed, m in mle_models.items()]
    found = map_jobs(_dev_rate_job, jobs, data, workers=cfg.workers, desc="dev temperature",
                     name=lambda j: f"seed {j[2]}, temperature {j[3]}")
    rates = {t: float(np.mean([r for (_, _, _, jt), r in zip(jobs, found) if jt == t])) for t in cfg.temperatures}
    chosen = min(cfg.temperatures, key=lambda t: abs(rates[t] - target))
    return {"temperature": chosen, "dev_mle_rates": {str(t): r for t, r in rates.items()}, "target": target}


def random_token_rate(data: PreferenceData, n: int, new_tokens: int, seed: int) -> float:
    """Chance: violations per PER_CHARS characters of uniformly random code tokens."""
    gen = torch_generator(seed, "preferences", 3_000_000)
    stop = special_ids(data.tokenizer)
    allowed = torch.tensor([i for i in range(data.tokenizer.vocab_size) if i not in stop])
    draws = allowed[torch.randint(len(allowed), (n, new_tokens), generator=gen)]
    texts = [data.tokenizer.decode(row) for row in draws.tolist()]
    return PER_CHARS * sum(len(pep8.violations(t)) for t in texts) / max(1, sum(map(len, texts)))


# --- results -----------------------------------------------------------------------------------

def interval(values: Sequence[float]) -> dict[str, Any]:
    return mean_interval(values).to_dict()


def paired(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    return paired_difference(a, b).to_dict()


def headline_dict(metric: str, value: dict[int, float], references: dict[str, dict[int, float]], trivial_rule: str,
                  split: str = "test", better: str = "lower") -> dict[str, Any]:
    """A headline over seeds in the lab's results format (`lablib.evidence.headline_over_seeds`)."""
    return headline_over_seeds(metric, value, references, trivial_rule, split, better).to_dict()


def run_command(preset: str, parameters: dict[str, Any]) -> str:
    from lablib.report import lablib_run_command

    return lablib_run_command("notebooks/09_pretraining_with_preferences.ipynb", preset, parameters)


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
