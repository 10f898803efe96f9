#!/usr/bin/env bash
# The one command that sets up and runs every test, starting the real Kafka, Redis and Prometheus
# itself (the pytest fixtures start and stop them). Extra arguments go to pytest.
#
# Without arguments it first runs the floors check: the tests that exercise the dependencies'
# APIs, in .venv-floors, where every runtime dependency is at the lowest version pyproject.toml
# allows (constraints/lowest.txt; torch, the dev tools and the rest come from .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --services

FLOOR_TESTS=(
  tests/test_floors.py
  tests/test_checkpoint_codec.py tests/test_checkpoint_store_contract.py
  tests/test_checkpoint_tamper.py tests/test_checkpoint_urls.py tests/test_checkpoint_validation.py
  tests/test_kafka_client_options.py tests/test_deserializer.py tests/test_process_frames.py
  tests/test_recording.py tests/test_telemetry_metrics.py tests/test_telemetry_http.py
  tests/test_service_config.py tests/test_trainer.py tests/test_features.py
  tests/test_engine.py tests/test_sources.py
  tests/integration/test_redis_checkpoint_store.py
)
if [ $# -eq 0 ]; then
  floors=.venv-floors
  stamp=$floors/.lowest-installed
  if [ ! -f "$stamp" ] || [ constraints/lowest.txt -nt "$stamp" ]; then
    echo "test: installing the lowest allowed dependency versions into $floors" >&2
    rm -rf "$floors"
    .venv/bin/python -m venv "$floors"
    "$floors/bin/python" -m pip install -q -r constraints/lowest.txt
    # What the floors do not pin (torch, pytest...) is found in .venv, after the floors' own.
    shared=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    floors_site=$("$floors/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "$shared" > "$floors_site/_shared_from_venv.pth"
    touch "$stamp"
  fi
  echo "test: floors run (constraints/lowest.txt)" >&2
  PYTHONPATH="$PWD" FLOORS_RUN=1 "$floors/bin/python" -m pytest -q "${FLOOR_TESTS[@]}"
fi
exec .venv/bin/python -m pytest "$@"
