# syntax=docker/dockerfile:1
# smg container image: the wheel (with its compiled Cython extensions) is
# built in a stage that has a compiler; the runtime stage has none.

FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY smg ./smg
# the project's wheel plus wheels of all its dependencies
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin smg
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels smg \
    && rm -rf /wheels
USER 10001:10001
ENV PYTHONUNBUFFERED=1
# 30000: gateway; 29000: Prometheus metrics
EXPOSE 30000 29000
ENTRYPOINT ["smg"]
