# Stands in for chromadb/chroma in the compose test: the daemon image already carries the
# pinned chromadb, whose CLI runs the same server.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
ENV ANONYMIZED_TELEMETRY=False
ENTRYPOINT ["chroma", "run", "--path", "/data", "--host", "0.0.0.0", "--port", "8000"]
CMD []
