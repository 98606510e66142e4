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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lablib.seeding import torch_generator

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
        gen = torch_generator(seed, "induction", index)
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
