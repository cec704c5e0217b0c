# dkuxnet — two entry points: `make book` and `make test` (the book's reproduce page).
#
#   make book        venv + install, vendor JS, execute notebooks/*.py with papermill into _build/stage,
#                    build the Jupyter Book (-W -n: any warning fails), copy the HTML to _build/html
#   make test        venv + install, pytest -q
#   make book-check  tests of the built HTML (+ headless Chromium screenshot when chromium is installed)
#   make screenshot  PNG of the visualisation page in _build/screenshots/ (needs chromium)
#   make serve       serve _build/html on http://127.0.0.1:8000
#   make mutants     mutation testing of the core modules on a seeded sample (not part of CI), see below
#
# Variables: PY (interpreter used to create the venv), VENV, PROFILE (papermill profile, default smoke),
# NB_TIMEOUT (seconds one notebook run may take before it is killed and the build fails, default 540).

SHELL       := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := book

PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAGE   := _build/stage
VENDOR  := _build/vendor
PROFILE ?= smoke
# Wall-clock limit of one notebook run, a safety net: papermill/nbclient can wait forever for a kernel
# message that never comes. That hang came from ipywidgets Output + clear_output(wait=True) cells
# (jupyter/nbclient#312, nteract/papermill#723), which the notebooks no longer use: their sliders and
# dropdowns are plotly controls (tests/test_notebooks.py reruns them 3 times under a 120 s limit). A run
# that still hangs is killed and the build fails, naming the notebook; nothing is retried. The slowest smoke
# notebook (05_ablation) takes about 2-3 min on 2 cores; 540 s stays below papermill's 600 s cell timeout.
NB_TIMEOUT ?= 540
NBS     := $(sort $(wildcard notebooks/*.py))

export MPLBACKEND ?= Agg
export PYDEVD_DISABLE_FILE_VALIDATION := 1
# OpenMP threads sleep instead of spinning while waiting: spinning made CPU steps up to 8x slower
# whenever another process competed for the 2 cores.
export OMP_WAIT_POLICY ?= PASSIVE

WIDGETS_MANAGER := @jupyter-widgets/html-manager@1.0.15
REQUIREJS       := requirejs@2.3.8
MATHJAX         := mathjax@3.2.2

.PHONY: book test setup vendor execute html book-check screenshot serve clean mutants

book: html
	rm -rf _build/html
	cp -r $(STAGE)/_build/html _build/html
	@echo "book: open _build/html/index.html"

test: setup
	$(BIN)/python -m pytest -q

$(VENV)/pyvenv.cfg:
	$(PY) -m venv $(VENV)

# The stamp records that the venv matches requirements.txt and pyproject.toml.
_build/setup.stamp: $(VENV)/pyvenv.cfg requirements.txt pyproject.toml
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	mkdir -p _build && touch $@

setup: _build/setup.stamp

# JS served from the book itself: plotly.js from the installed plotly package, require.js, the
# ipywidgets HTML manager and MathJax from npm. The site then needs no CDN for figures, widgets or
# equations. MathJax finds its fonts and the TeX extensions it autoloads (\boldsymbol, \color, ...)
# relative to tex-chtml.js, so the es5/ layout is kept (2 MB of the package's 24 MB).
# The Makefile is a prerequisite because the pins above live in it.
$(VENDOR)/.stamp: _build/setup.stamp Makefile
	rm -rf $(VENDOR) _build/npm && mkdir -p _build/npm $(VENDOR)/widgets $(VENDOR)/mathjax
	cd _build/npm && npm pack --silent $(WIDGETS_MANAGER) $(REQUIREJS) $(MATHJAX) >/dev/null
	tar -xzf _build/npm/requirejs-2.3.8.tgz -C $(VENDOR) --strip-components=1 package/require.js
	tar -xzf _build/npm/jupyter-widgets-html-manager-1.0.15.tgz -C _build/npm
	cd _build/npm/package/dist && cp embed-amd.js *.woff *.woff2 *.ttf *.eot *.svg $(CURDIR)/$(VENDOR)/widgets/
	tar -xzf _build/npm/mathjax-3.2.2.tgz -C $(VENDOR)/mathjax --strip-components=2 \
	  package/es5/tex-chtml.js package/es5/output/chtml/fonts/woff-v2 package/es5/input/tex/extensions
	cp "$$($(BIN)/python -c 'import os, plotly; print(os.path.join(os.path.dirname(plotly.__file__), "package_data", "plotly.min.js"))')" $(VENDOR)/
	touch $@

vendor: $(VENDOR)/.stamp

# notebooks/X.py (jupytext percent, the source) -> _build/stage/notebooks/X.ipynb -> papermill runs it
# in place, with the kernel's working directory _build/stage/notebooks. Relative paths a notebook
# writes (../_build/phantom, ../_build/runs/...) therefore land in the throw-away stage, never in the repo.
# Notebooks run in name order (01_ … 07_), so later ones may reuse what earlier ones wrote.
# Each kernel first runs dkuxnet/plotting_setup.py (PYTHONSTARTUP): figures become plain plotly divs that
# use the page's _static/plotly.min.js, without the CDN scripts of plotly's own HTML renderers.
execute: setup vendor
	rm -rf $(STAGE) && mkdir -p $(STAGE)/notebooks
	cp -r _config.yml _toc.yml book $(STAGE)/
	$(BIN)/python -m dkuxnet perf-report --results results/perf --out $(STAGE)/book/_perf_tables.inc
	cp -r $(VENDOR) $(STAGE)/_vendor && rm -f $(STAGE)/_vendor/.stamp
	@if [ -z "$(NBS)" ]; then echo "execute: no notebooks/*.py found" >&2; exit 1; fi
	@for py in $(NBS); do \
	  nb=$(STAGE)/$${py%.py}.ipynb; t0=$$SECONDS; \
	  echo "execute: $$py (profile $(PROFILE))"; \
	  $(BIN)/jupytext --quiet --to ipynb -o $$nb $$py || exit 1; \
	  rc=0; PYTHONSTARTUP=$(CURDIR)/dkuxnet/plotting_setup.py timeout $(NB_TIMEOUT) $(BIN)/papermill --no-progress-bar --log-level WARNING --execution-timeout 600 \
	    --cwd $(STAGE)/notebooks -k python3 $$nb $$nb -p profile $(PROFILE) || rc=$$?; \
	  [ $$rc -ne 124 ] || { echo "execute: $$py hung past $(NB_TIMEOUT) s" >&2; exit 1; }; \
	  [ $$rc -eq 0 ] || { echo "execute: $$py FAILED" >&2; exit 1; }; \
	  echo "execute: $$py done in $$((SECONDS - t0)) s"; \
	done
	$(BIN)/python tools/hide_injected_parameters.py $(STAGE)/notebooks/*.ipynb

html: execute
	$(BIN)/jupyter-book build $(STAGE) --keep-going -W -n

book-check: setup
	$(BIN)/python -m pytest -q tests/test_book.py

screenshot:
	tools/screenshot.sh _build/html notebooks/06_visualize.html _build/screenshots/06_visualize.png

serve:
	$(BIN)/python -m http.server --bind 127.0.0.1 -d _build/html 8000

# Mutation testing (mutmut, pinned in the dev extra; never run by CI). tools/mutants.py generates every mutant of
# the modules in [tool.mutmut] only_mutate (pyproject.toml), draws MUTANTS_PER_MODULE of each module uniformly
# without replacement (random.Random("<MUTANTS_SEED>:<module>") over the sorted names: the same sources and seed
# give the same sample), runs each against the listed tests that execute the mutated function, and writes the
# score per module and every survivor's diff to mutants/report.md. About 10-15 min on 2 cores with the defaults.
MUTANTS_PER_MODULE ?= 10
MUTANTS_SEED ?= 0
mutants: setup
	$(BIN)/python -c "import mutmut" 2>/dev/null || $(BIN)/python -m pip install -q "$$(grep -o 'mutmut==[0-9.]*' pyproject.toml)"
	rm -rf mutants
	DKUXNET_LA_ROOT="$(abspath ../shared/data/LA)" OMP_NUM_THREADS=1 \
	  $(BIN)/python tools/mutants.py --per-module $(MUTANTS_PER_MODULE) --seed $(MUTANTS_SEED)

clean:
	rm -rf _build
