"""The checkpoint explorer: look inside a run's checkpoints, while it trains, in Jupyter.

Notable here:
- `CheckpointExplorer(run_or_path)` is an ipywidgets VBox: a step slider over the
  run's complete checkpoints, loss and metric curves with a marker at that step, a
  prompt box, the prompt coloured by per-token loss with the top-k predictions, an
  attention heatmap with layer / head pickers and the logit-lens table. Everything
  it shows is computed by `lablib.interp.analysis` and drawn by `widgets.plots`.
- Live: a daemon thread polls the run folder (`lablib.background.RunWatcher`) every
  `poll_interval` seconds; new metric rows extend the curves and new checkpoints
  extend the slider (which follows the newest one if it was on the newest). Only
  complete checkpoints are ever listed. `close()` stops the thread.
- Switching steps reuses one model and swaps its weights (`CheckpointModel`);
  analyses are memoised per (step, prompt), so going back is instant.
- `RunComparison(a, b)` puts two explorers side by side; the left one's step, prompt,
  layer and head drive the right one (at the newest step not after the left's).
- `figures()` returns the current views as plain `go.Figure`s, which render in a
  notebook opened without a kernel. The views are Output widgets holding plain
  plotly figures (see `FigureView`), drawn by the plotly renderer that ships with
  plotly's JupyterLab extension: nothing loads from a CDN.
"""

from __future__ import annotations

import html
import json
import threading
from collections import OrderedDict
from pathlib import Path

import ipywidgets as w
import pandas as pd
import plotly.graph_objects as go

from lablib.interp.analysis import CheckpointModel, PromptAnalysis
from lablib.background import RunWatcher
from widgets.plots import attention_figure, curves_figure, extra_metrics, logit_lens_figure, tokens_html

DEFAULT_PROMPT = "def __init__(self, name):\n    self.name = name\n"
WAITING = ("no checkpoint yet", -1)  # the slider's only option until the first checkpoint is complete
MEMO_SIZE = 64
PLOTLY_MIME = "application/vnd.plotly.v1+json"  # drawn by the jupyterlab-plotly renderer that ships with plotly


class FigureView(w.Output):
    """An Output widget showing one plain plotly figure; `show(fig)` replaces it.

    Plain plotly outputs (not FigureWidget) because they are drawn by JupyterLab's own
    plotly renderer as soon as they arrive, are kept in papermill's saved widget state
    and render in a notebook opened without a kernel. A FigureWidget nested in a Box
    was seen to stay blank when a busy browser loaded its 5 MB bundle late.
    """

    def __init__(self, css_class: str):
        super().__init__()
        self.add_class(css_class)
        self.figure: go.Figure | None = None

    def show(self, fig: go.Figure) -> None:
        self.figure = fig
        self.outputs = ({"output_type": "display_data", "metadata": {},
                         "data": {PLOTLY_MIME: json.loads(fig.to_json()), "text/plain": ["<plotly figure>"]}},)


