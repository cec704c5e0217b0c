#!/usr/bin/env bash
# Headless Chromium check of a page of the built book, offline.
#
#   tools/screenshot.sh HTML_DIR PAGE OUT.png [WIDTH,HEIGHT]
#
# Serves HTML_DIR on 127.0.0.1 (a free port), then writes
#   OUT.png        a screenshot of PAGE (default window 1280,3000)
#   OUT.dom.html   the page's DOM after its scripts ran (plotly and the widget manager add elements)
# Exit status: 0 ok, 1 no output written, 2 page missing, 3 no chromium. $CHROMIUM picks the browser,
# $PYTHON the interpreter that serves the files.
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,11p' "$0" >&2; exit 2; }
html_dir=$1 page=$2 png=$3 size=${4:-1280,3000}
browser=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}
[ -n "$browser" ] || { echo "screenshot: chromium not found (apt-get install chromium)" >&2; exit 3; }
[ -f "$html_dir/$page" ] || { echo "screenshot: $html_dir/$page not found (run make book)" >&2; exit 2; }
py=${PYTHON:-python3}
dom=${png%.png}.dom.html
mkdir -p "$(dirname "$png")"
rm -f "$png" "$dom"

port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$py" -m http.server --bind 127.0.0.1 -d "$html_dir" "$port" >/dev/null 2>&1 &
server=$!
profile=$(mktemp -d)
log=$(mktemp)
trap 'kill "$server" 2>/dev/null || true; rm -rf "$profile" "$log"' EXIT
for _ in $(seq 100); do
  "$py" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/', timeout=1)" 2>/dev/null && break
  sleep 0.1
done

url="http://127.0.0.1:$port/$page"
flags=(--headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update
       --no-first-run --disable-sync --hide-scrollbars --user-data-dir="$profile"
       --window-size="$size" --virtual-time-budget=15000)
timeout 120 "$browser" "${flags[@]}" --screenshot="$png" --dump-dom "$url" >"$dom" 2>"$log" || true
if [ ! -s "$png" ] || [ ! -s "$dom" ]; then
  echo "screenshot: chromium wrote no output for $url" >&2
  tail -n 20 "$log" >&2
  exit 1
fi
echo "screenshot: $png ($dom)"
