# autoheal: one file on a slim Python image, nothing installed.
#   docker build -t autoheal .
#   docker build --build-arg PYTHON_IMAGE=my-registry/python:3.12-slim -t autoheal .
ARG PYTHON_IMAGE=python:3.12-slim
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="autoheal" \
      org.opencontainers.image.description="Self-healing companion for Prometheus and Alertmanager"

# No MALLOC_ARENA_MAX here: autoheal limits glibc's malloc arenas itself, however it is started.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    AUTOHEAL_STATE_FILE=/data/autoheal-state.db

WORKDIR /app
COPY autoheal.py /app/autoheal.py
# Compiled once here: "python -m autoheal" then starts from the bytecode, which saves about
# 30 ms and 8 MiB of every start (a script given by path is compiled again each time).
RUN python -m compileall -q /app

# A user of its own, and the state volume it owns.
RUN useradd --system --no-log-init --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin autoheal \
    && mkdir /data \
    && chown autoheal:autoheal /data
USER 10001:10001
VOLUME ["/data"]

EXPOSE 9009
# The probe runs from the bytecode compiled above, as the server does (python -m autoheal, here in
# the WORKDIR): about a third of "python autoheal.py --check", which compiles the whole file at
# every probe (bench/bench.py measures both). It gives up after 2 s itself.
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 CMD ["python", "-m", "autoheal", "--check"]
CMD ["python", "-m", "autoheal"]
