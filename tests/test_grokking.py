"""The mixture-of-experts MLP, the modular-arithmetic groups, the pathway metrics and a MoE run's resume."""

import os
import signal
import time

import numpy as np
import pytest
import torch

from lablib.checkpoints import load_checkpoint, newest_loadable
from lablib.config import ConfigError, ModelConfig, TrainConfig
from lablib.data import LMData, TokenBlocks, char_tokenizer
from lablib.experiments import grokking_pathways as exp
from lablib.interp import pathways as pw
from lablib.models import MixtureOfExperts, Transformer, load_balancing_loss
from lablib.objectives import CausalLM
from lablib.runs import create_run, open_run
from lablib.tasks import modular as task
from lablib.train import train

torch.set_num_threads(1)  # forked children must not inherit a thread pool


def moe(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=30, n_layer=2, n_head=2, d_model=16, d_mlp=16, max_seq_len=16, n_experts=4, moe_top_k=2)
    return Transformer(ModelConfig(**{**cfg, **kw}))


# --- the mixture of experts ---------------------------------------------------------------------

def test_top_k_routing_sends_each_token_to_its_k_most_probable_experts():
    model = moe().eval()
    x = torch.randint(0, 30, (3, 10), generator=torch.Generator().manual_seed(1))
    _, cache = model.run_with_cache(x, names=["blocks.0.mlp.hook_router_logits", "blocks.0.mlp.hook_expert_choice"])
    logits, choice = cache["blocks.0.mlp.hook_router_logits"], cache["blocks.0.mlp.hook_expert_choice"]
    assert choice.shape == (3, 10, 2) and choice.dtype == torch.long
    assert (choice[..., 0] != choice[..., 1]).all()  # k distinct experts
    chosen = logits.gather(-1, choice).min(-1).values
    others = logits.masked_fill(torch.zeros_like(logits, dtype=torch.bool).scatter(-1, choice, True), -1e9).max(-1).values
    assert (chosen >= others).all()


def test_the_output_is_the_gate_weighted_sum_of_the_chosen_experts():
    layer = moe(moe_top_k=1).blocks[0].mlp.eval()
    x = torch.randn(2, 5, 16)
    probs = torch.softmax(layer.router(x), -1)
    best = probs.argmax(-1)
    expected = torch.stack([layer.experts[int(e)](x[b, t]) * probs[b, t, e]
                            for b in range(2) for t, e in enumerate(best[b])]).view(2, 5, 16)
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_load_balancing_loss_is_one_for_uniform_routing_and_larger_otherwise():
    n, E = 64, 4
    uniform = load_balancing_loss(torch.full((n, E), 1 / E), torch.arange(n)[:, None] % E, E)
    assert uniform.item() == pytest.approx(1.0)
    collapsed = torch.zeros(n, E)
    collapsed[:, 0] = 1.0
    assert load_balancing_loss(collapsed, torch.zeros(n, 1, dtype=torch.long), E).item() == pytest.approx(E)
    skewed = torch.softmax(torch.randn(n, E, generator=torch.Generator().manual_seed(0)) * 3, -1)
    assert load_balancing_loss(skewed, skewed.topk(2).indices, E).item() > 1.0


def test_the_training_loop_adds_the_weighted_auxiliary_loss_and_logs_it(tmp_path):
    model = moe(moe_aux_coef=0.5)
    model(torch.randint(0, 30, (2, 8)))
    aux = model.pop_auxiliary_loss()
    layers = [m for m in model.modules() if isinstance(m, MixtureOfExperts)]
    assert aux is not None and model.pop_auxiliary_loss() is None  # taken once
    assert len(layers) == 2 and aux.item() >= 0.5 * 2 * (1 - 1e-6)  # each layer's loss is >= 1
    assert Transformer(ModelConfig(vocab_size=30, n_layer=1, n_head=2, d_model=16)).pop_auxiliary_loss() is None
    blocks = TokenBlocks(torch.randint(0, 30, (16, 9), generator=torch.Generator().manual_seed(0)))
    run = create_run("moe", {}, tmp_path / "r")
    train(model, CausalLM(), blocks, TrainConfig(steps=3, batch_size=4, seq_len=8, warmup_steps=1, log_every=1,
                                                 device="cpu"), run, progress=False)
    assert all(r["aux_loss"] >= 1.0 for r in run.log.rows() if "loss" in r)


