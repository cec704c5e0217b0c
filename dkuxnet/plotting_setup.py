"""Plotly renderer of the static book: each figure is its div and its ``Plotly.newPlot`` call, nothing more.

Every HTML renderer plotly ships adds a MathJax ``<script>`` from cdnjs to each figure, and the
``*_connected`` ones also load plotly.js from cdn.plot.ly: offline these fail, and online the second
MathJax competes with the page's own. The book already loads ``_static/plotly.min.js`` on every page
(``html_js_files`` in ``_config.yml``) and its own MathJax where a page has math, so the figures need
neither.

``make book`` runs this file at the start of every notebook kernel (``PYTHONSTARTUP``, which IPython
honours), so the notebooks stay unchanged and keep plotly's default renderer in JupyterLab, Binder and
Colab. It cannot be chosen with ``PLOTLY_RENDERER``: plotly checks that variable against its built-in
renderers when ``plotly.io`` is first imported, before this one is registered.
"""

from __future__ import annotations

from typing import Any

import plotly.io as pio
from plotly.io.base_renderers import MimetypeRenderer

RENDERER = "dkuxnet_book"


class BookRenderer(MimetypeRenderer):
    """``text/html`` output that relies on the page for plotly.js and loads no MathJax."""

    def to_mimebundle(self, fig_dict: dict[str, Any]) -> dict[str, str]:
        html = pio.to_html(
            fig_dict,
            include_plotlyjs=False,
            include_mathjax=False,
            full_html=False,
            default_width="100%",
            default_height=525,
            validate=False,
        )
        return {"text/html": html}


def use_book_renderer() -> None:
    """Register :class:`BookRenderer` and make it the default for ``fig.show()``."""
    pio.renderers[RENDERER] = BookRenderer()
    pio.renderers.default = RENDERER


if __name__ == "__main__":
    use_book_renderer()
