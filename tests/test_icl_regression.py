"""In-context linear regression: the predictors, the scoring interface, the rational model and resuming."""

import numpy as np
import pytest
import torch

from lablib.experiments import icl_strategies as exp
from lablib.models import ICLRegressor, ICLRegressorConfig
from lablib.tasks import icl_regression as task


def tiny_model(d=3, k=5, tokens="interleaved"):
    torch.manual_seed(0)
    return ICLRegressor(ICLRegressorConfig(n_dims=d, n_points=k + 1, n_layer=1, n_head=2, d_model=16, tokens=tokens))


def test_dmmse_is_the_pool_vector_once_a_noiseless_context_is_long():
    pool = task.task_pool(4, 16, seed=0)
    gen = torch.Generator().manual_seed(1)
    data = task.sample_sequences(pool[[3, 7]], k=12, sigma=0.0, generator=gen)
    preds = task.dmmse_predictions(data["xs"], data["ys"], pool, sigma=0.05)
    truth = torch.einsum("bkd,bd->bk", data["xs"], pool[[3, 7]])
    assert torch.allclose(preds[:, -4:], truth[:, -4:], atol=1e-5)
    assert torch.allclose(preds[:, 0], data["xs"][:, 0] @ pool.mean(0), atol=1e-5)  # no pair yet: the pool's mean


def test_ridge_matches_sklearn_at_every_position():
    from sklearn.linear_model import Ridge

    gen = torch.Generator().manual_seed(2)
    data = task.sample_sequences(torch.randn(2, 3, generator=gen), k=7, sigma=0.5, generator=gen)
    preds = task.ridge_predictions(data["xs"], data["ys"], lam=0.25)
    xs, ys = data["xs"].double().numpy(), data["ys"].double().numpy()
    for b in range(2):
        for t in range(1, 7):
            fit = Ridge(alpha=0.25, fit_intercept=False).fit(xs[b, :t], ys[b, :t])
            assert preds[b, t].item() == pytest.approx(fit.predict(xs[b, t:t + 1])[0], abs=1e-5)
    assert torch.all(preds[:, 0] == 0)


def test_trivial_rules_see_only_the_pairs_before_each_position():
    gen = torch.Generator().manual_seed(3)
    data = task.sample_sequences(torch.randn(2, 3, generator=gen), k=6, sigma=0.1, generator=gen)
    for rule, fn in task.TRIVIAL_RULES.items():
        changed = data["ys"].clone()
        changed[:, 3] += 100.0
        before, after = fn(data["xs"], data["ys"]), fn(data["xs"], changed)
        assert torch.allclose(before[:, :4], after[:, :4]), rule


@pytest.mark.parametrize("tokens", ["interleaved", "pairs"])
def test_the_model_predicts_y_t_from_x_t_and_the_pairs_before_it(tokens):
    model = tiny_model(tokens=tokens)
    xs, ys = torch.randn(2, 6, 3), torch.randn(2, 6)
    changed_y, changed_x = ys.clone(), xs.clone()
    changed_y[:, 4] = 50.0
    changed_x[:, 4] = 50.0
    assert torch.allclose(model(xs, ys)[:, :5], model(xs, changed_y)[:, :5], atol=1e-6)  # y_4 unseen up to position 4
    assert not torch.allclose(model(xs, ys)[:, 5], model(xs, changed_y)[:, 5])  # and read after it
    assert torch.allclose(model(xs, ys)[:, :4], model(changed_x, ys)[:, :4], atol=1e-6)
    assert not torch.allclose(model(xs, ys)[:, 4], model(changed_x, ys)[:, 4])  # x_4 is read at its own position


def test_predict_takes_numpy_and_torch_with_the_stated_shapes():
    model = tiny_model()
    rng = np.random.default_rng(0)
    xs, ys, q = rng.normal(size=(4, 5, 3)), rng.normal(size=(4, 5)), rng.normal(size=(4, 3))
    out_np = task.predict(model, xs, ys, q)
    out_t = task.predict(model, torch.tensor(xs), torch.tensor(ys), torch.tensor(q))
    assert isinstance(out_np, np.ndarray) and out_np.shape == (4,)
    assert isinstance(out_t, torch.Tensor) and out_t.shape == (4,)
    assert np.allclose(out_np, out_t.numpy(), atol=1e-6)
    full = model(torch.tensor(np.concatenate([xs, q[:, None]], 1)).float(), torch.tensor(np.pad(ys, ((0, 0), (0, 1)))).float())
    assert np.allclose(out_np, full[:, 5].detach().numpy(), atol=1e-6)


