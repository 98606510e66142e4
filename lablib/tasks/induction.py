"""Induction: copy a token seen earlier, the capability Gloeckle et al. 2024 found multi-token
prediction helps small models acquire.

Notable here:
- `InductionTask(vocab_size, half_len)` is a batch source for `lablib.train.train`:
  each row is <bos> followed by a random string of `half_len` tokens written twice,
  so every token after the first repeated one is a copy of a token `half_len`
  positions back. Rows are a pure function of (seed, micro-batch index).
- `induction_accuracy` scores greedy next-token predictions only where the answer is a
  copy (the second half, minus its first token, which cannot be inferred), reading the
  model's next-token path (head 0 of a multi-token model).
- `train_induction(n_future, ...)` trains one small `MultiTokenTransformer` (n_future=1
  is plain next-token prediction with the same trunk and head) and returns its
  accuracy curve and the step at which induction formed (accuracy first >= 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lablib.config import TrainConfig
from lablib.models import MultiTokenConfig, MultiTokenTransformer
from lablib.objectives import MultiTokenPrediction
from lablib.train import train

BOS = 0  # token 0 starts every row and never appears inside it


@dataclass
class InductionTask:
    vocab_size: int = 32
    half_len: int = 24

    def __post_init__(self):
        if self.vocab_size < 3 or self.half_len < 2:
            raise ValueError(f"induction task: expected vocab_size >= 3 and half_len >= 2, "
                             f"got {self.vocab_size} and {self.half_len}")

    @property
    def seq_len(self) -> int:
        """Model input length (rows hold one more token: the last target)."""
        return 2 * self.half_len

    def batch(self, index: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 1_000_033 + index)
        first = torch.randint(1, self.vocab_size, (batch_size, self.half_len), generator=gen)
        bos = torch.full((batch_size, 1), BOS, dtype=torch.long)
        return {"tokens": torch.cat([bos, first, first], dim=1)}

    def copy_positions(self) -> torch.Tensor:
        """Input positions whose next token is a copy: those predicting second-half tokens 2.. ."""
        return torch.arange(self.half_len + 1, 2 * self.half_len)


@torch.no_grad()
def induction_accuracy(model, task: InductionTask, n_rows: int = 256, seed: int = 10_007) -> float:
    """Greedy next-token accuracy on the copy positions of fresh rows (a seed training never uses)."""
    was_training = model.training
    model.eval()
    tokens = task.batch(0, n_rows, seed)["tokens"].to(next(model.parameters()).device)
    pos = task.copy_positions().to(tokens.device)
    predicted = model(tokens[:, :-1], mask="causal").argmax(-1)[:, pos]
    model.train(was_training)
    return float((predicted == tokens[:, pos + 1]).float().mean())


def train_induction(n_future: int, *, seed: int = 0, steps: int = 400, task: InductionTask | None = None,
                    n_layer: int = 2, d_model: int = 64, n_head: int = 4, batch_size: int = 32,
                    learning_rate: float = 3e-3, eval_every: int = 10, progress: bool = False) -> dict:
    """Train a small causal model with n_future-token prediction on the induction task.

    Returns {"n_future", "seed", "steps": [...], "accuracy": [...], "final_accuracy", "steps_to_half"}:
    steps_to_half is the first evaluated step with accuracy >= 0.5 (None if never), i.e. when
    the induction mechanism formed.
    """
    task = task or InductionTask()
    torch.manual_seed(seed)
    model = MultiTokenTransformer(MultiTokenConfig(vocab_size=task.vocab_size, n_layer=n_layer, n_head=n_head,
                                                   d_model=d_model, max_seq_len=task.seq_len, n_future=n_future))
    cfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=task.seq_len, learning_rate=learning_rate,
                      warmup_steps=min(20, steps), seed=seed, eval_every=steps, log_every=steps,
                      checkpoint_every=steps, device="cpu", compile="off",
                      num_threads=1)  # a tiny model: one thread is as fast and never waits on a busy core
    curve: dict[int, float] = {}

    def record(step, m):
        curve[step] = induction_accuracy(m, task)

    train(model, MultiTokenPrediction(), task, cfg, None, callbacks=[(eval_every, record)], progress=progress)
    steps_seen = sorted(curve)
    return {"n_future": n_future, "seed": seed, "steps": steps_seen, "accuracy": [curve[s] for s in steps_seen],
            "final_accuracy": curve[steps_seen[-1]],
            "steps_to_half": next((s for s in steps_seen if curve[s] >= 0.5), None)}
