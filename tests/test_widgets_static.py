"""The chapters' static widget twins move on a page without a kernel, in a headless browser.

Each chapter's main widget has a Plotly twin (cell tagged `static-twin`, drawn by
`minigpt.display.static_html`) whose slider steps are precomputed. The test puts the twin's
committed HTML output on a page, or loads the chapter's built page when `_build/html` exists,
opens it in headless Chromium, presses the slider's rail near its right end with DOM mouse events,
and reads back which traces are visible: moving the slider must change them.

Headless Chromium with --dump-dom renders no frames, so requestAnimationFrame (which Plotly's
slider uses to run its step) is mapped onto setTimeout in the test page. It is skipped, with the
reason, where no Chromium is installed (`apt-get install chromium`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = [p for p in sorted((ROOT / "notebooks").glob("*.ipynb"))
            if any("static-twin" in c.metadata.get("tags", []) for c in nbformat.read(p, as_version=4).cells)]
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)

SHIM = """<script>window.requestAnimationFrame = function(cb) {
  return setTimeout(function() { cb(performance.now()); }, 16); };</script>"""
PROBE = """<script>
window.addEventListener("load", function() { setTimeout(function() {
  var out = document.createElement("pre");
  out.id = "probe";
  var gd = document.querySelector(".plotly-twin");
  if (!gd || !gd.data) { out.textContent = "PROBE " + JSON.stringify({error: "no drawn twin"}); document.body.appendChild(out); return; }
  var before = gd.data.map(function(t) { return t.visible === true; });
  var rail = gd.querySelector(".slider-rail-touch-rect");
  var r = rail.getBoundingClientRect();
  var at = {bubbles: true, clientX: r.right - 2, clientY: r.top + r.height / 2, view: window};
  rail.dispatchEvent(new MouseEvent("mousedown", at));
  gd.dispatchEvent(new MouseEvent("mouseup", at));
  setTimeout(function() {
    var after = gd.data.map(function(t) { return t.visible === true; });
    out.textContent = "PROBE " + JSON.stringify({before: before, after: after, active: gd.layout.sliders[0].active,
                                                 steps: gd.layout.sliders[0].steps.length});
    document.body.appendChild(out);
  }, 1500);
}, 2500); });
</script>"""


def _plotly_js() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


def _page(notebook: Path, tmp_path: Path) -> Path:
    """The chapter's built page if the book was built, else a page holding the twin's committed output."""
    built = ROOT / "_build" / "html" / "notebooks" / f"{notebook.stem}.html"
    if built.exists():
        html = built.read_text()
        html = html.replace("<head>", f'<head><base href="{built.parent.as_uri()}/">{SHIM}', 1)
    else:
        nb = nbformat.read(notebook, as_version=4)
        cell = next(c for c in nb.cells if "static-twin" in c.metadata.get("tags", []))
        outputs = [o for o in cell.get("outputs", []) if "text/html" in o.get("data", {})]
        assert outputs, f"{notebook.name}: the static-twin cell has no HTML output; execute the notebook"
        html = (f'<html><head>{SHIM}<script src="{_plotly_js().as_uri()}"></script></head>'
                f'<body>{outputs[0]["data"]["text/html"]}</body></html>')
    page = tmp_path / f"{notebook.stem}.html"
    page.write_text(html.replace("</body>", PROBE + "</body>", 1))
    return page


def _probe(page: Path) -> dict:
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
           "--virtual-time-budget=15000", "--dump-dom", page.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    found = re.search(r"PROBE (\{.*?\})</pre>", dom)
    assert found, f"the page did not report back (is plotly.js reachable?): {dom[-300:]!r}"
    return json.loads(found.group(1).replace("&quot;", '"'))


def test_every_chapter_with_a_widget_has_a_static_twin():
    widgets = [p for p in sorted((ROOT / "notebooks").glob("0[1-6]_*.ipynb"))
               if any("ipywidgets" in c.source or "widgets.interact" in c.source for c in nbformat.read(p, as_version=4).cells)]
    assert widgets and set(widgets) <= set(CHAPTERS), f"no static twin in {sorted(set(widgets) - set(CHAPTERS))}"


@pytest.mark.skipif(BROWSER is None, reason="no headless Chromium here: apt-get install chromium")
@pytest.mark.parametrize("notebook", CHAPTERS, ids=lambda p: p.stem)
def test_static_twin_slider_moves_in_a_browser(notebook, tmp_path):
    result = _probe(_page(notebook, tmp_path))
    assert "error" not in result, result
    assert result["active"] == result["steps"] - 1, f"the slider did not move to its last step: {result}"
    assert result["before"] != result["after"], "moving the slider changed no trace"
    per_step = len(result["after"]) // result["steps"]
    assert result["after"][-per_step:] == [True] * per_step, "the last step's traces are not the visible ones"


def test_slider_figure_shows_one_step_at_a_time():
    import plotly.graph_objects as go

    from minigpt.display import slider_figure, static_html

    steps = {f"{k}": [go.Scatter(y=[k, k]), go.Scatter(y=[0, k])] for k in range(3)}
    fig = slider_figure(steps, title="t", slider_label="k = ")
    assert [t.visible for t in fig.data] == [True, True, False, False, False, False]
    masks = [s.args[0]["visible"] for s in fig.layout.sliders[0].steps]
    assert masks[2] == [False, False, False, False, True, True]
    html = static_html(fig).data
    assert "Plotly.newPlot" in html and "_static/documentation_options.js" in html
    with pytest.raises(ValueError, match="same number of traces"):
        slider_figure({"a": [go.Scatter(y=[1])], "b": []})
    with pytest.raises(ValueError, match="at least one step"):
        slider_figure({})


def test_show_source_cuts_between_markers_and_names_a_missing_one():
    """A chapter's listing is cut from the line holding ``start`` to the one holding ``end``; a marker the
    source no longer has is an error, not a listing that quietly runs to the end of the function."""
    from minigpt.display import show_source
    from minigpt.norm import rms_norm_reference

    cut = str(getattr(show_source(rms_norm_reference, start="def rms_norm_reference", end="return"), "data", ""))
    assert cut.startswith("def rms_norm_reference") and cut.rstrip().splitlines()[-1].lstrip().startswith("return")
    with pytest.raises(ValueError, match="'no such line' does not occur"):
        show_source(rms_norm_reference, start="def rms_norm_reference", end="no such line")
    with pytest.raises(ValueError, match="does not occur"):
        show_source(rms_norm_reference, start="no such line")
