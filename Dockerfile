# keyless sidecar image (first version; the deployment work hardens it further).
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY addons ./addons
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin keyless \
    && mkdir -p /var/run/keyless && chown 10001:10001 /var/run/keyless
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001:10001
# The proxy stays on loopback (the app shares the pod's network); the admin server listens on
# all interfaces so the kubelet's probes and Prometheus can reach it. It serves no secrets.
ENV KEYLESS_LISTEN=127.0.0.1:8080 \
    KEYLESS_ADMIN=0.0.0.0:9180 \
    KEYLESS_CONFDIR=/var/run/keyless \
    PYTHONUNBUFFERED=1
VOLUME ["/var/run/keyless"]
EXPOSE 9180
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9180/healthz', timeout=2)"]
ENTRYPOINT ["keyless"]
CMD ["run"]
