"""The README's "Using it" block, pasted: its lines run in order in bash (``set -e``), in a new
temporary folder, against the Kafka broker and the Redis they start themselves, and leave the
files and the output they promise; the broker and Redis are stopped by the block's last lines."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import service_unavailable
from tests.fixtures.kafka import broker_script

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ACTIVATE = "source .venv/bin/activate"
PORTS = (19092, 16379, 19100)  # Kafka, Redis, the trainer's metrics, as the README names them


def using_it_block() -> list[str]:
    """The lines of the first ``bash`` block under ``## Using it``."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("\n```", 1)[0]
    return block.splitlines()


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        # As servers bind: a port whose last connections are in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_the_block_starts_in_the_repository_and_ends_by_stopping_the_services():
    lines = using_it_block()
    assert lines[0] == ACTIVATE
    assert 'cd "$(mktemp -d)"' in lines[1]
    assert "start --daemon" in "\n".join(lines) and "stop --data-dir" in lines[-2]
    assert "shutdown" in lines[-1]
    runs = [line for line in lines if line.startswith("stream-trainer run --source kafka://")]
    assert runs and all("--stop-at-end" in " ".join(lines) for _ in runs)


def test_the_using_it_lines_run_when_pasted(tmp_path: Path) -> None:
    broker_script()
    for tool in ("redis-server", "redis-cli"):
        if not _shutil_which(tool):
            service_unavailable("Redis", f"{tool} not on PATH")
    busy = [port for port in PORTS if not _port_free(port)]
    assert not busy, f"the README's ports {busy} are in use: stop what listens there"
    lines = using_it_block()
    # `source .venv/bin/activate` stands for: this interpreter's environment first on PATH.
    script = "\n".join(lines[1:])
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_TRAINER_")}
    if "STREAM_TRAINER_KAFKA_HOME" in os.environ:  # the broker's jars, where setup put them
        env["STREAM_TRAINER_KAFKA_HOME"] = os.environ["STREAM_TRAINER_KAFKA_HOME"]
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    env["TMPDIR"] = str(tmp_path)
    try:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        _stop_leftovers(tmp_path, env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    (work,) = [p for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith("tmp.")]
    for name in ("r.json", "r.png", "phishing.png", "phishing.jsonl.gz", "ck-replay"):
        assert (work / name).exists(), name
    assert not (ROOT / "phishing.jsonl.gz").exists() and not (ROOT / "ck-replay").exists()
    # river's Phishing has 1,250 records: replayed, trained from Kafka, recorded, trained again.
    assert "replayed 1250 message(s) to phishing" in output
    assert "recorded 1250 message(s) from phishing" in output
    assert output.count("run default: samples=1250 ") == 2, output[-4000:]
    assert "stopped broker in" in output
    assert all(_port_free(port) for port in PORTS[:2]), "the block left Kafka or Redis running"


def _shutil_which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


def _stop_leftovers(tmp_path: Path, env: dict[str, str]) -> None:
    """Stop what a failed run left behind (the block stops both itself when it succeeds)."""
    for data in tmp_path.glob("tmp.*/kafka"):
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts/kafka_broker.py"),
                "stop",
                "--data-dir",
                str(data),
            ],
            env=env,
            capture_output=True,
            check=False,
        )
    subprocess.run(
        ["redis-cli", "-p", str(PORTS[1]), "shutdown", "nosave"], capture_output=True, check=False
    )
