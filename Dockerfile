# syntax=docker/dockerfile:1
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATA_DIR=/data \
    PORT=8084

WORKDIR /srv/model-service

COPY pyproject.toml setup.cfg README.md ./
COPY client ./client
COPY app ./app
RUN pip install --no-cache-dir ./client . \
    && groupadd --system --gid 10001 modelsvc \
    && useradd --system --no-log-init --uid 10001 --gid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin modelsvc \
    && mkdir -p /data \
    && chown 10001:10001 /data

# Numeric, so Kubernetes can check runAsNonRoot without reading /etc/passwd
# (deploy/kubernetes.yaml runs as the same 10001:10001).
USER 10001:10001
VOLUME ["/data"]
EXPOSE 8084

# The slim image has no curl; Python's own urllib asks /health.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8084'), timeout=4)"]

ENTRYPOINT ["model-service"]
CMD ["serve"]
