#!/usr/bin/env bash
# The whole demo on a fresh machine: set up, build the .mar, start TorchServe, explain a photo of a tabby cat.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
if ! .venv/bin/python scripts/build_mar.py --weights imagenet; then
  cat >&2 <<'BANNER'

  ============================================================================
    THE IMAGENET WEIGHTS COULD NOT BE DOWNLOADED: THE DEMO FALLS BACK TO
    SEEDED RANDOM WEIGHTS. Predictions and heatmaps below MEAN NOTHING; they
    only show that the service works. Responses say "weights": "random".
  ============================================================================

BANNER
  .venv/bin/python scripts/build_mar.py --weights random
fi
bash scripts/serve.sh start

mkdir -p demo_output
.venv/bin/python -c "import cv2, skimage.data; cv2.imwrite('demo_output/chelsea.jpg', cv2.cvtColor(skimage.data.chelsea(), cv2.COLOR_RGB2BGR))"
TOKEN=$(.venv/bin/python -c "import json; print(json.load(open('key_file.json'))['inference']['key'])")
# Show the command as a user would type it, never the secret itself.
echo '+ curl -s -H "Authorization: Bearer $TOKEN" -F data=@demo_output/chelsea.jpg -F target=281 -F topk=5 http://127.0.0.1:8080/predictions/resnet50 -o demo_output/response.json'
curl -s -H "Authorization: Bearer $TOKEN" -F data=@demo_output/chelsea.jpg -F target=281 -F topk=5 \
  http://127.0.0.1:8080/predictions/resnet50 -o demo_output/response.json
.venv/bin/python scripts/show_response.py demo_output/response.json --out demo_output
echo
echo "TorchServe is still running. The README's curl examples run as written from here, after:"
echo "  TOKEN=\$(python3 -c \"import json; print(json.load(open('key_file.json'))['inference']['key'])\")"
echo "Stop it with: bash scripts/serve.sh stop"
