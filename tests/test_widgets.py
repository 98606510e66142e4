"""widgets: the checkpoint explorer without a browser (its widgets' state is what the browser draws)."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from lablib.background import RunWatcher, train_in_background
from lablib.checkpoints import save_checkpoint
from lablib.runs import open_run
from test_analysis import make_tiny_run
from widgets.explorer import CheckpointExplorer, RunComparison


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("run") / "tiny")


@pytest.fixture
def copied_run(tiny_run, tmp_path):
    """A private copy of the tiny run that a test may add checkpoints to."""
    return open_run(shutil.copytree(tiny_run.path, tmp_path / "tiny"))


@pytest.fixture
def explorer(tiny_run):
    ex = CheckpointExplorer(tiny_run.path, prompt="def add(a, b):", live=False)
    yield ex
    ex.close()


def test_explorer_opens_on_the_newest_checkpoint(explorer):
    assert explorer.steps == [1, 2, 4, 8] and explorer.step == 8
    assert "step 8" in explorer.step_label.value
    assert explorer.curves.figure.layout.shapes[0].x0 == 8


def test_moving_the_slider_redraws_every_view(explorer):
    attention, lens, loss_curve = (explorer.attention.figure.data[0].z, explorer.lens.figure.data[0].z,
                                   list(explorer.curves.figure.data[0].y))
    tokens_before = explorer.tokens_view.value
    explorer.show_step(1)
    assert "step 1" in explorer.step_label.value
    assert explorer.curves.figure.layout.shapes[0].x0 == 1
    assert (explorer.attention.figure.data[0].z != attention).any()
    assert (explorer.lens.figure.data[0].z != lens).any()
    assert explorer.tokens_view.value != tokens_before
    assert list(explorer.curves.figure.data[0].y) == loss_curve  # the curves stay; only the marker moved


def test_a_new_prompt_redraws_attention_at_its_length(explorer):
    explorer.prompt_box.value = "class Point:"
    assert explorer.attention.figure.data[0].z.shape == (12, 12)
    assert explorer.lens.figure.data[0].z.shape == (3, 12)
    assert "Point" not in explorer.message.value


def test_layer_and_head_pickers_select_the_heatmap(explorer):
    explorer.layer_picker.value, explorer.head_picker.value = 1, 1
    assert (explorer.attention.figure.data[0].z == explorer.analysis.attention[1, 1]).all()
    assert "layer 1 head 1" in explorer.attention.figure.layout.title.text


def test_views_are_plain_plotly_outputs(explorer):
    figures = explorer.figures()
    assert set(figures) == {"curves", "attention", "logit_lens"}
    assert all(type(f) is go.Figure for f in figures.values())
    shown = explorer.attention.outputs[0]["data"]["application/vnd.plotly.v1+json"]
    assert shown["layout"]["title"]["text"] == explorer.attention.figure.layout.title.text


def test_new_checkpoints_and_metrics_appear_on_refresh(copied_run):
    ex = CheckpointExplorer(copied_run.path, live=False)
    try:
        model, _ = copied_run.load_model(8)
        with torch.no_grad():
            model.embed.weight.mul_(0.5)
        save_checkpoint(copied_run.path, 16, model)
        copied_run.log.append({"step": 16, "tokens": 2048, "loss": 2.5})
        assert ex.refresh()
        assert ex.steps == [1, 2, 4, 8, 16] and ex.step == 16  # it was on the newest, so it follows
        assert 16 in list(ex.curves.figure.data[0].x)
    finally:
        ex.close()


def test_a_half_written_checkpoint_is_never_listed(copied_run):
    ex = CheckpointExplorer(copied_run.path, live=False)
    try:
        partial = copied_run.path / "checkpoints" / "step-000016"
        partial.mkdir()
        shutil.copy(copied_run.path / "checkpoints" / "step-000008" / "model.safetensors", partial)
        ex.refresh()
        assert ex.steps == [1, 2, 4, 8]
    finally:
        ex.close()


def test_watcher_waits_for_the_end_of_a_torn_metrics_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n" + '{"step": 2, "lo')
    watcher = RunWatcher(tmp_path)
    assert [r["step"] for r in watcher.poll().rows] == [1]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('ss": 1.0}\n')
    assert watcher.poll().rows == [{"step": 2, "loss": 1.0}]


def test_live_explorer_polls_until_closed(copied_run):
    ex = CheckpointExplorer(copied_run.path, poll_interval=0.05)
    assert ex.polling
    model, _ = copied_run.load_model(8)
    save_checkpoint(copied_run.path, 12, model)
    deadline = time.monotonic() + 30
    while 12 not in ex.steps and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 12 in ex.steps
    ex.close()
    assert not ex.polling


def test_explorer_waits_for_the_first_checkpoint_of_a_starting_run(tmp_path):
    os.makedirs(tmp_path / "starting")
    ex = CheckpointExplorer(tmp_path / "starting", live=False)
    try:
        assert ex.steps == [] and ex.step is None and ex.step_slider.disabled
        assert "waiting" in ex.message.value
    finally:
        ex.close()


def test_background_training_writes_checkpoints_the_explorer_sees(tmp_path):
    job = train_in_background(make_tiny_run, tmp_path / "bg", steps=4, checkpoint_every=2)
    run = job.wait(timeout=120)
    ex = CheckpointExplorer(run.path, live=False)
    try:
        assert ex.steps == [1, 2, 4]
    finally:
        ex.close()


def test_comparison_follows_the_left_runs_step_and_prompt(tiny_run, copied_run):
    cmp = RunComparison(tiny_run.path, copied_run.path, prompt="x = 1", live=False)
    try:
        cmp.left.show_step(4)
        assert cmp.right.step == 4
        cmp.left.prompt_box.value = "y = 2"
        assert cmp.right.prompt_box.value == "y = 2"
        assert (cmp.right.attention.figure.data[0].z == cmp.left.attention.figure.data[0].z).all()  # same weights at step 4
    finally:
        cmp.close()


def test_patching_and_probe_figures_draw_the_results():
    from lablib.interp.analysis import PatchingResult
    from widgets.plots import patching_figure, probe_figure

    result = PatchingResult(effect=np.array([[0.0, 2.0], [1.0, 1.0]]), clean=3.0, corrupted=1.0, site="resid_pre")
    fig = patching_figure(result, ["a", "b"])
    assert (fig.data[0].z == [[0.0, 1.0], [0.5, 0.5]]).all()
    table = pd.DataFrame({"layer": ["embed", "block 0"], "test_accuracy": [0.6, 0.9], "majority_baseline": [0.5, 0.5]})
    assert list(probe_figure(table).data[0].y) == [0.6, 0.9]
