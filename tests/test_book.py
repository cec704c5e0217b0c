"""The book: configuration, table of contents, prose that names real code, and the built HTML.

The source checks always run. The checks of the built site need ``make book`` first (they skip with
a reason when ``_build/html/index.html`` does not exist); the screenshot check also needs a
``chromium`` binary (``apt-get install chromium``) and skips without one. ``.ci/run`` installs
chromium and runs the suite after ``make book``, so in CI all of them run.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import matplotlib.image
import numpy as np
import pytest
import yaml

from dkuxnet.config import Config

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
BOOK_PAGES = sorted((ROOT / "book").glob("*.md"))
PLOTLY_PAGES = ("notebooks/01_data.html", "notebooks/06_visualize.html")
WIDGET_PAGE = "notebooks/01_data.html"
SCREENSHOT_PAGE = "notebooks/06_visualize.html"
SCREENSHOT_WINDOW = "1280,5000"  # tall enough for the page's first two 3D figures (the real scans, then this build's)


def _yaml(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))


def _toc_files(node: Any) -> list[str]:
    files: list[str] = []
    if isinstance(node, dict):
        for key in ("root", "file"):
            if key in node:
                files.append(node[key])
        for key in ("parts", "chapters", "sections"):
            for child in node.get(key, []):
                files.extend(_toc_files(child))
    return files


TOC = _toc_files(_yaml("_toc.yml"))


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


# --- sources -------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", TOC)
def test_toc_entry_exists(entry: str) -> None:
    md = (ROOT / entry).with_suffix(".md")
    py, ipynb = (ROOT / entry).with_suffix(".py"), (ROOT / entry).with_suffix(".ipynb")
    assert md.exists() or (py.exists() and ipynb.exists()), (
        f"_toc.yml entry {entry!r} has neither {entry}.md nor the pair {entry}.py + {entry}.ipynb"
    )


def test_every_page_is_in_the_toc() -> None:
    pages = {f"book/{p.stem}" for p in BOOK_PAGES} | {f"notebooks/{p.stem}" for p in (ROOT / "notebooks").glob("*.py")}
    assert not pages - set(TOC), f"pages missing from _toc.yml (the build ignores them): {sorted(pages - set(TOC))}"


READING_ORDER = [
    "book/intro", "book/method", "book/decisions", "book/data", "notebooks/01_data", "notebooks/02_model",
    "notebooks/03_train", "notebooks/04_evaluate", "notebooks/05_ablation", "notebooks/06_visualize",
    "notebooks/07_results", "book/reproduce", "book/full_reproduction", "book/faq", "book/references", "book/performance",
]


def test_one_reading_order() -> None:
    """_toc.yml (the Next buttons), every notebook's "What's next" and its "Prerequisites" follow one order."""
    assert TOC == READING_ORDER, f"_toc.yml is not in the reading order: {TOC}"
    last = _yaml("_toc.yml")["parts"][-1]
    assert last["caption"] == "Appendix" and [c["file"] for c in last["chapters"]] == ["book/performance"]
    for i, entry in enumerate(TOC):
        py = (ROOT / entry).with_suffix(".py")
        if not py.exists():
            continue
        text = _markdown(py)
        prereq = text.split("## Prerequisites", 1)[1].split("\n# ##", 1)[0]
        later = [t for t in _LINK.findall(prereq) if _doc_name(py, t) in TOC[i:]]
        assert not later, f"{entry}: prerequisites name this page or later ones: {later}"
        nxt, following = text.split("## What's next", 1)[1], TOC[i + 1]
        named = [_doc_name(py, t) for t in _LINK.findall(nxt)]
        assert named[:1] == [following] or (not named and following.split("/")[-1] in nxt.lower()), (
            f"{entry}: 'What's next' should name {following}, names {named or nxt.strip()[:80]}"
        )


