# keyless sidecar image.
#   docker build -t keyless .
# Stage 1 downloads every dependency exactly as requirements.lock pins it (each file checked
# against the lock's sha256) and builds keyless' own wheel; the sbom stage installs them the
# way the final stage does and writes a CycloneDX SBOM of that environment; the final stage
# installs them into a clean python:3.12-slim: no build tools, no pip cache, no SBOM tooling,
# no bytecode written at run time, UID 10001. The SBOM is /usr/share/doc/keyless/sbom.cdx.json.
# Pin the base for releases: --build-arg PYTHON_IMAGE=python:3.12-slim@sha256:<digest>.
# `make lock` refreshes the lock files; tests/deploy/test_lock.py checks them against
# pyproject.toml. tests/deploy/test_image_equivalent.py reproduces the stages without Docker
# (same ENV, same UID, unwritable cwd and HOME, the SBOM) and tests/deploy/test_manifests.py
# runs hadolint on this file.

ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY requirements.lock pyproject.toml README.md ./
COPY proxy ./proxy
COPY addons ./addons
# Binary wheels only: a wheel built here would not match the lock's hashes, and the final stage
# installs with --require-hashes. keyless' own wheel comes from this source, without deps.
RUN python -m pip download --require-hashes --only-binary=:all: --dest /wheels \
        -r requirements.lock \
    && python -m pip wheel --no-deps --wheel-dir /wheels . \
    && cp requirements.lock /wheels/requirements.lock

# The final stage's install, repeated, then the SBOM of exactly that environment; the SBOM
# tool lives in a venv of its own (hash-pinned by deploy/image/sbom-tools.lock) and never
# reaches the final image.
FROM ${PYTHON_IMAGE} AS sbom
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
COPY deploy/image/sbom-tools.lock /tools/sbom-tools.lock
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-index --find-links=/wheels --require-hashes \
        -r /wheels/requirements.lock \
    && python -m pip install --no-index --no-deps /wheels/keyless-*.whl \
    && python -m venv /tools/venv \
    && /tools/venv/bin/pip install --require-hashes -r /tools/sbom-tools.lock \
    && /tools/venv/bin/cyclonedx-py environment --output-reproducible \
        --of JSON -o /tools/sbom.cdx.json /usr/local/bin/python

FROM ${PYTHON_IMAGE}
ARG KEYLESS_UID=10001
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1
# A fixed, non-root UID/GID (Kubernetes runAsUser/runAsGroup and volume ownership rely on it).
# /var/run/keyless       confdir: the CA key and certificate (mount a volume; keyless only)
# /var/run/keyless-ca    the public CA certificate for the app (`keyless init --ca-out`)
RUN groupadd --gid "${KEYLESS_UID}" keyless \
    && useradd --uid "${KEYLESS_UID}" --gid "${KEYLESS_UID}" --no-create-home \
        --home-dir /var/run/keyless --shell /usr/sbin/nologin keyless \
    && mkdir -p /var/run/keyless /var/run/keyless-ca \
    && chown "${KEYLESS_UID}:${KEYLESS_UID}" /var/run/keyless /var/run/keyless-ca \
    && chmod 0700 /var/run/keyless \
    && chmod 0755 /var/run/keyless-ca
# Transparent mode: the injected NET_ADMIN init container runs `keyless iptables --apply`
# (deploy/kubernetes/injector), which needs iptables (nft backend) in this image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/*
# The wheels come in through a bind mount (BuildKit), so they never land in a layer; --no-index:
# only what stage 1 fetched, each checked against the lock's hashes (--require-hashes), then
# keyless' own wheel without resolving anything. pip compiles the bytecode now, as the root
# filesystem is read-only later.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-index --find-links=/wheels --require-hashes \
        -r /wheels/requirements.lock \
    && python -m pip install --no-index --no-deps /wheels/keyless-*.whl
COPY --from=sbom /tools/sbom.cdx.json /usr/share/doc/keyless/sbom.cdx.json
USER 10001:10001
# Runtime configuration: every flag is also KEYLESS_<FLAG>; flags beat environment beat the
# --config file. The proxy stays on loopback (the app shares the pod's network); the admin
# server listens on all interfaces so the kubelet's probes and Prometheus can reach /healthz,
# /readyz and /metrics (no secrets there); /report answers loopback clients only, or the
# KEYLESS_ADMIN_TOKEN_FILE secret. HOME and XDG_CACHE_HOME point at the confdir volume, so
# nothing ever needs the (read-only) root filesystem.
ENV KEYLESS_LISTEN=127.0.0.1:8080 \
    KEYLESS_ADMIN=0.0.0.0:9180 \
    KEYLESS_CONFDIR=/var/run/keyless \
    KEYLESS_LOG_FORMAT=json \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/run/keyless \
    XDG_CACHE_HOME=/var/run/keyless/.cache
VOLUME ["/var/run/keyless"]
EXPOSE 9180
STOPSIGNAL SIGTERM
# Liveness for plain Docker/compose (Kubernetes ignores it and uses its own probes). It follows
# KEYLESS_ADMIN's port; a non-2xx answer or no answer raises, so the command exits non-zero.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; port = os.environ.get('KEYLESS_ADMIN', '127.0.0.1:9180').rpartition(':')[2]; u.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2)"]
ENTRYPOINT ["keyless"]
CMD ["run"]
