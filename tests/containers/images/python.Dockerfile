# Python 3.11 with venv and CA certificates on the debootstrapped Debian 12: what the
# project's Dockerfile needs of its BASE_IMAGE (the official python:3.11-slim has the same).
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