def test_config_is_the_offline_recipe() -> None:
    cfg = _yaml("_config.yml")
    assert cfg["execute"]["execute_notebooks"] == "off"  # a string, not YAML's boolean false
    sphinx = cfg["sphinx"]["config"]
    assert sphinx["html_static_path"] == ["_vendor", "book/css"]
    assert sphinx["html_js_files"] == ["plotly.min.js"]
    assert set(sphinx["nb_ipywidgets_js"]) == {"require.js", "widgets/embed-amd.js"}
    assert sphinx["mathjax_path"] == "mathjax/tex-chtml.js"  # relative: served from _static
    assert "sphinx_thebe" not in sphinx["extensions"], "sphinx_thebe writes a thebe address on unpkg.com into every page"
    assert "://" not in json.dumps(sphinx), "the Sphinx configuration names a remote address (a CDN?)"
    assert cfg["launch_buttons"]["binderhub_url"] and cfg["launch_buttons"]["colab_url"]
    assert not (ROOT / "_static").exists(), "a top-level _static/ makes JB1 inject every .js in it"
    for bib in cfg.get("bibtex_bibfiles", []):
        assert (ROOT / bib).exists(), f"bibtex file {bib} is missing"


def test_makefile_vendors_mathjax_and_runs_the_book_renderer() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^MATHJAX\s*:=\s*mathjax@\d+\.\d+\.\d+\s*$", makefile, flags=re.MULTILINE), "MathJax is not pinned"
    assert "PYTHONSTARTUP=$(CURDIR)/dkuxnet/plotting_setup.py" in makefile, "papermill kernels do not get the book renderer"


def test_book_renderer_adds_no_scripts() -> None:
    """plotly's own HTML renderers put a cdnjs MathJax (and a cdn.plot.ly plotly.js) into every figure."""
    import plotly.graph_objects as go
    import plotly.io as pio

    from dkuxnet.plotting_setup import RENDERER, BookRenderer, use_book_renderer

    html = BookRenderer().to_mimebundle(go.Figure(go.Scatter(y=[1, 3, 2])).to_dict())["text/html"]
    assert "Plotly.newPlot" in html and "plotly-graph-div" in html
    assert not re.search(r"<script[^>]*\ssrc=", html), html[:500]
    assert "MathJax" not in html
    default = pio.renderers.default
    try:
        use_book_renderer()
        assert pio.renderers.default == RENDERER
    finally:
        pio.renderers.default = default


def test_addresses_are_consistent() -> None:
    cfg = _yaml("_config.yml")
    repo_url = cfg["repository"]["url"].rstrip("/")
    org_repo = repo_url.removeprefix("https://github.com/")
    site = cfg["html"]["baseurl"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    workflow = (ROOT / ".github" / "workflows" / "book.yml").read_text(encoding="utf-8")
    assert repo_url in readme and site in readme
    assert f"mybinder.org/v2/gh/{org_repo}/" in readme
    assert f"colab.research.google.com/github/{org_repo}/" in readme
    assert site in workflow and "_build/html" in workflow


def test_binder_pins_match_requirements() -> None:
    ours = _pins(ROOT / "requirements.txt")
    binder = _pins(ROOT / "binder" / "requirements.txt")
    book_only = {"jupyter-book", "pytest"}
    assert binder == {k: v for k, v in ours.items() if k not in book_only}


def _resolve(dotted: str) -> Any:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


CODE_NAMES = sorted({m for p in BOOK_PAGES for m in re.findall(r"`(dkuxnet(?:\.\w+)+)`", p.read_text(encoding="utf-8"))})


@pytest.mark.parametrize("name", CODE_NAMES)
def test_prose_names_real_code(name: str) -> None:
    try:
        _resolve(name)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"book/*.md names `{name}`, which does not exist: {exc}")


def test_prose_names_real_config_fields() -> None:
    fields = {f"{section}.{name}" for section, sub in Config().to_dict().items() if isinstance(sub, dict) for name in sub}
    pattern = r"`((?:model|loss|data|train)\.\w+)`"
    named = {m for p in BOOK_PAGES for m in re.findall(pattern, p.read_text(encoding="utf-8"))} - {"train.list"}
    assert named, "expected config fields named on the prose pages (decisions.md)"
    assert not named - fields, f"book/*.md names config fields that do not exist: {sorted(named - fields)}"