def test_moe_is_a_config_option_and_the_default_stays_dense():
    assert ModelConfig().n_experts is None
    assert not any(isinstance(m, MixtureOfExperts) for m in Transformer(ModelConfig(vocab_size=10)).modules())
    with pytest.raises(ConfigError, match="moe_top_k"):
        ModelConfig(n_experts=2, moe_top_k=3).validate()
    model = moe(moe_top_k=1)
    expert = sum(p.numel() for p in model.blocks[0].mlp.experts[0].parameters())
    assert model.num_params() - model.num_active_params() == 2 * 3 * expert


# --- modular groups ----------------------------------------------------------------------------

def test_modular_answers_and_group_names():
    add, div = task.parse_group("add:7"), task.parse_group("div:7")
    assert add.answers(np.array([[3, 5], [6, 6]])).tolist() == [1, 5]
    assert div.answers(np.array([[3, 5]])).tolist() == [3 * 3 % 7]  # 5^-1 = 3 mod 7
    assert len(div.pairs()) == 7 * 6
    for bad in ("add:8", "pow:7", "add"):
        with pytest.raises(ValueError, match="group"):
            task.parse_group(bad)


def test_held_out_pairs_never_appear_in_the_training_stream():
    cfg = exp.GrokkingConfig.resolve("smoke")
    tokenizer = char_tokenizer(["def f(x): return x\n"])
    blocks = TokenBlocks(torch.randint(4, tokenizer.vocab_size, (20, cfg.seq_len + 1)))
    data = exp.prepare_data(cfg, LMData(tokenizer, blocks, blocks, (1, 1)))
    batches = exp.MixtureBatches(cfg, data)
    seen = {g: set() for g in range(len(data.splits))}
    op_of = {data.vocab.op_token(g): g for g in range(len(data.splits))}
    for index in range(40):
        tokens = batches.batch(index, cfg.batch_size, seed=0)["tokens"].numpy()
        for row in tokens:
            for start in range(0, len(row) - task.EQUATION_LEN + 1, task.EQUATION_LEN):
                eq = row[start:start + task.EQUATION_LEN]
                if eq[0] in op_of:
                    seen[op_of[eq[0]]].add((int(eq[1] - data.vocab.base), int(eq[2] - data.vocab.base)))
    for g, split in enumerate(data.splits):
        train_pairs = set(map(tuple, split.train.tolist()))
        assert seen[g] and seen[g] <= train_pairs
        assert not seen[g] & set(map(tuple, split.heldout.tolist()))
        assert not train_pairs & set(map(tuple, split.heldout.tolist()))
    again = exp.MixtureBatches(cfg, data).batch(7, cfg.batch_size, seed=0)["tokens"]
    assert torch.equal(again, batches.batch(7, cfg.batch_size, seed=0)["tokens"])


# --- pathway metrics ---------------------------------------------------------------------------

def test_edit_distance_on_hand_examples():
    def d(a, b):
        return int(pw.edit_distance_matrix(np.array([list(a)]), np.array([list(b)]))[0])

    assert d("kitten", "sitting") == 3
    assert d("abcd", "abcd") == 0
    assert d("abcd", "bcda") == 2  # one deletion, one insertion
    assert d("aaaa", "bbbb") == 4
    many = pw.edit_distance_matrix(np.array([list("0101"), list("0011")]), np.array([list("1010"), list("0011")]))
    assert many.tolist() == [2, 0]


