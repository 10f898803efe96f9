#!/usr/bin/env bash
# The one command that sets up and runs every test, starting the real Kafka, Redis and Prometheus
# itself (the pytest fixtures start and stop them). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --services
exec .venv/bin/python -m pytest "$@"