# --- references a reader can open ----------------------------------------------------------------

# Design documents that were never part of the repository. The names are assembled from parts so that
# this file does not match itself. The book's own method page (book/method.md) is fine; what is not is
# a section number after it, or after any other .md name, since no page of the book has numbered sections.
_DESIGN_DOCS = [f"{stem}.{'md'}" for stem in ("protocol", "engineering", "tooling")]
_DEAD_POINTER = re.compile(
    "|".join(re.escape(name) for name in _DESIGN_DOCS)
    + "|" + re.escape("method" + ".md") + r"`*\s*\d+(?:\.\d+)*\b"
    + r"|\.md`*[\s,]*" + "\u00a7"
)


def _repository_files() -> list[Path]:
    """Tracked files plus untracked ones git does not ignore (so a new file is checked before its commit)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    proc = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"not a git checkout: {proc.stderr.decode(errors='replace').strip()}")
    names = sorted({n for n in proc.stdout.decode().split("\0") if n})
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def test_no_pointers_to_unpublished_design_documents() -> None:
    """Every pointer in the repository names something a reader can open: a book page, a paper, a repository."""
    hits = []
    for path in _repository_files():
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        for lineno, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
            if m := _DEAD_POINTER.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{lineno}: {m.group(0)!r}")
    assert not hits, (
        "pointers to design documents that are not in the repository; cite the book page "
        "(book/*.md, notebooks/*), the paper or the public repository instead:\n" + "\n".join(hits)
    )


_SOURCE_PAGES = BOOK_PAGES + sorted((ROOT / "notebooks").glob("*.py"))
_ROLE = re.compile(r"\{(doc|ref)\}`([^`]+)`")
_LABEL = re.compile(r"^[ \t]*(?:#[ \t]*)?\(([^()\s]+)\)=[ \t]*$", re.MULTILINE)
_LINK = re.compile(r"\]\(([^()\s]+)\)")
_CITE = re.compile(r"\{cite(?::\w+)?\}`([^`]+)`")


def _markdown(page: Path) -> str:
    """The prose of a page: all of a book page; the comment lines (markdown cells) of a jupytext notebook."""
    text = page.read_text(encoding="utf-8")
    if page.suffix == ".py":
        text = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    return text


def _doc_name(page: Path, target: str) -> str:
    """``{doc}`` target or relative link of ``page`` as a _toc.yml entry (``book/data``, ``notebooks/01_data``)."""
    base = ROOT if target.startswith("/") else page.parent
    path = Path(os.path.normpath(base / target.lstrip("/")))
    if path.suffix in (".md", ".ipynb", ".py"):
        path = path.with_suffix("")
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def test_myst_cross_references_resolve() -> None:
    """``{doc}``, ``{ref}``, relative links and ``{cite}`` keys of the book's sources all point somewhere.

    The built book would catch these too (Sphinx -W -n), but only after a full ``make book``.
    """
    labels = {m for page in _SOURCE_PAGES for m in _LABEL.findall(page.read_text(encoding="utf-8"))}
    bib = (ROOT / "book" / "references.bib").read_text(encoding="utf-8")
    keys = set(re.findall(r"^@\w+\{([^,\s]+),", bib, flags=re.MULTILINE))
    toc = set(TOC)
    broken = []
    for page in _SOURCE_PAGES:
        text = _markdown(page)
        where = page.relative_to(ROOT)
        for role, content in _ROLE.findall(text):
            target = m.group(1) if (m := re.search(r"<([^<>]+)>\s*$", content)) else content.strip()
            if role == "doc" and _doc_name(page, target) not in toc:
                broken.append(f"{where}: {{doc}}`{content}` is not a page of _toc.yml")
            if role == "ref" and target not in labels:
                broken.append(f"{where}: {{ref}}`{content}`: no label ({target})= in book/*.md or notebooks/*.py")
        for target in _LINK.findall(text):
            target = target.split("#")[0]
            if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # anchor on the same page, or a URL
            name = _doc_name(page, target)
            if name not in toc and not (ROOT / name).exists():
                broken.append(f"{where}: link ({target}) is neither a page of _toc.yml nor a file")
        for content in _CITE.findall(text):
            broken += [f"{where}: cite key {k.strip()!r} is not in book/references.bib"
                       for k in content.split(",") if k.strip() not in keys]
    assert labels, "expected (label)= targets in book/*.md"
    assert not broken, "\n".join(broken)


def test_bibliography_links_every_compared_method() -> None:
    """Every entry of references.bib links its work; every method of the paper's tables is listed and cited."""
    bib = (ROOT / "book" / "references.bib").read_text(encoding="utf-8")
    entries = re.findall(r"^@\w+\{([^,\s]+),(.*?)^\}", bib, flags=re.MULTILINE | re.DOTALL)
    assert entries
    unlinked = [key for key, body in entries if not re.search(r"^\s*(?:url|doi)\s*=", body, flags=re.MULTILINE)]
    assert not unlinked, f"references.bib entries without url or doi: {unlinked}"
    page = (ROOT / "book" / "references.md").read_text(encoding="utf-8")
    records = json.loads((ROOT / "dkuxnet" / "paper_results.json").read_text(encoding="utf-8"))["records"]
    methods = {r["method"] for r in records if r["table"] == "main"}
    assert {"V-Net", "CAML", "DKUXNet"} <= methods
    for method in sorted(methods):
        name = re.compile(re.escape(method) + r"(?![\w+])")
        assert name.search(bib), f"{method} (paper's comparison table) has no entry in book/references.bib"
        assert name.search(page), f"{method} (paper's comparison table) is not listed on book/references.md"
    for must in ("How to cite", "```bibtex", "{bibliography}"):
        assert must in page, f"book/references.md lacks {must!r}"
    assert (ROOT / "CITATION.cff").exists(), "CITATION.cff is missing at the repository root"


