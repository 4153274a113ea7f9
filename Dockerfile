# Slim, non-root image running the same `receiver serve` as the README.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 RECEIVER_DATA_DIR=/data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY receiver ./receiver
RUN pip install --no-cache-dir -e . && useradd --system --uid 10001 receiver \
    && mkdir -p /data && chown receiver /data
USER receiver
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
# `serve` applies the migrations before it listens.
CMD ["receiver", "serve", "--host", "0.0.0.0", "--port", "8000"]
