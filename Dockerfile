# One image, both commands: `egress-sidecar` (the proxy; `egress-sidecar iptables apply` in the
# egress-init container) and `egress-injector` (the admission webhook).
#   make image        (docker build when a Docker engine is there, else buildah: scripts/build-image)
#   docker build -t ghcr.io/egress-sidecar/egress-sidecar:0.1.0 .
#
# Debian 13's own python3 (3.13) and iptables, so that a base made from Debian's packages with
# debootstrap (scripts/build-image, where no registry is reachable) is the same image as the
# registry's debian:trixie-slim. Every dependency has a wheel for CPython 3.13 in the lock:
# no compiler in either stage.

FROM debian:trixie-slim AS build
ARG DEBIAN_FRONTEND=noninteractive
# python3-setuptools: the build backend pyproject.toml names, from Debian rather than fetched
# unpinned by pip's build isolation.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-setuptools \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv --without-pip /opt/venv
# The CA bundle pip trusts: scripts/build-image passes the machine's (mounted into the build);
# unset, pip uses its own.
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# Dependencies first (hash-checked, wheels only, from the lock), so source edits reuse this layer.
COPY requirements.lock /tmp/requirements.lock
RUN python3 -m venv --system-site-packages /tmp/pip \
    && /tmp/pip/bin/pip --python /opt/venv/bin/python install --require-hashes --no-deps \
       --only-binary=:all: -r /tmp/requirements.lock
COPY pyproject.toml README.md /src/
COPY sidecar /src/sidecar
COPY injector /src/injector
# The project's wheel, built offline with Debian's setuptools (the build stage only), installed
# without dependencies: everything else came from the lock.
# kubernetes/aio is the client's asyncio twin (64 MB with its .pyc files, a sixth of the image):
# nothing here imports it (tests/image checks the image still serves and injects without it).
RUN /tmp/pip/bin/pip wheel --no-deps --no-build-isolation --no-index -w /tmp/dist /src \
    && /tmp/pip/bin/pip --python /opt/venv/bin/python install --no-deps --no-index /tmp/dist/*.whl \
    && rm -rf /opt/venv/lib/python3*/site-packages/kubernetes/aio \
    && /opt/venv/bin/python -m compileall -q -j 0 /opt/venv/lib
# Byte-compiled here because the runtime sets PYTHONDONTWRITEBYTECODE and its root filesystem is
# read-only: without .pyc files the kubernetes client alone takes ~4 s before the first policy load.

FROM debian:trixie-slim
ARG DEBIAN_FRONTEND=noninteractive
# python3 (the venv's interpreter), iptables (nft backend) for egress-init, and ca-certificates:
# the system trust store HTTPS inspection verifies upstreams against; nothing else.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 iptables ca-certificates \
    && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/* \
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
