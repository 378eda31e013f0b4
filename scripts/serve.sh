#!/usr/bin/env bash
# Start or stop TorchServe with config.properties, serving every archive in model_store/:
# scripts/serve.sh start|stop|status [MODEL]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

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

case "${1:-start}" in
  start)
    require_java
    shopt -s nullglob
    archives=(model_store/*.mar)
    if [ ${#archives[@]} -eq 0 ]; then
      echo "error: model_store/ holds no .mar; build one: .venv/bin/python scripts/build_mar.py --weights imagenet|random|PATH" >&2
      exit 1
    fi
    torchserve --stop >/dev/null 2>&1 || true
    rm -f key_file.json
    mkdir -p logs
    torchserve --start --ncs --model-store model_store --ts-config config.properties >logs/torchserve_start.log 2>&1 </dev/null
    for archive in "${archives[@]}"; do
      model=$(basename "$archive" .mar)
      echo -n "Waiting for $model to load"
      ready=
      for _ in $(seq 1 180); do
        if [ -f key_file.json ] && curl -sf -H "Authorization: Bearer $(token management)" \
          "http://127.0.0.1:8081/models/$model" 2>/dev/null | grep -q '"status": "READY"'; then
          echo " ready: http://127.0.0.1:8080/predictions/$model"
          ready=1
          break
        fi
        echo -n "."
        sleep 1
      done
      if [ -z "$ready" ]; then
        echo; echo "error: $model did not become ready in 180 s; see logs/model_log.log and logs/ts_log.log" >&2
        exit 1
      fi
    done
    echo "Tokens are in key_file.json."
    ;;
  stop)
    torchserve --stop
    ;;
  status)
    curl -s -H "Authorization: Bearer $(token management)" "http://127.0.0.1:8081/models/${2:-}"
    ;;
  *)
    echo "usage: scripts/serve.sh start|stop|status" >&2
    exit 2
    ;;
esac
