#!/usr/bin/env bash
# Start, stop or inspect this checkout's TorchServe, serving every archive in model_store/:
#   scripts/serve.sh [--inference-port N] [--management-port N] [--metrics-port N] start|stop|status [MODEL]
#   scripts/serve.sh register NAME.mar      # serve one more archive of model_store/, the others untouched
#   scripts/serve.sh unregister MODEL
# Ports also come from CAMSERVE_INFERENCE_PORT, CAMSERVE_MANAGEMENT_PORT, CAMSERVE_METRICS_PORT (default 8080-8082).
# The server is this checkout's own: its pid file, worker sockets and config live in .torchserve/, its logs in logs/,
# its keys in key_file.json; `stop` never touches a TorchServe that another checkout or user started.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
state="$PWD/.torchserve"
# TorchServe keeps its pid file (Python's tempfile: TMPDIR), its worker sockets and unpacked models (the frontend's
# java.io.tmpdir, which torchserve sets from TEMP) in the temp dir: both are this checkout's own.
export TMPDIR="$state/tmp" TEMP="$state/tmp"

inference=${CAMSERVE_INFERENCE_PORT:-8080}
management=${CAMSERVE_MANAGEMENT_PORT:-8081}
metrics=${CAMSERVE_METRICS_PORT:-8082}
[ -f "$state/ports" ] && [ "${1:-}" != start ] && [ "${2:-}" != start ] && . "$state/ports"  # a running server's
command=
while [ $# -gt 0 ]; do
  case "$1" in
    --inference-port) inference=$2; shift 2 ;;
    --management-port) management=$2; shift 2 ;;
    --metrics-port) metrics=$2; shift 2 ;;
    start|stop|status|register|unregister) command=$1; shift; break ;;
    *) echo "usage: scripts/serve.sh [--inference-port N] [--management-port N] [--metrics-port N] start|stop|status|register NAME.mar|unregister MODEL" >&2; exit 2 ;;
  esac
done
command=${command:-start}

require_java() {
  if ! command -v java >/dev/null 2>&1; then
    cat >&2 <<'MSG'
error: TorchServe needs Java 17, and no `java` is on PATH.
  Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless
  macOS:         brew install openjdk@17
  Or set JAVA_HOME to a JDK 17 and put $JAVA_HOME/bin on PATH.
MSG
    exit 1
  fi
  local major
  major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
  if [ "${major:-0}" -lt 17 ]; then
    echo "error: TorchServe needs Java 17 or newer; found Java ${major:-unknown}. Install openjdk-17-jre-headless." >&2
    exit 1
  fi
}

token() {  # token management|inference: read from key_file.json, which TorchServe writes where it starts
  .venv/bin/python -c "import json,sys; print(json.load(open('key_file.json'))[sys.argv[1]]['key'])" "$1"
}

wait_ready() {  # wait_ready MODEL: until its worker is READY
  local model=$1
  echo -n "Waiting for $model to load"
  for _ in $(seq 1 180); do
    if [ -f key_file.json ] && curl -sf -H "Authorization: Bearer $(token management)" \
      "http://127.0.0.1:$management/models/$model" 2>/dev/null | grep -q '"status": "READY"'; then
      echo " ready: http://127.0.0.1:$inference/predictions/$model"
      return 0
    fi
    echo -n "."
    sleep 1
  done
  echo; echo "error: $model did not become ready in 180 s; see logs/model_log.log and logs/ts_log.log" >&2
  return 1
}

