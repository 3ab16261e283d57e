#!/usr/bin/env bash
# Real-time replay of the Prophesee recordings in ../shared/data/real to the DVS configuration,
# one session at a time: no filter, a rate cap at the measured capacity (max_rate 300000), overload
# drop (max_lag_ms 100) and both. Writes one `evssm stream --json` report per run, and the load
# average before and after, to OUT (default /tmp/replay). docs/benchmarks.md has the figures.
#   bash scripts/bench_live_replay.sh [OUT]
set -u
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/replay}
DATA=../shared/data/real
[ -d "$DATA" ] || { echo "no $DATA: the recordings are not here" >&2; exit 2; }
rm -rf "$OUT" && mkdir -p "$OUT"
PORT=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
.venv/bin/python -m evssm.cli serve --model dvs=config:dvs --batch-buckets 1,8,64 --length-buckets 256 \
    --port "$PORT" --log-level warning > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
for _ in $(seq 1 180); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 1; done
uptime > "$OUT/load-start"
for f in prophesee-gen3-evt2.raw prophesee-gen41-evt3.raw; do
  for variant in none cap drop capdrop; do
    case $variant in
      none) extra=();;
      cap) extra=(--filters max_rate=300000);;
      drop) extra=(--realtime --overload drop --max-lag-ms 100);;
      capdrop) extra=(--filters max_rate=300000 --realtime --overload drop --max-lag-ms 100);;
    esac
    timeout 120 .venv/bin/python -m evssm.cli stream "$DATA/$f" --url "ws://127.0.0.1:$PORT" \
        --model dvs --packet-ms 1 --json "${extra[@]}" > "$OUT/$f-$variant.json" 2> "$OUT/$f-$variant.err"
    echo "$f $variant: exit $?"
  done
done
uptime > "$OUT/load-end"
