#!/usr/bin/env bash
# Headless-Chromium screenshot of a run's report.html, to look at the report as a reader would.
#
#   scripts/screenshot_report.sh DIR [OUT.png]
#
# DIR is a report directory (it holds report.html: that page is shot as it is) or a run
# directory holding results.json but no report yet (rendered first with `masa report DIR`). OUT.png defaults to shot.png beside report.html. The window is 1200 pixels wide
# and SHOT_HEIGHT (default 3000) tall; MASA names the masa binary (default: target/release/masa
# of this checkout, else masa on PATH). Needs Chromium (Debian: apt-get install chromium).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 RUN_OR_REPORT_DIR [OUT.png]" >&2; exit 2; }
dir=${1%/}
root="$(cd "$(dirname "$0")/.." && pwd)"

if [ -f "$dir/report.html" ]; then
    html="$dir/report.html"
elif [ -f "$dir/results.json" ]; then
    masa=${MASA:-}
    if [ -z "$masa" ]; then
        source "$root/scripts/masa_bin.sh"
        if [ -x "$MASA_BIN" ]; then masa="$MASA_BIN"; else masa=masa; fi
    fi
    "$masa" report "$dir"
    html="$dir/report.html"
else
    echo "error: $dir has neither report.html nor results.json" >&2
    exit 1
fi

browser=""
for b in chromium chromium-browser google-chrome; do
    if command -v "$b" >/dev/null; then browser=$b; break; fi
done
[ -n "$browser" ] || { echo "error: no Chromium found (Debian: apt-get install chromium)" >&2; exit 1; }

out=${2:-"$(dirname "$html")/shot.png"}
html_abs="$(cd "$(dirname "$html")" && pwd)/$(basename "$html")"
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
    --screenshot="$out" --window-size="1200,${SHOT_HEIGHT:-3000}" "file://$html_abs" 2>/dev/null
echo "screenshot: $out"