case "$command" in
  start)
    require_java
    shopt -s nullglob
    archives=(model_store/*.mar)
    if [ ${#archives[@]} -eq 0 ]; then
      echo "error: model_store/ holds no .mar; build one: .venv/bin/python scripts/build_mar.py --weights imagenet|random|PATH" >&2
      exit 1
    fi
    mkdir -p "$TMPDIR" logs
    rotated=
    # This checkout's server only (its pid file is in $TMPDIR): a restart gives every model new keys.
    if torchserve --stop 2>/dev/null | grep -q "has stopped"; then rotated=1; fi
    # This checkout's config: the shipped one, on the chosen loopback ports (gRPC beside them).
    sed -e "s#^inference_address=.*#inference_address=http://127.0.0.1:$inference#" \
        -e "s#^management_address=.*#management_address=http://127.0.0.1:$management#" \
        -e "s#^metrics_address=.*#metrics_address=http://127.0.0.1:$metrics#" \
        -e "s#^grpc_inference_port=.*#grpc_inference_port=$((inference + 1000))#" \
        -e "s#^grpc_management_port=.*#grpc_management_port=$((management + 1000))#" \
        -e "s#^metrics_config=.*#metrics_config=$PWD/metrics.yaml#" \
        config.properties >"$state/config.properties"
    printf 'inference=%s\nmanagement=%s\nmetrics=%s\n' "$inference" "$management" "$metrics" >"$state/ports"
    rm -f key_file.json
    torchserve --start --ncs --model-store model_store --ts-config "$state/config.properties" \
      >logs/torchserve_start.log 2>&1 </dev/null
    for archive in "${archives[@]}"; do
      wait_ready "$(basename "$archive" .mar)" || exit 1
    done
    if [ -n "$rotated" ]; then
      echo "This restart wrote NEW keys to key_file.json: re-read them (TOKEN=...) before your next request."
    else
      echo "Tokens are in key_file.json."
    fi
    echo "Add an archive without a restart: copy it into model_store/, then bash scripts/serve.sh register NAME.mar"
    ;;
  stop)
    torchserve --stop
    rm -f "$state/ports"
    ;;
  status)  # each model (or MODEL) with its workers' states: READY when it answers
    [ -f key_file.json ] || { echo "not running: no key_file.json (bash scripts/serve.sh start)" >&2; exit 1; }
    if ! models=$(curl -sf -H "Authorization: Bearer $(token management)" "http://127.0.0.1:$management/models"); then
      echo "not running: nothing answers on http://127.0.0.1:$management (bash scripts/serve.sh start)" >&2
      exit 1
    fi
    names=${1:-$(echo "$models" | .venv/bin/python -c "import json,sys; print(' '.join(m['modelName'] for m in json.load(sys.stdin)['models']))")}
    for name in $names; do
      curl -sf -H "Authorization: Bearer $(token management)" "http://127.0.0.1:$management/models/$name" \
        | .venv/bin/python -c "
import json, sys
(model,) = json.load(sys.stdin)[:1]
states = [worker['status'] for worker in model.get('workers', [])]
ready = 'ready' if 'READY' in states else 'NOT READY'
print(f\"{model['modelName']}: {ready} ({', '.join(states) or 'no workers'}), http://127.0.0.1:$inference/predictions/{model['modelName']}\")
" || echo "$name: not registered"
    done
    ;;
  register)
    archive=${1:?usage: scripts/serve.sh register NAME.mar (a file in model_store/)}
    archive=$(basename "$archive")
    [ -f "model_store/$archive" ] || { echo "error: model_store/$archive does not exist; copy the archive there first" >&2; exit 1; }
    # The management API's register call, on loopback with the management key: the other models keep serving,
    # and the keys stay as they are.
    curl -sf -X POST -H "Authorization: Bearer $(token management)" \
      "http://127.0.0.1:$management/models?url=$archive&initial_workers=1&synchronous=true" >/dev/null \
      || { echo "error: TorchServe refused to register $archive; see logs/ts_log.log" >&2; exit 1; }
    wait_ready "${archive%.mar}"
    ;;
  unregister)
    curl -sf -X DELETE -H "Authorization: Bearer $(token management)" "http://127.0.0.1:$management/models/${1:?usage: scripts/serve.sh unregister MODEL}"
    echo
    ;;
esac