class CheckpointExplorer(w.VBox):
    """Slider over a run's checkpoints with curves, attention, top-k, per-token loss and logit lens."""

    def __init__(self, run_or_path, prompt: str = DEFAULT_PROMPT, *, k: int = 5, live: bool = True,
                 poll_interval: float = 1.0, width: int = 900, stacked: bool = False, device: str = "cpu"):
        self.checkpoint = CheckpointModel(run_or_path, device=device)
        self.path: Path = self.checkpoint.path
        self.k = k
        self.poll_interval = poll_interval
        self.watcher = RunWatcher(self.path)
        self.rows: list[dict] = []
        self.analysis: PromptAnalysis | None = None
        self._memo: OrderedDict[tuple[int, str], PromptAnalysis] = OrderedDict()
        self._lock = threading.RLock()
        self._quiet = False  # set while the slider's options are replaced, which moves its value
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

        half = width if stacked else width // 2
        self.title = w.HTML()
        self.step_slider = w.SelectionSlider(options=[WAITING], description="step", continuous_update=False,
                                             disabled=True, layout=w.Layout(width=f"{min(width, 600)}px"))
        self.step_label = w.HTML()
        self.step_label.add_class("lablib-step")
        self.metric_picker = w.Dropdown(description="right panel", layout=w.Layout(width="260px"))
        self.curves = FigureView("lablib-curves")
        self.curve_width = width
        self.prompt_box = w.Textarea(value=prompt, description="prompt", continuous_update=False,
                                     layout=w.Layout(width=f"{min(width, 600)}px", height="3.2em"))
        self.prompt_box.add_class("lablib-prompt")
        self.tokens_view = w.HTML()
        self.tokens_view.add_class("lablib-tokens")
        self.layer_picker = w.Dropdown(description="layer", layout=w.Layout(width="160px"))
        self.head_picker = w.Dropdown(description="head", layout=w.Layout(width="160px"))
        self.attention, self.lens = FigureView("lablib-attention"), FigureView("lablib-lens")
        self.view_width = half
        self.message = w.HTML()
        views = (w.VBox if stacked else w.HBox)([self.attention, self.lens])
        super().__init__([
            self.title,
            w.HBox([self.step_slider, self.step_label]),
            self.metric_picker, self.curves,
            self.prompt_box, self.tokens_view,
            w.HBox([self.layer_picker, self.head_picker]), views, self.message])
        self.add_class("lablib-explorer")

        self.step_slider.observe(self._on_step, "value")
        self.prompt_box.observe(lambda _: self._redraw_analysis(), "value")
        self.layer_picker.observe(lambda _: self._draw_attention(), "value")
        self.head_picker.observe(lambda _: self._draw_attention(), "value")
        self.metric_picker.observe(lambda _: self._draw_curves(), "value")
        if not self.refresh():
            self._redraw_analysis()  # nothing written yet: say that it waits
        if live:
            self._thread = threading.Thread(target=self._poll_forever, name="lablib-explorer-poll", daemon=True)
            self._thread.start()

    # --- state --------------------------------------------------------------------------
    @property
    def steps(self) -> list[int]:
        return [v for _, v in self.step_slider.options if v != WAITING[1]]

    @property
    def step(self) -> int | None:
        return None if self.step_slider.value == WAITING[1] else self.step_slider.value

    @property
    def polling(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def metrics(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    # --- live updates -------------------------------------------------------------------------
    def _poll_forever(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self.refresh()
            except Exception as e:  # a transient read error must not end live updates
                self.message.value = f'<span style="color:#b00">refresh failed: {html.escape(repr(e))}</span>'

    def refresh(self) -> bool:
        """Read what the run wrote since the last call; redraw what changed. Returns whether anything did."""
        with self._lock:
            update = self.watcher.poll()
            self.title.value = (f"<b>{html.escape(self.path.parent.name)}/{html.escape(self.path.name)}</b>"
                                f" · {html.escape(update.status or 'no status')}")
            if not update.changed:
                return False
            self.rows = update.rows if update.reset else self.rows + update.rows
            if update.checkpoints != self.steps:
                self._set_steps(update.checkpoints)
            self._refresh_metric_picker()
            self._draw_curves()
            self._draw_step_label()
            return True

    def _set_steps(self, steps: list[int]) -> None:
        current, old = self.step, self.steps
        follow = current is None or (old and current == old[-1])
        if not steps:
            target, options = WAITING[1], [WAITING]
        else:
            target = steps[-1] if follow or current not in steps else current
            options = [(str(s), s) for s in steps]
        self._quiet = True
        try:
            self.step_slider.options = options
            self.step_slider.value = target
        finally:
            self._quiet = False
        self.step_slider.disabled = not steps
        if target != current:
            self._redraw_analysis()

    def _refresh_metric_picker(self) -> None:
        names = extra_metrics(self.metrics())
        if list(self.metric_picker.options) != names:
            keep = self.metric_picker.value
            self.metric_picker.options = names
            if names:
                self.metric_picker.value = keep if keep in names else ("lr" if "lr" in names else names[0])

    # --- drawing ---------------------------------------------------------------------------------
    def _on_step(self, change) -> None:
        if not self._quiet:
            self._redraw_analysis()

    def show_step(self, step: int) -> None:
        """Move the slider to `step` (one of `steps`) and redraw everything for it."""
        self.step_slider.value = step

    def analyze(self, step: int, prompt: str) -> PromptAnalysis:
        key = (step, prompt)
        if key not in self._memo:
            self._memo[key] = self.checkpoint.analyze(step, prompt, k=self.k)
            while len(self._memo) > MEMO_SIZE:
                self._memo.popitem(last=False)
        self._memo.move_to_end(key)
        return self._memo[key]

    def _redraw_analysis(self) -> None:
        with self._lock:
            step = self.step
            self._draw_step_label()  # first: the cheapest and most looked-at change
            self._move_marker()
            if step is None:
                self.message.value = "waiting for the first complete checkpoint…"
                return
            try:
                self.analysis = self.analyze(step, self.prompt_box.value)
            except Exception as e:  # a bad prompt or a checkpoint that vanished: say so, keep the widget alive
                self.message.value = f'<span style="color:#b00">{html.escape(type(e).__name__)}: {html.escape(str(e))}</span>'
                return
            self.message.value = ""
            model = self.checkpoint.model
            self._set_options(self.layer_picker, [(f"{i}", i) for i in range(len(model.blocks))])
            self._set_options(self.head_picker, [(f"{h}", h) for h in range(model.cfg.n_head)])
            self.tokens_view.value = tokens_html(self.analysis, model.cfg.vocab_size)
            self._draw_attention()
            self.lens.show(logit_lens_figure(self.analysis, width=self.view_width))

    @staticmethod
    def _set_options(picker: w.Dropdown, options: list[tuple[str, int]]) -> None:
        if list(picker.options) != options:
            keep = picker.value
            picker.options = options
            picker.value = keep if keep in [v for _, v in options] else options[0][1]

    def _draw_attention(self) -> None:
        with self._lock:
            if self.analysis is None or self.layer_picker.value is None or self.head_picker.value is None:
                return
            self.attention.show(attention_figure(self.analysis, self.layer_picker.value, self.head_picker.value,
                                                 width=self.view_width))

    def _draw_curves(self) -> None:
        """Rebuild the curves (new metric rows or another metric picked)."""
        with self._lock:
            self.curves.show(curves_figure(self.metrics(), self.step, self.metric_picker.value, width=self.curve_width))

    def _move_marker(self) -> None:
        """Only the step marker moves when the step changes; the curves stay."""
        if self.curves.figure is None:
            return
        step = self.step
        self.curves.show(self.curves.figure.update_shapes(x0=step or 0, x1=step or 0, visible=step is not None))

    def _draw_step_label(self) -> None:
        step = self.step
        if step is None:
            self.step_label.value = "no checkpoint yet"
            return
        logged = [r for r in self.rows if r.get("step") == step]
        facts = [f"<b>step {step}</b>"]
        for key, label in (("tokens", "{:,} tokens"), ("loss", "train loss {:.3f}"), ("val_loss", "held-out {:.3f}")):
            value = next((r[key] for r in logged if r.get(key) is not None), None)
            if value is not None:
                facts.append(label.format(value))
        facts.append(f"{len(self.steps)} checkpoints, newest {self.steps[-1]}")
        self.step_label.value = " · ".join(facts)

    # --- output ------------------------------------------------------------------------------------
    def figures(self) -> dict[str, go.Figure]:
        """The current views as plain plotly figures (they render without a kernel)."""
        return {"curves": self.curves.figure, "attention": self.attention.figure, "logit_lens": self.lens.figure}

    def close(self) -> None:
        """Stop polling the run folder and close every widget of the explorer."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10 * self.poll_interval + 5)

        def close_tree(widget):
            for child in getattr(widget, "children", ()):
                close_tree(child)
                child.close()

        close_tree(self)
        super().close()


class RunComparison(w.HBox):
    """Two runs side by side at the same step; the left explorer's controls drive the right one."""

    def __init__(self, left, right, prompt: str = DEFAULT_PROMPT, *, width: int = 1100, **kwargs):
        self.left = left if isinstance(left, CheckpointExplorer) else CheckpointExplorer(
            left, prompt, width=width // 2, stacked=True, **kwargs)
        self.right = right if isinstance(right, CheckpointExplorer) else CheckpointExplorer(
            right, prompt, width=width // 2, stacked=True, **kwargs)
        self._links = [w.link((self.left.prompt_box, "value"), (self.right.prompt_box, "value"))]
        self.left.step_slider.observe(lambda _: self._follow_step(), "value")
        self.left.layer_picker.observe(lambda _: self._follow(self.left.layer_picker, self.right.layer_picker), "value")
        self.left.head_picker.observe(lambda _: self._follow(self.left.head_picker, self.right.head_picker), "value")
        super().__init__([self.left, self.right])
        self._follow_step()

    def _follow_step(self) -> None:
        step, steps = self.left.step, self.right.steps
        if step is None or not steps:
            return
        self.right.show_step(max((s for s in steps if s <= step), default=steps[0]))

    @staticmethod
    def _follow(source: w.Dropdown, target: w.Dropdown) -> None:
        if source.value in [v for _, v in target.options]:
            target.value = source.value

    def close(self) -> None:
        while self._links:  # close() runs again from __del__; unlink only once
            self._links.pop().unlink()
        self.left.close()
        self.right.close()
        super().close()