@pytest.mark.parametrize("xs, ys, q, message", [
    ((4, 5), (4, 5), (4, 3), r"^xs: expected 3 dimensions, got shape \(4, 5\)$"),
    ((4, 5, 3), (4, 6), (4, 3), r"^ys: expected shape \(B, k\) = \(4, 5\) to match xs"),
    ((4, 5, 3), (4, 5), (3, 3), r"^x_query: expected shape \(B, d\) = \(4, 3\)"),
    ((4, 5, 2), (4, 5), (4, 2), r"^xs: the model reads x of dimension 3, got d=2$"),
])
def test_predict_refuses_wrong_shapes_in_one_line(xs, ys, q, message):
    with pytest.raises(ValueError, match=message):
        task.predict(tiny_model(), np.zeros(xs), np.zeros(ys), np.zeros(q))


def test_mixing_weight_recovers_a_known_mix():
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(50, 8, generator=gen), torch.randn(50, 8, generator=gen)
    assert task.mixing_weight(0.3 * a + 0.7 * b, a, b) == pytest.approx(0.3, abs=1e-6)


def test_the_rational_fit_recovers_its_parameters_from_synthetic_cells():
    truth = exp.RationalModel(log_a=-4.0, alpha=0.3, log_b=-3.0, beta=0.8)
    sizes = np.array([2 ** p for p in range(1, 15)], float)
    N = np.array([2 ** s for s in range(4, 18)], float)
    NN, MM = np.meshgrid(N, sizes)
    dL = 2.0 / np.sqrt(MM)  # dMMSE's advantage shrinks as the pool grows
    K = MM * 4
    mix = truth.memorizing(NN, dL, K)
    fitted = exp.fit_rational(NN.ravel(), dL.ravel(), K.ravel(), mix.ravel())
    assert fitted.alpha == pytest.approx(truth.alpha, abs=0.02)
    assert fitted.beta == pytest.approx(truth.beta, abs=0.02)
    assert fitted.log_a == pytest.approx(truth.log_a, abs=0.2) and fitted.log_b == pytest.approx(truth.log_b, abs=0.2)
    assert exp.r_squared(mix.ravel(), fitted.memorizing(NN, dL, K).ravel()) > 0.999


def test_transition_is_interpolated_in_log2_M():
    final = {2: {"fresh_test/d_dmmse": 1.0, "fresh_test/d_ridge": 4.0},
             8: {"fresh_test/d_dmmse": 2.0, "fresh_test/d_ridge": 2.0 / np.e},
             32: {"fresh_test/d_dmmse": 3.0, "fresh_test/d_ridge": 0.1}}
    # log ratios -log 4 and +1 between log2 M = 1 and 3
    assert np.log2(exp.transition_pool_size(final)) == pytest.approx(1 + 2 * np.log(4) / (np.log(4) + 1))
    assert exp.transition_pool_size({m: {"fresh_test/d_dmmse": 1.0, "fresh_test/d_ridge": 2.0} for m in (2, 4)}) is None


def test_a_tiny_run_resumes_from_its_checkpoint(tmp_path):
    import shutil

    from lablib.checkpoints import list_checkpoints
    from lablib.runs import start_run

    cfg = exp.ICLStrategiesConfig.resolve("smoke", pool_sizes=[2, 4], seeds=[0], steps=12, checkpoint_every=6,
                                          warmup_steps=2, n_eval=8, keep_optimizer=2)
    sets = exp.eval_sets(cfg, 4, 0)
    whole = exp.train_point(cfg, 4, 0, sets, start_run(exp.EXPERIMENT, cfg, tmp_path / "whole"))
    run = start_run(exp.EXPERIMENT, cfg, tmp_path / "cut")
    exp.train_point(cfg, 4, 0, sets, run)
    sub = tmp_path / "cut" / "models" / "M4-seed0"
    assert list_checkpoints(sub)[-1] == 12 and [r["step"] for r in whole.rows] == cfg.eval_steps()
    shutil.rmtree(sub / "checkpoints" / "step-000012")  # as if stopped after step 6's checkpoint
    (sub / "status.json").unlink()
    resumed = exp.train_point(cfg, 4, 0, sets, run)
    assert resumed.resumed_from == 6
    assert [r["step"] for r in resumed.rows] == cfg.eval_steps()  # the rows before step 6 read back from metrics
    assert resumed.rows[-1]["fresh_test/mse"] == pytest.approx(whole.rows[-1]["fresh_test/mse"], rel=1e-5)
