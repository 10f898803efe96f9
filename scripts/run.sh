#!/usr/bin/env bash
# The one command that sets up and runs the main job on embedded defaults: no Kafka, no Redis.
# It trains on a bundled stream (river's Phishing, variable batch sizes 1..64), checkpoints into
# ./checkpoints, serves metrics on http://127.0.0.1:9100/metrics while it runs, and writes
# runs/report.json and runs/stream.png. Extra arguments go to `stream-trainer run` and win over
# these (see `stream-trainer run --help`). A second run resumes from the checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/stream-trainer run --report-json runs/report.json --plot runs/stream.png "$@"
