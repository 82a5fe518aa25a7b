"""Plotly figures the chapters draw more than once. Each returns a `go.Figure`; `show` displays it.

Interactivity that must survive a static page uses plotly's own sliders and dropdowns (they run in
the browser without a kernel); ipywidgets explorers live in the notebooks, for live kernels only.
"""

from __future__ import annotations

import base64
import io
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mabook.images import enlarged


def show(fig: go.Figure) -> None:
    """Display a figure. One place to change how figures render on the static book."""
    fig.show()


def heatmap_over_steps(values: np.ndarray, layers: Sequence[str], steps: Sequence[int], title: str,
                       colorbar: str = "log10 |mean|") -> go.Figure:
    """Layer x channel heatmap with a slider over denoising steps (plus "all steps" first).

    values: (steps, layers, channels), already in the units to plot (e.g. log10 of a statistic).
    """
    S, L, C = values.shape
    pooled = values.mean(0)
    frames = [("all", pooled)] + [(str(s), values[i]) for i, s in enumerate(steps)]
    zmin, zmax = float(values.min()), float(values.max())
    fig = go.Figure(
        go.Heatmap(z=pooled, y=list(layers), x=list(range(C)), zmin=zmin, zmax=zmax, colorscale="Viridis",
                   colorbar=dict(title=colorbar), hovertemplate="%{y}<br>channel %{x}<br>%{z:.2f}<extra></extra>"),
        frames=[go.Frame(data=[go.Heatmap(z=z)], name=name) for name, z in frames],
    )
    slider = dict(active=0, currentvalue=dict(prefix="step: "), pad=dict(t=40),
                  steps=[dict(label=name, method="animate",
                              args=[[name], dict(mode="immediate", frame=dict(duration=0, redraw=True))])
                         for name, _ in frames])
    fig.update_layout(title=title, xaxis_title="channel", yaxis=dict(title="layer", autorange="reversed"),
                      sliders=[slider], height=120 + 28 * L)
    return fig


def channel_bars_by_layer(values: np.ndarray, layers: Sequence[str], highlight: dict[str, Sequence[Sequence[int]]],
                          title: str, yaxis: str = "|mean over image tokens|") -> go.Figure:
    """Per-channel bars for one layer at a time (slider over layers), highlighted channel sets.

    values: (layers, channels). highlight: set name -> one list of channels per layer
    (e.g. {"top-k": ..., "bottom-k": ..., "random-k": ...}); other channels are grey.
    """
    L, C = values.shape
    palette = ["crimson", "royalblue", "darkorange", "seagreen"]
    fig = go.Figure()
    for i in range(L):
        colors = np.array(["lightgrey"] * C, dtype=object)
        for j, sets in enumerate(highlight.values()):
            colors[list(sets[i])] = palette[j % len(palette)]
        fig.add_bar(x=list(range(C)), y=values[i], marker_color=list(colors), visible=(i == 0), name=layers[i],
                    hovertemplate="channel %{x}<br>%{y:.3g}<extra></extra>")
    legend = ", ".join(f"{name}: {palette[j % len(palette)]}" for j, name in enumerate(highlight))
    slider = dict(active=0, currentvalue=dict(prefix="layer: "), pad=dict(t=40),
                  steps=[dict(label=name, method="update", args=[{"visible": [k == i for k in range(L)]}])
                         for i, name in enumerate(layers)])
    fig.update_layout(title=f"{title}<br><sup>{legend}</sup>", xaxis_title="channel", yaxis=dict(title=yaxis, type="log"),
                      sliders=[slider], showlegend=False)
    return fig


