"""Plotly charts for the audit: saliency histogram, per-organ retention, kept tokens vs budget."""
from __future__ import annotations

import html

import numpy as np

HIST_BINS = 40


def saliency_histogram(rho: np.ndarray, theta: float, keep: np.ndarray | None = None,
                       cut: float | None = None):
    """ρ of the visual tokens, kept and dropped; a red line where the budget cut them (``cut``: None
    when nothing was cut by ρ) and, where that is not the model's own θ, θ as a grey dotted line."""
    import plotly.graph_objects as go

    rho = np.asarray(rho).ravel()
    fig = go.Figure()
    # 40 bins over 0–1, shifted so that the cut is a bin edge: no bin holds kept and dropped tokens both
    size = 1 / HIST_BINS
    start = (float(cut) % size) - size if cut is not None and np.isfinite(cut) else 0.0
    bins = dict(start=start, end=1 + size, size=size)
    if keep is not None:
        keep = np.asarray(keep).ravel().astype(bool)
        fig.add_histogram(x=rho[~keep], xbins=bins, name="dropped", marker_color="#9aa5b1")
        fig.add_histogram(x=rho[keep], xbins=bins, name="kept", marker_color="#2ca05a")
    else:
        fig.add_histogram(x=rho, xbins=bins, name="ρ")

    def mark(x: float, dash: str, colour: str, text: str, top: bool) -> None:
        """A vertical line with its label beside it, on the side with room (the axis stays 0–1), on a white
        ground so that it reads over the bars."""
        side = "left" if x > 0.5 else "right"
        fig.add_vline(x=x, line_dash=dash, line_color=colour, annotation_text=text,
                      annotation_position=f"{'top' if top else 'bottom'} {side}",
                      annotation=dict(xshift=-4 if side == "left" else 4, font_color=colour,
                                      bgcolor="rgba(255,255,255,0.85)"))

    own = cut is not None and np.isfinite(theta) and abs(cut - theta) < 1e-9
    if cut is not None:
        mark(float(cut), "dash", "#d62728", f"θ = {theta:.3f}" if own else f"cut {cut:.3f}", top=True)
    if np.isfinite(theta) and not own:
        mark(float(theta), "dot", "#7f7f7f", f"Photon's θ {theta:.3f} (not applied)", top=False)
    fig.update_layout(barmode="stack", title="Saliency ρ of the 1,000 visual tokens", xaxis_title="ρ",
                      xaxis_range=[0, 1], yaxis_title="tokens", height=300,
                      margin=dict(l=40, r=10, t=40, b=40))
    return fig


def _text(s: str) -> str:
    """A user's or a model's text as plotly shows it literally (plotly reads '<b>', '<a href>', '<br>' as
    markup in labels and hover text, and decodes entities)."""
    return html.escape(str(s), quote=False)


def retention_bars(retention: dict[str, float], asked=None, small=()):
    """Share of each structure's token blocks kept, in %, the asked structure(s) on top then the rest by
    share; ``asked``: the organ(s) the question names (green, red below half); ``small``: structures
    smaller than a block, counted by any overlap (marked ◦). Names read as words ('kidney left')."""
    import plotly.graph_objects as go

    asked = {asked} if isinstance(asked, str) else set(asked or ())
    names = sorted(retention, key=lambda n: (n in asked, retention[n]))   # plotly draws the first lowest
    vals = [100 * retention[n] for n in names]
    colours = [("#d62728" if v < 50 else "#2ca05a") if n in asked else "#1f77b4"
               for n, v in zip(names, vals)]
    labels = [_text(n.replace("_", " ")) + (" ◦" if n in small else "") + (" (asked)" if n in asked else "")
              for n in names]
    fig = go.Figure(go.Bar(x=vals, y=labels, orientation="h", marker_color=colours,
                           hovertemplate="%{y}: %{x:.0f}% kept<extra></extra>"))
    title = "Share of each structure's token blocks kept"
    if small:
        title += "<br><sup>◦ smaller than a block: counted by any overlap</sup>"
    fig.update_layout(title=title, xaxis=dict(range=[0, 100], title="kept (%)", ticksuffix="%"),
                      height=max(220, 22 * len(names) + 90), margin=dict(l=170, r=10, t=50, b=40))
    return fig


def kept_vs_budget(rows: list[dict]):
    """Kept tokens per budget of the Compare rows; the axis reaches their total (2,000 with a prior scan)."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=[r["budget"] for r in rows], y=[r["kept"] for r in rows],
                               mode="lines+markers", text=[_text(r["answer"]) for r in rows]))
    top = 1.05 * max([1000] + [r["total"] for r in rows])
    fig.update_layout(title="Visual tokens kept per budget", yaxis=dict(title="kept tokens", range=[0, top]),
                      height=300, margin=dict(l=40, r=10, t=40, b=40))
    return fig
