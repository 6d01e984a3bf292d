# syntax=docker/dockerfile:1
# smg container image. The wheels (smg's, with its compiled Cython
# extensions linked stripped, and its dependencies') are built in a stage
# that has a compiler; the runtime stage installs them from a bind mount,
# so no layer keeps the wheels, the compiler or the sources.
#
#   docker build -t smg .
#   docker run -p 30000:30000 -p 29000:29000 smg --worker-urls http://worker:8000
#
# HEALTHCHECK asks GET /liveness on 127.0.0.1:30000; a gateway started with
# another --port or with TLS sets SMG_HEALTHCHECK_URL (e.g.
# https://127.0.0.1:8443/liveness; the check does not verify certificates).

FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY smg ./smg
# smg (with --enable-trace's OpenTelemetry exporters and --kv-events-port's ZeroMQ, msgspec and
# tokenizers) and every dependency, as wheels
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[tracing,kv-events]"

FROM python:3.11-slim
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin smg
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-compile --no-index --find-links=/wheels "smg[tracing,kv-events]" \
    # the kubernetes client's asyncio twin (about 70 MB) is never imported by smg
    # (tests/test_wheel.py checks that discovery imports without it)
    && rm -rf /usr/local/lib/python3.11/site-packages/kubernetes/aio \
    && python -m compileall -q /usr/local/lib/python3.11/site-packages > /dev/null
USER 10001:10001
ENV PYTHONUNBUFFERED=1 \
    SMG_HEALTHCHECK_URL=http://127.0.0.1:30000/liveness
# 30000: gateway; 29000: Prometheus metrics
EXPOSE 30000 29000
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, ssl, sys, urllib.request; ctx = ssl._create_unverified_context(); sys.exit(0 if urllib.request.urlopen(os.environ['SMG_HEALTHCHECK_URL'], timeout=2, context=ctx).status == 200 else 1)"]
ENTRYPOINT ["smg"]
