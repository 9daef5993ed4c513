# syntax=docker/dockerfile:1
# fraudscore: the gRPC scoring service and its batch jobs (one image, the same CLI the tests run).
#   docker build -t fraudscore .
#   docker compose up            (redis, kafka, postgres, migrate, scorer on :50051)

# ---- build: resolve the locked dependencies into a virtual environment
FROM python:3.11-slim-bookworm AS build
COPY --from=ghcr.io/astral-sh/uv:0.5 /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PROJECT_ENVIRONMENT=/opt/venv
WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY scoring_service ./scoring_service
COPY protos ./protos
COPY migrations ./migrations
COPY alembic.ini ./
RUN uv sync --frozen --no-dev \
 && /opt/venv/bin/python -m scoring_service.protos

# ---- runtime: the venv and the code, a non-root user
FROM python:3.11-slim-bookworm AS runtime
RUN groupadd --system --gid 10001 fraudscore \
 && useradd --system --uid 10001 --gid fraudscore --home-dir /app --shell /usr/sbin/nologin fraudscore \
 && apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY --from=build /src /app
RUN mkdir -p /app/var && chown -R fraudscore:fraudscore /app/var
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OMP_WAIT_POLICY=PASSIVE \
    FRAUDSCORE_DATA_DIR=/app/var \
    FRAUDSCORE_LISTEN=0.0.0.0:50051 \
    FRAUDSCORE_LOG_FORMAT=json
USER fraudscore
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["fraudscore", "health", "--address", "127.0.0.1:50051", "--timeout", "2"]
ENTRYPOINT ["fraudscore"]
CMD ["serve"]
