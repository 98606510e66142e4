"""Plain plotly figures (and one HTML table) of `lablib.interp.analysis` results; no math here.

Notable here:
- Each builder takes a computed result and returns a `go.Figure`; the checkpoint
  explorer copies the same figures into its FigureWidgets, and a notebook can
  `.show()` them as ordinary plotly outputs that render without a kernel.
- `template=None` skips plotly's template (copying it costs more than the figure);
  the explorer sets the template once on its FigureWidgets.
- Tokens are drawn readable: a space is `␣`, a newline `⏎`, a tab `⇥`. Axes use
  positions with token tick labels, so repeated tokens stay separate.
"""

from __future__ import annotations

import html
import math

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from lablib.interp.analysis import PatchingResult, PromptAnalysis

VISIBLE = str.maketrans({" ": "␣", "\n": "⏎", "\t": "⇥", "\r": "␍"})
CURVE_COLUMNS = ("step", "tokens", "loss", "val_loss")  # drawn in the left panel or used as axes
TEMPLATE = "plotly_white"


def show_token(token: str) -> str:
    return token.translate(VISIBLE) or "∅"


def _ticks(tokens: list[str]) -> dict:
    return {"tickmode": "array", "tickvals": list(range(len(tokens))), "ticktext": [show_token(t) for t in tokens]}


def extra_metrics(metrics) -> list[str]:
    """Numeric metric columns other than the loss curves (lr, grad_norm, tokens_per_s, task metrics...)."""
    if metrics is None or metrics.empty:
        return []
    numeric = metrics.select_dtypes("number").columns
    return [c for c in numeric if c not in CURVE_COLUMNS and metrics[c].notna().any()]


def curves_figure(metrics, step: int | None = None, metric: str | None = None, width: int = 900,
                  height: int = 280, template: str | None = TEMPLATE) -> go.Figure:
    """Loss curves (left) and one other metric (right) against step, with a dashed marker at `step`."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", metric or "—"), horizontal_spacing=0.1)
    empty = metrics is None or metrics.empty or "step" not in metrics

    def column(name):
        if empty or name not in metrics:
            return [], []
        rows = metrics.dropna(subset=[name])
        return rows["step"].tolist(), rows[name].tolist()

    for name, label, mode in (("loss", "train loss", "lines"), ("val_loss", "held-out loss", "lines+markers")):
        x, y = column(name)
        fig.add_trace(go.Scatter(x=x, y=y, name=label, mode=mode), row=1, col=1)
    x, y = column(metric) if metric else ([], [])
    fig.add_trace(go.Scatter(x=x, y=y, name=metric or "metric", mode="lines", showlegend=False), row=1, col=2)
    marker = step if step is not None else 0
    fig.update_layout(
        shapes=[dict(type="line", xref=xref, yref=f"{yref} domain", x0=marker, x1=marker, y0=0, y1=1,
                     line=dict(dash="dash", color="black", width=1), visible=step is not None)
                for xref, yref in (("x", "y"), ("x2", "y2"))],
        template=template, width=width, height=height, margin=dict(l=50, r=20, t=30, b=40),
        legend=dict(orientation="h", x=0, y=-0.25))
    fig.update_xaxes(title_text="step")
    return fig


def attention_figure(a: PromptAnalysis, layer: int, head: int, width: int = 440, height: int = 420,
                     template: str | None = TEMPLATE) -> go.Figure:
    """Heatmap of one head's attention: rows are query positions, columns the keys they read."""
    pattern = a.attention[layer, head]
    shown = [show_token(t) for t in a.tokens]
    hover = np.array([[f"{i}:{shown[i]} → {j}:{shown[j]}" for j in range(len(shown))] for i in range(len(shown))])
    return go.Figure(
        go.Heatmap(z=pattern, zmin=0, zmax=1, colorscale="Blues", text=hover,
                   hovertemplate="%{text}<br>weight %{z:.3f}<extra></extra>", colorbar=dict(thickness=10)),
        layout=dict(title=dict(text=f"attention · layer {layer} head {head} · step {a.step}", x=0.5),
                    template=template, width=width, height=height, margin=dict(l=50, r=10, t=40, b=50),
                    xaxis=dict(title=dict(text="key"), tickangle=0, **_ticks(a.tokens)),
                    yaxis=dict(title=dict(text="query"), autorange="reversed", **_ticks(a.tokens))))


