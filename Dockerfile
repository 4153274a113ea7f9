# Slim, non-root image running the same `receiver serve` as the README, from the built wheel
# (migrations and samples ship inside the package; no checkout in the image).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY receiver ./receiver
RUN pip wheel --no-cache-dir --no-deps -w /dist .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 RECEIVER_DATA_DIR=/data
COPY --from=build /dist /dist
RUN pip install --no-cache-dir /dist/*.whl && rm -rf /dist \
    && useradd --system --uid 10001 receiver && mkdir -p /data && chown receiver /data
WORKDIR /data
USER receiver
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
# `serve` applies the migrations before it listens.
CMD ["receiver", "serve", "--host", "0.0.0.0", "--port", "8000"]