def test_pathway_distance_is_zero_for_shared_routes_and_complexity_in_range():
    shared = np.tile(np.array([[0, 1, 2, 3]]), (5, 1))
    assert pw.pathway_distance(shared) == 0.0
    assert pw.pathway_distance(np.array([[0, 0], [1, 1]])) == 1.0
    model = moe().eval()
    rows = torch.randint(0, 30, (2, 10), generator=torch.Generator().manual_seed(0))
    choices, gates = pw.routing(model, rows)
    index = np.array([[0, 1, 2], [10, 11, 12]])
    paths = pw.pathway_strings(choices, index)
    assert paths.shape == (2, 3 * 2 * 2)
    assert paths[1, :2].tolist() == sorted(choices[0, 1, 0].tolist())  # row 1, position 0, layer 0
    complexity = pw.pathway_complexity(model, choices, gates, index)
    assert complexity.shape == (2,) and ((complexity >= 0) & (complexity <= 2)).all()


# --- checkpoints and SIGKILL resume of a MoE run ------------------------------------------------

BLOCKS = TokenBlocks(torch.randint(0, 30, (64, 17), generator=torch.Generator().manual_seed(0)))


def moe_cfg():
    return TrainConfig(steps=12, batch_size=4, seq_len=16, warmup_steps=2, log_every=1, eval_every=4,
                       checkpoint_every=4, learning_rate=3e-3, device="cpu")


def train_moe(path, seed=0):
    run = create_run("moe", {}, path)
    train(moe(seed), CausalLM(), BLOCKS, moe_cfg(), run, val=BLOCKS.eval_batches(1, 4), progress=False)
    return run


def curve(path):
    return [(r["step"], r.get("loss"), r.get("aux_loss"), r.get("val_loss")) for r in open_run(path).log.rows()]


def test_a_moe_checkpoint_round_trips_with_its_routing(tmp_path):
    run = train_moe(tmp_path / "r")
    model = open_run(run.path).build_model()  # from model.json, through the registry
    load_checkpoint(run.path, 12, model)
    assert isinstance(model.blocks[1].mlp, MixtureOfExperts) and model.cfg.n_experts == 4
    reference = moe()
    load_checkpoint(run.path, 12, reference)
    x = torch.randint(0, 30, (2, 8))
    a, ca = model.eval().run_with_cache(x, names=lambda n: "expert_choice" in n)
    b, cb = reference.eval().run_with_cache(x, names=lambda n: "expert_choice" in n)
    assert torch.equal(a, b) and all(torch.equal(ca[k], cb[k]) for k in ca)


def test_a_moe_run_resumes_exactly_after_sigkill(tmp_path):
    train_moe(tmp_path / "warm-up")
    t0 = time.perf_counter()
    reference = curve(train_moe(tmp_path / "reference").path)
    seconds = time.perf_counter() - t0
    for attempt, fraction in enumerate((0.4, 0.8)):
        path = tmp_path / f"kill-{attempt}"
        pid = os.fork()
        if pid == 0:
            try:
                train_moe(path)
            finally:
                os._exit(0)
        time.sleep(fraction * seconds)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if not (path / "params.json").is_file():
            continue
        steps = open_run(path).checkpoints()
        if steps:
            assert newest_loadable(path) == steps[-1]
        run = open_run(path)  # the model is built afresh with another seed: the checkpoint supplies the weights
        train(moe(seed=99 if steps else 0), CausalLM(), BLOCKS, moe_cfg(), run, val=BLOCKS.eval_batches(1, 4),
              progress=False)
        assert curve(path) == reference


def test_the_checkpoint_explorer_reads_a_moe_run(tmp_path):
    from lablib.interp.analysis import CheckpointModel

    run = train_moe(tmp_path / "r")
    char_tokenizer(["abcdef (x):\n"]).save(run.path / "tokenizer.json")
    explorer = CheckpointModel(run.path)
    assert explorer.steps() == [1, 2, 4, 8, 12]
    analysis = explorer.analyze(12, "abc(x)", k=3)
    assert analysis.attention.shape[0] == 2 and len(analysis.top_k_tokens) == len("abc(x)")