def logit_lens_figure(a: PromptAnalysis, width: int = 440, height: int = 420,
                      template: str | None = TEMPLATE) -> go.Figure:
    """The logit-lens table: each layer's top next-token guess at each position (text), coloured by the
    probability that layer gives to the token that actually comes next."""
    shown_top = np.array([[show_token(t) for t in row] for row in a.lens_top_tokens])
    return go.Figure(
        go.Heatmap(z=np.nan_to_num(a.lens_next_prob, nan=0.0), zmin=0, zmax=1, colorscale="Greens", text=shown_top,
                   texttemplate="%{text}", textfont=dict(size=10), customdata=a.lens_top_probs,
                   hovertemplate="%{y}, position %{x}<br>top guess %{text} (p=%{customdata:.2f})"
                                 "<br>p(actual next) %{z:.3f}<extra></extra>", colorbar=dict(thickness=10)),
        layout=dict(title=dict(text=f"logit lens · step {a.step}", x=0.5), template=template,
                    width=width, height=height, margin=dict(l=60, r=10, t=40, b=50),
                    xaxis=dict(title=dict(text="position (input token)"), tickangle=0, **_ticks(a.tokens)),
                    yaxis=dict(tickmode="array", tickvals=list(range(len(a.layers))), ticktext=a.layers)))


def tokens_html(a: PromptAnalysis, vocab_size: int | None = None) -> str:
    """The prompt coloured by per-token loss (hover for the number) above a table of top-k predictions."""
    scale = math.log(vocab_size) if vocab_size else max(1.0, float(np.nanmax(a.token_loss, initial=1.0)))
    surprise = np.concatenate([[np.nan], a.token_loss[:-1]])  # token i is coloured by the loss of predicting it
    colours = sample_colorscale("Reds", np.clip(np.nan_to_num(surprise) / scale, 0.0, 1.0).tolist())
    spans = []
    for token, loss, colour in zip(a.tokens, surprise, colours):
        title = f"loss {loss:.2f} nats" if not math.isnan(loss) else "first token: not predicted"
        colour = "transparent" if math.isnan(loss) else colour
        spans.append(f'<span title="{html.escape(title)}" style="background:{colour};'
                     f'padding:1px 0">{html.escape(show_token(token))}</span>')
    header = "".join(f"<th>{html.escape(show_token(t))}</th>" for t in a.tokens)
    rows = []
    for rank in range(a.top_k_probs.shape[1]):
        cells = []
        for pos in range(len(a.tokens)):
            guess, p = a.top_k_tokens[pos][rank], a.top_k_probs[pos, rank]
            actual = pos + 1 < len(a.tokens) and guess == a.tokens[pos + 1]
            weight = "font-weight:bold;text-decoration:underline;" if actual else ""
            cells.append(f'<td style="{weight}padding:0 4px;background:rgba(31,119,180,{p:.2f})" '
                         f'title="p={p:.3f}">{html.escape(show_token(guess))}</td>')
        rows.append(f"<tr><th>#{rank + 1}</th>{''.join(cells)}</tr>")
    return (f'<div style="font-family:monospace;white-space:pre-wrap;line-height:1.6">'
            f'<b>per-token loss</b> (step {a.step}, mean {a.mean_loss:.3f} nats): {"".join(spans)}</div>'
            f'<div style="overflow-x:auto"><table class="lablib-topk" style="font-family:monospace;font-size:11px;'
            f'border-collapse:collapse;text-align:center"><tr><th>top-{a.top_k_probs.shape[1]} next</th>{header}</tr>'
            f'{"".join(rows)}</table></div>'
            '<div style="font-size:11px;color:#666">columns: input tokens; cells: the next tokens the model predicts '
            'there (shade = probability, underlined = what actually came next)</div>')


def patching_figure(result: PatchingResult, tokens: list[str], width: int = 700, height: int = 320,
                    template: str | None = TEMPLATE) -> go.Figure:
    """Activation patching: fraction of the clean-vs-corrupted metric gap restored per (layer, position)."""
    return go.Figure(
        go.Heatmap(z=result.restored, zmid=0, colorscale="RdBu", reversescale=True,
                   hovertemplate="layer %{y}, position %{x}<br>restored %{z:.2f}<extra></extra>",
                   colorbar=dict(title=dict(text="restored"), thickness=10)),
        layout=dict(title=dict(text=f"activation patching of {result.site} (clean metric {result.clean:.2f}, "
                                    f"corrupted {result.corrupted:.2f})", x=0.5),
                    template=template, width=width, height=height, margin=dict(l=60, r=10, t=40, b=50),
                    xaxis=dict(title=dict(text="position (clean token)"), **_ticks(tokens)),
                    yaxis=dict(title=dict(text="layer"), dtick=1)))


def probe_figure(table, width: int = 600, height: int = 320, template: str | None = TEMPLATE) -> go.Figure:
    """Held-out accuracy of one linear probe per layer (a `probe_layers` table) against the majority baseline."""
    fig = go.Figure([go.Bar(x=table["layer"], y=table["test_accuracy"], name="probe (held-out)"),
                     go.Scatter(x=table["layer"], y=table["majority_baseline"], name="majority class",
                                mode="lines+markers", line=dict(dash="dash"))])
    fig.update_layout(template=template, width=width, height=height, yaxis=dict(title=dict(text="accuracy"),
                      range=[0, 1]), margin=dict(l=60, r=10, t=30, b=40))
    return fig
