#!/usr/bin/env bash
# Set up whatever is missing (deploy/setup.sh), then serve the packaged SmolLM2-135M-Instruct
# on http://127.0.0.1:8000. Arguments go to `lorafold serve` (e.g. --port 9000, --api-key K).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
exec "${PYTHON:-python3}" -m lorafold.clients.cli serve "$@"