# --- the built site ------------------------------------------------------------------------------

built = pytest.mark.skipif(not (HTML / "index.html").exists(), reason="no built book: run `make book` first")


def _page(rel: str) -> str:
    path = HTML / rel
    assert path.exists(), f"{rel} was not built"
    return path.read_text(encoding="utf-8")


@built
@pytest.mark.parametrize("entry", TOC)
def test_built_page_exists(entry: str) -> None:
    assert (HTML / f"{entry}.html").exists()


@built
def test_vendored_js_is_served_by_the_book() -> None:
    assert (HTML / "_static" / "plotly.min.js").stat().st_size > 1_000_000
    assert (HTML / "_static" / "require.js").exists()
    assert (HTML / "_static" / "widgets" / "embed-amd.js").exists()
    assert (HTML / "_static" / "mathjax" / "tex-chtml.js").exists()
    assert list((HTML / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))


# Hosts of the CDNs the book used to load from (plotly's figure scripts, Sphinx's MathJax, myst-nb's widgets, thebe).
CDN_HOSTS = ("cdn.jsdelivr.net", "cdnjs.cloudflare.com", "unpkg.com", "cdn.plot.ly")
BUILD_PATHS = ("/work/", "/tmp/", "/home/", "/root/", str(ROOT))


class _Resources(HTMLParser):
    """What a browser fetches to render a page: script src, link href, img src."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "link": "href", "img": "src"}.get(tag)
        self.urls += [value for name, value in attrs if name == wanted and value]


def _built_pages() -> list[Path]:
    pages = sorted(HTML.rglob("*.html"))
    assert pages, f"no HTML pages under {HTML}"
    return pages


@built
def test_built_pages_load_nothing_from_other_hosts() -> None:
    """Offline, every script, stylesheet and image of a page comes with the book (external links are fine)."""
    own = urlsplit(_yaml("_config.yml")["html"]["baseurl"]).netloc
    hits = []
    for path in _built_pages():
        html = path.read_text(encoding="utf-8")
        parser = _Resources()
        parser.feed(html)
        rel = path.relative_to(HTML)
        hits += [f"{rel}: {url}" for url in parser.urls
                 if re.match(r"^(?:https?:)?//", url) and urlsplit(url, scheme="https").netloc != own]
        hits += [f"{rel}: mentions {host}" for host in CDN_HOSTS if host in html]
    assert not hits, "\n".join(hits)


@built
def test_built_pages_contain_no_build_paths() -> None:
    hits = [f"{path.relative_to(HTML)}: {needle}" for path in _built_pages()
            for needle in BUILD_PATHS if needle in path.read_text(encoding="utf-8")]
    assert not hits, "absolute paths of the build machine in the built pages:\n" + "\n".join(hits)


@built
def test_equations_are_typeset_by_the_books_mathjax() -> None:
    local = re.compile(r'<script[^>]*\ssrc="[./]*_static/mathjax/tex-chtml\.js')
    method = _page("book/method.html")
    assert local.search(method), "book/method.html does not load _static/mathjax/tex-chtml.js"
    assert method.count('<span class="math notranslate nohighlight">') > 10, "book/method.html has no inline math"
    math_pages = [p for p in _built_pages() if 'class="math notranslate nohighlight' in p.read_text(encoding="utf-8")]
    assert [p.relative_to(HTML).as_posix() for p in math_pages if not local.search(p.read_text(encoding="utf-8"))] == []


@built
@pytest.mark.parametrize("rel", PLOTLY_PAGES)
def test_plotly_figures_render_from_local_plotly(rel: str) -> None:
    html = _page(rel)
    assert "Plotly.newPlot" in html and "plotly-graph-div" in html, f"{rel} has no plotly figure"
    # Figures carry no plotly.js of their own (dkuxnet/plotting_setup.py): the page must load the book's copy.
    assert re.search(r'<script src="[./]*_static/plotly\.min\.js', html), f"{rel} does not load _static/plotly.min.js"


@built
def test_interactive_figures_need_no_kernel() -> None:
    """The slice browser and the case picker are plotly controls (slider, dropdown), not kernel widgets."""
    for rel, control in ((WIDGET_PAGE, '"sliders"'), ("notebooks/06_visualize.html", '"updatemenus"')):
        html = _page(rel)
        assert control in html, f"{rel}: no plotly {control} control"
        assert "application/vnd.jupyter.widget-view+json" not in html, f"{rel}: a kernel widget"
    # Widgets that remain (tqdm.auto's progress bars in 03 and 04) are drawn by the book's own widget manager.
    for path in _built_pages():
        html = path.read_text(encoding="utf-8")
        if "application/vnd.jupyter.widget-state+json" in html:
            for js in (r"require\.js", r"widgets/embed-amd\.js"):
                assert re.search(rf'src="[./]*_static/{js}', html), f"{path.relative_to(HTML)}: {js} not loaded from _static"


@built
@pytest.mark.parametrize("entry", [e for e in TOC if e.startswith("notebooks/")])
def test_notebook_pages_have_no_errors_and_launch_links(entry: str) -> None:
    html = _page(f"{entry}.html")
    assert "output traceback" not in html, f"{entry} shows an error output"
    assert f"{entry}.ipynb" in html and "mybinder.org" in html and "colab.research.google.com" in html


def _coloured_fraction(png: Path, window: int = 200) -> float:
    """Largest share of clearly coloured pixels (max - min channel > 0.15) in any window×window square."""
    img = matplotlib.image.imread(png)[..., :3].astype(np.float64)
    coloured = (img.max(axis=-1) - img.min(axis=-1)) > 0.15
    ii = np.pad(coloured.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = ii[window:, window:] - ii[:-window, window:] - ii[window:, :-window] + ii[:-window, :-window]
    return float(sums.max()) / window**2


def test_coloured_fraction_tells_a_figure_from_text(tmp_path: Path) -> None:
    white = np.ones((400, 400, 3))
    figure = white.copy()
    figure[100:350, 100:350] = (0.86, 0.08, 0.24)  # a 250-pixel crimson square
    matplotlib.image.imsave(tmp_path / "white.png", white)
    matplotlib.image.imsave(tmp_path / "figure.png", figure)
    assert _coloured_fraction(tmp_path / "white.png") == 0.0
    assert _coloured_fraction(tmp_path / "figure.png") == 1.0


@built
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (apt-get install chromium)")
def test_screenshot_shows_the_3d_figure(tmp_path: Path) -> None:
    png = tmp_path / "page.png"
    proc = subprocess.run(
        ["bash", str(ROOT / "tools" / "screenshot.sh"), str(HTML), SCREENSHOT_PAGE, str(png), SCREENSHOT_WINDOW],
        capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dom = png.with_suffix(".dom.html").read_text(encoding="utf-8", errors="replace")
    assert "main-svg" in dom, "plotly did not draw (no main-svg in the rendered DOM): is plotly.js loaded?"
    share = _coloured_fraction(png)
    assert share > 0.4, f"no coloured figure region in the screenshot (best 200x200 square: {share:.0%} coloured)"



@built
def test_performance_page_renders_the_committed_perf_files() -> None:
    html = _page("book/performance.html")
    rows = json.loads((ROOT / "results" / "perf" / "memprobe_cpu.json").read_text())["rows"]
    for row in rows:
        assert f"{row['saved_bytes_per_voxel'] / 1000:.1f} kB / voxel" in html
    benches = sorted((ROOT / "results" / "perf").glob("bench_*.json"))
    names = [json.loads(p.read_text())["device"] for p in benches] or ["No GPU benchmark of this package"]
    assert all(name in html for name in names)


def test_injected_parameters_cells_are_hidden(tmp_path) -> None:
    import nbformat

    sys.path.insert(0, str(ROOT / "tools"))
    from hide_injected_parameters import hide_injected

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("a = 1", metadata={"tags": ["injected-parameters"]}),
                nbformat.v4.new_code_cell("b = 2", metadata={"tags": ["parameters", "hide-input"]})]
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, path)
    assert hide_injected(path) == 1 and hide_injected(path) == 0  # idempotent
    tags = [c.metadata["tags"] for c in nbformat.read(path, as_version=4).cells]
    assert tags == [["injected-parameters", "hide-input"], ["parameters", "hide-input"]]
    assert "tools/hide_injected_parameters.py" in (ROOT / "Makefile").read_text()


def test_long_code_lines_wrap() -> None:
    config = (ROOT / "_config.yml").read_text()
    assert '"book/css"' in config and 'html_css_files: ["wrap.css"]' in config
    assert "white-space: pre-wrap" in (ROOT / "book" / "css" / "wrap.css").read_text()
    assert re.search(r"div\.cell_output table \{[^}]*overflow-x: auto", (ROOT / "book" / "css" / "wrap.css").read_text()), (
        "wide output tables must scroll, not be cut off")


@built
def test_pages_load_the_wrapping_stylesheet() -> None:
    assert re.search(r'href="[./]*_static/wrap\.css', _page("notebooks/07_results.html"))


def _paper_values() -> tuple[set[float], set[float]]:
    """(the paper's Dice values, every number of its records), from ``dkuxnet/paper_results.json``.

    A table or chart is taken to hold the paper's numbers when it holds one of its Dice values (all between 50 and
    100, with decimals: unlikely by chance, unlike its small distances)."""
    records = json.loads((ROOT / "dkuxnet" / "paper_results.json").read_text(encoding="utf-8"))["records"]
    metrics = {round(float(r["dice"]), 2) for r in records}
    every = {round(float(v), 2) for r in records for v in r.values() if isinstance(v, (int, float))}
    return metrics, every


_NUMBER = re.compile(r"(?<![\w.])-?\d+\.\d+(?![\w.])")  # decimals only: counts and years are not results


class _Tables(HTMLParser):
    """The text of each cell of each ``<table>`` of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[str]] = []
        self._depth, self._cell = 0, None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._depth += 1
            self.tables.append([])
        elif tag in ("td", "th") and self._depth:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._depth -= 1
        elif tag in ("td", "th") and self._cell is not None:
            self.tables[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _plotly_numbers(html: str) -> list[list[float]]:
    """The numbers of the traces of each plotly figure that speaks of Dice (plain lists and plotly's base64
    typed arrays)."""
    import base64

    decoder, figures = json.JSONDecoder(), []
    for match in re.finditer(r"Plotly\.newPlot\(\s*\"[^\"]+\",\s*", html):
        traces, end = decoder.raw_decode(html, match.end())
        layout, _ = decoder.raw_decode(html, html.index("{", end))
        if "Dice" not in json.dumps([traces, layout]):
            continue
        numbers: list[float] = []

        def walk(x: Any) -> None:
            if isinstance(x, dict) and "bdata" in x and "dtype" in x:
                numbers.extend(np.frombuffer(base64.b64decode(x["bdata"]), dtype=np.dtype(x["dtype"])).ravel().tolist())
            elif isinstance(x, dict):
                for v in x.values():
                    walk(v)
            elif isinstance(x, list):
                for v in x:
                    walk(v)
            elif isinstance(x, (int, float)) and not isinstance(x, bool):
                numbers.append(float(x))
            elif isinstance(x, str):
                numbers.extend(float(n) for n in _NUMBER.findall(x))

        walk(traces)
        figures.append(numbers)
    return figures


def _mixes(numbers: list[float], metrics: set[float], every: set[float]) -> list[float]:
    """The numbers that are not the paper's, if ``numbers`` also hold one of the paper's metric values."""
    decimals = [round(n, 2) for n in numbers if n != int(n)]
    if not any(n in metrics for n in decimals):
        return []
    return sorted({n for n in decimals if n not in every})


@built
def test_no_table_or_chart_holds_both_paper_and_our_numbers() -> None:
    """A result table or chart (one that speaks of Dice) holding one of the paper's metric values holds nothing but
    the paper's numbers."""
    metrics, every = _paper_values()
    hits, paper_tables = [], 0
    for path in _built_pages():
        html = path.read_text(encoding="utf-8")
        parser = _Tables()
        parser.feed(html)
        for i, cells in enumerate(parser.tables):
            if not any("Dice" in cell for cell in cells):
                continue
            numbers = [float(n) for cell in cells for n in _NUMBER.findall(cell)]
            paper_tables += any(round(n, 2) in metrics for n in numbers)
            if other := _mixes(numbers, metrics, every):
                hits.append(f"{path.relative_to(HTML)} table {i}: the paper's numbers beside {other[:5]}")
        for i, numbers in enumerate(_plotly_numbers(html)):
            if other := _mixes(numbers, metrics, every):
                hits.append(f"{path.relative_to(HTML)} figure {i}: the paper's numbers beside {other[:5]}")
    assert paper_tables >= 2, "the paper's tables (main, ablation) are not on any built page"
    assert not hits, "\n".join(hits)


def test_mixed_table_detector() -> None:
    """The detector above flags a table of paper and our numbers, and passes one of each alone."""
    metrics, every = _paper_values()
    assert _mixes([90.41, 82.69, 7.32], metrics, every) == []
    assert _mixes([69.12, 13.6], metrics, every) == []
    assert _mixes([90.41, 69.12], metrics, every) == [69.12]
    parser = _Tables()
    parser.feed("<table><tr><th>Dice</th></tr><tr><td>90.41</td></tr><tr><td>69.12 ± 13.6</td></tr></table>")
    assert parser.tables == [["Dice", "90.41", "69.12 ± 13.6"]]
    html = 'Plotly.newPlot( "x", [{"y": [90.41, 82.12], "text": ["90.41"]}], {"yaxis": {"title": "Dice (%)"}})'
    assert _plotly_numbers(html) == [[90.41, 82.12, 90.41]]
    assert _plotly_numbers(html.replace("Dice", "loss")) == []
