#!/usr/bin/env bash
# Prepare what a GPU lease carries (tools/device/README.md): the LA data in parts of <= 56 MiB and
# medpy's pure-Python source (the device image has no medpy; only medpy.metric is used, numpy + scipy).
# Usage: tools/device/prepare.sh [LA_DIR]   (default ../shared/data/LA; run `make test` once first for .venv)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
../shared/tools/split-for-device "${1:-../shared/data/LA}" .carry/la
rm -rf .carry/pysrc && mkdir -p .carry/pysrc
cp -r "$(.venv/bin/python -c 'import medpy, os; print(os.path.dirname(medpy.__file__))')" .carry/pysrc/
find .carry/pysrc -name __pycache__ -prune -exec rm -rf {} +
du -sh .carry/la/* .carry/pysrc
echo "commit to pass as DKUXNET_COMMIT: $(git rev-parse HEAD)"