def layer_bars(layers: Sequence[str], values: Sequence[float], labels: Sequence[str], title: str, yaxis: str,
               log_y: bool = True) -> go.Figure:
    """One bar per layer (e.g. the top channel's ratio to the median), each labelled (e.g. "ch 66")."""
    fig = go.Figure(go.Bar(x=list(layers), y=list(values), text=list(labels), textposition="outside",
                           hovertemplate="%{x}<br>%{text}<br>%{y:.3g}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="layer", yaxis=dict(title=yaxis, type="log" if log_y else "linear"))
    return fig


def lines(x: Sequence, series: dict[str, np.ndarray], title: str, xaxis: str, yaxis: str, log_y: bool = True) -> go.Figure:
    """One line per named series over a shared x (e.g. the statistic over denoising steps, per layer)."""
    fig = go.Figure([go.Scatter(x=list(x), y=np.asarray(y), mode="lines+markers", name=name) for name, y in series.items()])
    fig.update_layout(title=title, xaxis_title=xaxis, yaxis=dict(title=yaxis, type="log" if log_y else "linear"))
    return fig


def matrices_dropdown(matrices: dict[str, tuple[np.ndarray, Sequence[str]]], title: str) -> go.Figure:
    """Square matrices (e.g. pairwise Jaccard) with a dropdown to switch between them.

    matrices: name -> (matrix (n, n), labels (n,)).
    """
    fig = go.Figure()
    names = list(matrices)
    for i, name in enumerate(names):
        m, labels = matrices[name]
        fig.add_heatmap(z=m, x=list(labels), y=list(labels), zmin=0, zmax=1, colorscale="Blues", visible=(i == 0),
                        colorbar=dict(title="Jaccard"), hovertemplate="%{x}<br>%{y}<br>%{z:.2f}<extra></extra>")
    buttons = [dict(label=name, method="update", args=[{"visible": [j == i for j in range(len(names))]},
                                                       {"title": f"{title}: {name}"}])
               for i, name in enumerate(names)]
    fig.update_layout(title=f"{title}: {names[0]}", updatemenus=[dict(buttons=buttons, x=1.0, y=1.15, xanchor="right")],
                      yaxis=dict(autorange="reversed"), height=520)
    return fig


def image_grid(images: np.ndarray, titles: Sequence[str] | None = None, columns: int = 8) -> go.Figure:
    """(B, H, W, 3) uint8 images in a grid (hover shows the title)."""
    B = len(images)
    rows = -(-B // columns)
    cols = min(columns, B)
    fig = make_subplots(rows=rows, cols=cols, horizontal_spacing=0.01, vertical_spacing=0.02)
    for i, im in enumerate(images):
        fig.add_trace(go.Image(z=im, name=titles[i] if titles else str(i)), row=i // columns + 1, col=i % columns + 1)
    # a thin frame per image: white-background images would otherwise vanish into the page
    frame = dict(showticklabels=False, ticks="", showgrid=False, zeroline=False, showline=True, linecolor="#bbb", mirror=True)
    fig.update_xaxes(**frame)
    fig.update_yaxes(**frame)
    fig.update_layout(height=110 * rows + 40, margin=dict(l=10, r=10, t=30, b=10))
    return fig


def curves_with_bands(x: Sequence, series: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], title: str,
                      xaxis: str, yaxis: str, log_x: bool = False, log_y: bool = False) -> go.Figure:
    """Lines with shaded confidence bands: series name -> (mean, low, high), each over x
    (e.g. damage vs k for top-k and each control, bootstrap 95 % CIs)."""
    palette = ["crimson", "royalblue", "darkorange", "seagreen", "purple", "grey"]
    fig = go.Figure()
    for i, (name, (mean, low, high)) in enumerate(series.items()):
        color = palette[i % len(palette)]
        fig.add_scatter(x=list(x) + list(x)[::-1], y=list(high) + list(low)[::-1], fill="toself", line=dict(width=0),
                        fillcolor=color, opacity=0.15, hoverinfo="skip", showlegend=False, legendgroup=name)
        fig.add_scatter(x=list(x), y=list(mean), mode="lines+markers", name=name, line=dict(color=color), legendgroup=name,
                        customdata=np.stack([low, high], 1),
                        hovertemplate=f"{name}<br>%{{x}}: %{{y:.4g}} (95% CI %{{customdata[0]:.4g}}-%{{customdata[1]:.4g}})<extra></extra>")
    fig.update_layout(title=title, xaxis=dict(title=xaxis, type="log" if log_x else "linear"),
                      yaxis=dict(title=yaxis, type="log" if log_y else "linear"))
    return fig


def heatmaps_dropdown(maps: dict[str, np.ndarray], rows: Sequence[str], columns: Sequence[str], title: str,
                      colorbar: str = "") -> go.Figure:
    """Small annotated heatmaps (e.g. layer window x step window) with a dropdown between them."""
    fig = go.Figure()
    names = list(maps)
    for i, name in enumerate(names):
        z = np.asarray(maps[name], dtype=float)
        fig.add_heatmap(z=z, x=list(columns), y=list(rows), colorscale="Reds", visible=(i == 0), colorbar=dict(title=colorbar),
                        text=np.vectorize(lambda v: f"{v:.3g}")(z), texttemplate="%{text}",
                        hovertemplate="%{y}<br>%{x}<br>%{z:.4g}<extra></extra>")
    buttons = [dict(label=name, method="update", args=[{"visible": [j == i for j in range(len(names))]},
                                                       {"title": f"{title}: {name}"}]) for i, name in enumerate(names)]
    fig.update_layout(title=f"{title}: {names[0]}", yaxis=dict(autorange="reversed"), height=380,
                      updatemenus=[dict(buttons=buttons, x=1.0, y=1.2, xanchor="right")] if len(names) > 1 else [])
    return fig


def image_slider(mosaics: dict[str, np.ndarray], title: str, prefix: str = "") -> go.Figure:
    """One uint8 image (e.g. a row of generations) per slider position: a static-page explorer."""
    names = list(mosaics)
    fig = go.Figure(go.Image(z=mosaics[names[0]]), frames=[go.Frame(data=[go.Image(z=mosaics[n])], name=n) for n in names])
    slider = dict(active=0, currentvalue=dict(prefix=prefix), pad=dict(t=30),
                  steps=[dict(label=n, method="animate", args=[[n], dict(mode="immediate", frame=dict(duration=0, redraw=True))])
                         for n in names])
    fig.update_layout(title=title, sliders=[slider], margin=dict(l=10, r=10, t=40, b=10))
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    return fig


def bars_with_ci(labels: Sequence[str], means: Sequence[float], cis: Sequence[tuple[float, float]], title: str, yaxis: str,
                 reference: float | None = None, reference_label: str = "chance") -> go.Figure:
    """One bar per group (e.g. channel set) with its 95 % CI as error bars, and an optional
    horizontal reference line (e.g. the chance level)."""
    means = np.asarray(means, dtype=float)
    low = np.array([c[0] for c in cis], dtype=float)
    high = np.array([c[1] for c in cis], dtype=float)
    fig = go.Figure(go.Bar(x=list(labels), y=means,
                           error_y=dict(type="data", symmetric=False, array=np.nan_to_num(high - means),
                                        arrayminus=np.nan_to_num(means - low)),
                           customdata=np.stack([low, high], 1),
                           hovertemplate="%{x}<br>%{y:.3f} (95% CI %{customdata[0]:.3f}-%{customdata[1]:.3f})<extra></extra>"))
    if reference is not None:
        fig.add_hline(y=reference, line_dash="dot", line_color="grey", annotation_text=reference_label)
    fig.update_layout(title=title, yaxis_title=yaxis)
    return fig


def scatter_dropdown(embeddings: dict[str, np.ndarray], colorings: dict[str, Sequence[str]], hover: Sequence[str],
                     title: str) -> go.Figure:
    """2-D point clouds (e.g. UMAP embeddings) with a dropdown over (embedding, colouring).

    embeddings: name -> (N, 2); colorings: name -> N category labels (one legend entry per
    category); hover: N strings shown on hover (e.g. the token's (row, col) and prompt)."""
    palette = ["#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880", "#ff97ff",
               "#fecb52", "#555555"]
    hover = np.asarray(list(hover), dtype=object)
    fig, groups = go.Figure(), []
    for e_name, xy in embeddings.items():
        xy = np.asarray(xy)
        for c_name, labels in colorings.items():
            labels = np.asarray(list(labels), dtype=object)
            categories = list(dict.fromkeys(labels))
            first = not groups
            groups.append((f"{e_name}, coloured by {c_name}", len(categories)))
            for i, cat in enumerate(categories):
                keep = labels == cat
                fig.add_scatter(x=xy[keep, 0], y=xy[keep, 1], mode="markers", name=str(cat), visible=first,
                                legendgroup=str(cat), marker=dict(size=5, color=palette[i % len(palette)], opacity=0.8),
                                text=hover[keep], hovertemplate="%{text}<extra>" + str(cat) + "</extra>")
    n = sum(count for _, count in groups)
    buttons, start = [], 0
    for name, count in groups:
        visible = [start <= j < start + count for j in range(n)]
        buttons.append(dict(label=name, method="update", args=[{"visible": visible}, {"title": f"{title}: {name}"}]))
        start += count
    fig.update_layout(title=f"{title}: {groups[0][0]}", height=560, xaxis=dict(showticklabels=False, title=""),
                      yaxis=dict(showticklabels=False, title=""),
                      updatemenus=[dict(buttons=buttons, x=0.0, y=1.12, xanchor="left")] if len(groups) > 1 else [])
    return fig


def image_slider_png(mosaics: dict[str, np.ndarray], title: str, prefix: str = "", scale: int = 2) -> go.Figure:
    """Like `image_slider`, but each uint8 image travels as a PNG (upscaled `scale` times, nearest)
    and the slider toggles visibility: many positions stay a small page."""
    names = list(mosaics)
    fig = go.Figure()
    for i, name in enumerate(names):
        im = enlarged(mosaics[name], scale)
        buffer = io.BytesIO()
        im.save(buffer, format="PNG")
        fig.add_trace(go.Image(source="data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(),
                               visible=(i == 0), name=name, hoverinfo="skip"))
    slider = dict(active=0, currentvalue=dict(prefix=prefix), pad=dict(t=30),
                  steps=[dict(label=n, method="update", args=[{"visible": [j == i for j in range(len(names))]}])
                         for i, n in enumerate(names)])
    height = np.asarray(mosaics[names[0]]).shape[0] * scale
    fig.update_layout(title=title, sliders=[slider], margin=dict(l=10, r=10, t=40, b=10), height=height + 170)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    return fig


def xy_dropdown(series: dict[str, tuple[np.ndarray, np.ndarray]], title: str, xaxis: str, yaxis: str,
                hover: dict[str, Sequence[str]] | None = None, log_x: bool = False, log_y: bool = False) -> go.Figure:
    """Scatter plots with labelled axes (e.g. per token: a channel's magnitude vs its attention mass),
    one per name, with a dropdown between them. series: name -> (x, y); hover: name -> one string per point."""
    fig = go.Figure()
    names = list(series)
    for i, name in enumerate(names):
        x, y = series[name]
        text = list(hover[name]) if hover and name in hover else None
        fig.add_scatter(x=np.asarray(x), y=np.asarray(y), mode="markers", name=name, visible=(i == 0), text=text,
                        marker=dict(size=5, opacity=0.6),
                        hovertemplate=("%{text}<br>" if text else "") + "%{x:.4g}, %{y:.4g}<extra></extra>")
    buttons = [dict(label=name, method="update", args=[{"visible": [j == i for j in range(len(names))]},
                                                       {"title": f"{title}: {name}"}]) for i, name in enumerate(names)]
    fig.update_layout(title=f"{title}: {names[0]}", xaxis=dict(title=xaxis, type="log" if log_x else "linear"),
                      yaxis=dict(title=yaxis, type="log" if log_y else "linear"), showlegend=False,
                      updatemenus=[dict(buttons=buttons, x=1.0, y=1.15, xanchor="right")] if len(names) > 1 else [])
    return fig
