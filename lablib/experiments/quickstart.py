"""The quickstart's experiment (notebooks/00_quickstart.ipynb, also trained by 01): language-model
pretraining on a text corpus.

Notable here:
- `LMConfig` is the flat config of a corpus -> tokenizer -> transformer -> objective
  run, with the `smoke` / `cpu` / `gpu` presets. Its objective is any registered one
  that trains on plain token blocks (`lablib.objectives.OBJECTIVES`: no contrastive pairs, no preference scores).
- `pretrain(cfg, run)` does the whole thing and resumes from the run folder's newest
  checkpoint when there is one (the tokenizer is then read back, not retrained).
- `sample(...)` continues a prompt with a seeded generator, so samples are
  reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lablib.config import ConfigError, DataConfig, ModelConfig, TrainConfig, knob
from lablib.data import LMData, Tokenizer, prepare_lm_data
from lablib.models import Transformer
from lablib.objectives import OBJECTIVES, ObjectiveConfig, build_objective
from lablib.seeding import seeded_model
from lablib.train import TrainResult, grad_accum_steps, train


@dataclass
class LMConfig(ModelConfig, TrainConfig, DataConfig, ObjectiveConfig):
    sample_tokens: int = knob(200, "tokens to sample for each prompt at the end", min=0)

    presets: ClassVar[dict] = {
        # seconds: plumbing only
        "smoke": dict(corpus_max_chars=200_000, tokenizer="char", n_layer=2, n_head=2, d_model=64, seq_len=64,
                      max_seq_len=64, batch_size=8, steps=30, warmup_steps=5, eval_every=10, eval_batches=2,
                      log_every=5, checkpoint_every=10, sample_tokens=40),
        # a few minutes on 2 cores: the held-out loss falls visibly, samples read like Python
        "cpu": dict(corpus_max_chars=3_000_000, tokenizer="bpe", bpe_vocab_size=2048, n_layer=4, n_head=4,
                    d_model=128, seq_len=128, max_seq_len=128, batch_size=16, steps=1200, warmup_steps=60,
                    learning_rate=2e-3, eval_every=100, eval_batches=8, log_every=20, checkpoint_every=200),
        # GPT-2-small-like width on the whole corpus
        "gpu": dict(corpus_max_chars=None, tokenizer="bpe", bpe_vocab_size=8192, n_layer=12, n_head=12, d_model=768,
                    seq_len=512, max_seq_len=512, batch_size=32, batch_tokens=131_072, steps=5000, warmup_steps=200,
                    learning_rate=6e-4, eval_every=250, eval_batches=20, log_every=20, checkpoint_every=1000,
                    dropout=0.0),
    }

    def validate(self) -> None:
        super().validate()
        needs_pairs = [s.name for s in self.specs() if s.pairs or s.scores]
        if needs_pairs:
            plain = [n for n, s in OBJECTIVES.items() if not (s.pairs or s.scores)]
            raise ConfigError(f"parameter 'objective': the quickstart trains on token blocks only, so one of "
                              f"{', '.join(plain)} (without {', '.join(needs_pairs)})")


@dataclass
class Pretrained:
    model: Transformer
    data: LMData
    result: TrainResult


def build_model(cfg: LMConfig, vocab_size: int) -> Transformer:
    """The model the objective trains (heads included), over the tokenizer's ids and the objective's extra ones."""
    cls, model_cfg = cfg.decoder_model(vocab_size + cfg.extra_ids())
    model_cfg.max_seq_len = max(cfg.max_seq_len, cfg.seq_len)
    return seeded_model(cls, model_cfg, cfg.seed)


def pretrain(cfg: LMConfig, run, *, progress: bool = True, dist=None, callbacks=()) -> Pretrained:
    """Data, tokenizer (saved as tokenizer.json), model and training, resuming when the run folder allows.

    dist: a `lablib.distributed.DistContext` under torchrun (every rank builds the same
    data and tokenizer deterministically; only rank 0 writes).
    """
    saved = run.tokenizer() if run is not None else None
    data = prepare_lm_data(cfg.corpus, saved or cfg.tokenizer, cfg.seq_len, bpe_vocab_size=cfg.bpe_vocab_size,
                           max_chars=cfg.corpus_max_chars, val_fraction=cfg.val_fraction,
                           seed=0)  # the same documents are held out whatever the training seed
    if run is not None and saved is None and (dist is None or dist.is_main):
        data.tokenizer.save(run.path / "tokenizer.json")
    model = build_model(cfg, data.tokenizer.vocab_size)
    train_cfg = cfg.project(TrainConfig)
    objective = build_objective(cfg, data.tokenizer, cfg.steps * grad_accum_steps(train_cfg))
    result = train(model, objective, data.train, train_cfg, run,
                   val=data.val.eval_batches(cfg.eval_batches, cfg.batch_size), progress=progress, dist=dist,
                   callbacks=callbacks)
    return Pretrained(model, data, result)


def pretrain_distributed(dist, preset: str | None = None, run_dir: str | None = None, **overrides) -> dict:
    """The quickstart's training on every rank of a torchrun job; returns rank 0's final metrics.

        torchrun --nproc-per-node 2 -m lablib.distributed lablib.experiments.quickstart:pretrain_distributed \\
            --kwargs '{"preset": "smoke"}'
    """
    cfg = LMConfig.resolve(preset, **overrides)
    run = dist.start_run("quickstart", cfg, run_dir, world_size=dist.world_size)
    out = pretrain(cfg, run, progress=dist.is_main, dist=dist)
    return {"run_dir": str(run.path), **out.result.final}


@torch.no_grad()
def sample(model: Transformer, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 200,
           temperature: float = 0.8, top_k: int | None = 40, seed: int = 0) -> str:
    """Continue `prompt` (reproducible for a given seed)."""
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    idx = torch.tensor([ids], device=device)
    out = model.generate(idx, max_new_tokens, temperature, top_k, generator=torch.Generator(device).manual_seed(seed))
    return tokenizer.decode(out[0].tolist())
