"""Sphinx extension: copy plotly.js from the installed `plotly` package into the built book's
_static folder, so the chapters' Plotly twins (minigpt.display.static_html) draw offline."""

import shutil
from pathlib import Path


def _copy_plotly(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    import plotly

    src = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    dest = Path(app.outdir) / "_static"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest / "plotly.min.js")


def setup(app):
    app.connect("build-finished", _copy_plotly)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
