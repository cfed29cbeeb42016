# autoheal: one file on a slim Python image, nothing installed.
#   docker build -t autoheal .
#   docker build --build-arg PYTHON_IMAGE=my-registry/python:3.12-slim -t autoheal .
ARG PYTHON_IMAGE=python:3.12-slim
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="autoheal" \
      org.opencontainers.image.description="Self-healing companion for Prometheus and Alertmanager"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    AUTOHEAL_STATE_FILE=/data/autoheal-state.db

WORKDIR /app
COPY autoheal.py /app/autoheal.py

# A user of its own, and the state volume it owns.
RUN useradd --system --no-log-init --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin autoheal \
    && mkdir /data \
    && chown autoheal:autoheal /data
USER 10001:10001
VOLUME ["/data"]

EXPOSE 9009
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 CMD ["python", "autoheal.py", "--check"]
CMD ["python", "autoheal.py"]
