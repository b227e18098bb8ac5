"""Helpers for the book's notebooks: show the library's real source, print reproducible verdicts."""

from __future__ import annotations

import inspect
from typing import Any

import torch

__all__ = ["agree", "show_source", "slider_figure", "static_html"]


def show_source(obj: Any, start: str | None = None, end: str | None = None):
    """Render the source of a minigpt function, class or Triton kernel (highlighted in Jupyter).

    ``start``/``end`` optionally cut the listing to the lines from the first one containing
    ``start`` up to (and including) the first later one containing ``end``, so a chapter can read
    a long kernel part by part.
    """
    if hasattr(obj, "fn") and not (inspect.isfunction(obj) or inspect.isclass(obj)):
        obj = obj.fn  # a @triton.jit kernel wraps the Python function it compiles
    source = inspect.getsource(obj)
    if start is not None or end is not None:
        lines = source.splitlines()
        i = next((n for n, line in enumerate(lines) if start is None or start in line), None)
        if i is None:
            raise ValueError(f"{start!r} does not occur in the source of {obj.__qualname__}")
        j = len(lines) - 1 if end is None else next((n for n in range(i, len(lines)) if end in lines[n]), None)
        if j is None:  # a listing silently running to the end would hide that the source changed
            raise ValueError(f"{end!r} does not occur in the source of {obj.__qualname__} after {start!r}")
        source = "\n".join(lines[i:j + 1]) + "\n"
    try:
        from IPython.display import Code
    except ImportError:
        return source
    return Code(source, language="python")


def agree(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> str:
    """A deterministic one-line verdict that ``got`` matches ``want`` (same on CPU and GPU).

    Prints no floats that vary by machine, so notebooks can tag the cell ``nbval-check-output``.
    """
    if got.shape != want.shape:
        return f"{name}: shape mismatch {tuple(got.shape)} vs {tuple(want.shape)}"
    ok = torch.allclose(got.double().cpu(), want.double().cpu(), rtol=rtol, atol=atol)
    return f"{name}: {'match' if ok else 'MISMATCH'} (rtol={rtol:g}, atol={atol:g}, shape {tuple(got.shape)})"


def slider_figure(steps: dict, *, title: str = "", slider_label: str = "", layout: dict | None = None):
    """A Plotly figure whose slider steps through precomputed traces, for pages without a kernel.

    ``steps`` maps each slider label to the list of Plotly traces drawn at that step (the same
    number of traces at every step). All traces are stored in the figure and the slider only
    toggles which are visible, so moving it needs no Python: it works on the rendered book.
    """
    import plotly.graph_objects as go

    if not steps:
        raise ValueError("slider_figure needs at least one step")
    sizes = {len(traces) for traces in steps.values()}
    if len(sizes) != 1:
        raise ValueError(f"every step must draw the same number of traces, got {sorted(sizes)}")
    per_step = sizes.pop()
    fig = go.Figure()
    for k, traces in enumerate(steps.values()):
        for trace in traces:
            trace.visible = k == 0
            fig.add_trace(trace)
    n = len(steps)
    slider_steps = [dict(method="update", label=str(label),
                         args=[{"visible": [j // per_step == k for j in range(n * per_step)]}])
                    for k, label in enumerate(steps)]
    fig.update_layout(title=title, sliders=[dict(active=0, currentvalue=dict(prefix=slider_label), steps=slider_steps)],
                      margin=dict(t=60, b=40), **(layout or {}))
    return fig


def static_html(fig, height: int = 460):
    """Display a Plotly figure as self-drawing HTML: plotly.js from the built book's _static folder
    (put there by book/_ext/plotly_static.py, so the page works offline), else from the CDN."""
    import json
    import uuid

    import plotly.offline
    from IPython.display import HTML

    div = f"plotly-{uuid.uuid4().hex[:12]}"
    spec = json.loads(fig.to_json())
    cdn = f"https://cdn.plot.ly/plotly-{plotly.offline.get_plotlyjs_version()}.min.js"
    script = f"""<div id="{div}" class="plotly-twin" style="height:{height}px"></div>
<script>(function() {{
  var spec = {json.dumps(spec)};
  function draw() {{ Plotly.newPlot("{div}", spec.data, spec.layout, {{responsive: true}}); }}
  if (window.Plotly) {{ draw(); return; }}
  var opts = document.querySelector('script[src*="_static/documentation_options.js"]');
  var urls = [opts ? opts.src.replace("documentation_options.js", "plotly.min.js") : null, "{cdn}"].filter(Boolean);
  function load(i) {{
    var s = document.createElement("script"), amd = window.define;
    window.define = undefined;  // load as a global even where require.js is on the page
    s.src = urls[i];
    s.onload = function() {{ window.define = amd; draw(); }};
    s.onerror = function() {{ window.define = amd; if (i + 1 < urls.length) load(i + 1); }};
    document.head.appendChild(s);
  }}
  load(0);
}})();</script>"""
    return HTML(script)
