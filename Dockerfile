# One image, both commands: `egress-sidecar` (the proxy; `egress-sidecar iptables apply` in the
# egress-init container) and `egress-injector` (the admission webhook).
#   docker build -t ghcr.io/egress-sidecar/egress-sidecar:0.1.0 .

FROM python:3.12-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
# Dependencies first (hash-checked, from the lock), so source edits reuse this layer.
COPY requirements.lock /tmp/requirements.lock
RUN /opt/venv/bin/pip install --require-hashes --no-deps -r /tmp/requirements.lock
COPY pyproject.toml README.md /src/
COPY sidecar /src/sidecar
COPY injector /src/injector
# (the build backend, setuptools, is fetched for this step only, as pyproject.toml declares)
RUN /opt/venv/bin/pip install --no-deps /src \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib
# Byte-compiled here because the runtime sets PYTHONDONTWRITEBYTECODE and its root filesystem is
# read-only: without .pyc files the kubernetes client alone takes ~4 s before the first policy load.

FROM python:3.12-slim
# iptables (nft backend) for egress-init; nothing else beyond the slim base.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 1337 egress \
    && useradd --uid 1337 --gid 1337 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin egress
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The sidecar's UID: its own traffic is never redirected. egress-init overrides it with root
# (and only NET_ADMIN/NET_RAW) in the pod spec the injector writes.
USER 1337:1337
EXPOSE 15001 15002 15021 8443
CMD ["egress-sidecar", "--help"]
