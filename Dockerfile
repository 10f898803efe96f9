# syntax=docker/dockerfile:1
# The stream-trainer image: `stream-trainer run` (the trainer) and `stream-trainer replay` (the
# replayer) in docker-compose.yml both use it. CPU-only PyTorch keeps the image near 1 GB instead of
# the ~5 GB that the default CUDA wheels pull in.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Own layer, before the sources: rebuilding after a code change does not download torch again.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.15,<3"

COPY . .
RUN pip install . \
    && useradd --create-home --uid 10001 trainer

USER trainer
# /metrics, /healthz and /readyz (see stream_trainer/telemetry/http.py).
EXPOSE 9100
CMD ["stream-trainer", "--help"]
