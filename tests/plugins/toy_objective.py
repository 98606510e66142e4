"""A toy objective defined outside the lab, registered in one entry: predict the token after next.

Loaded by `LABLIB_PLUGINS=toy_objective` (with this folder on PYTHONPATH); tests/test_objective_registry.py
trains it through `lablib run`.
"""

from dataclasses import dataclass

from lablib.objectives import register_objective, token_cross_entropy


@dataclass
class SkipTokenLM:
    """Causal reading; position t is scored on token t+2."""

    name: str = "skip_token"

    def __call__(self, model, batch, generator):
        tokens = batch["tokens"]
        logits = model(tokens[:, :-2], mask="causal")
        loss, n = token_cross_entropy(logits, tokens[:, 2:])
        return loss, {"tokens_scored": n}


register_objective("skip_token", reads="causal", next_token=False)(lambda cfg, tokenizer, total_batches: SkipTokenLM())
