# fraudscore: the gRPC scoring service and its batch jobs (one image, the same CLI the tests run).
# Two targets from one file (docs/deploy.md):
#   docker build --target cpu -t fraudscore:cpu .   # slim: xgboost-cpu in place of xgboost (no CUDA/NCCL)
#   docker build --target gpu -t fraudscore:gpu .   # full xgboost (CUDA); falls back to CPU without a GPU
#   docker build -t fraudscore .                    # the last stage: the same as --target gpu
#   docker compose up -d                            # redis, kafka, postgres, migrate, scorer on 127.0.0.1:50051
# Base images are build arguments (defaults: the public images); a machine without a registry
# builds local stand-ins under these names (scripts/docker/build-standins.sh).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.5

FROM ${UV_IMAGE} AS uv

# ---- build: the locked dependencies and the project, installed (not editable) into /opt/venv
FROM ${PYTHON_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PROJECT_ENVIRONMENT=/opt/venv UV_PYTHON_DOWNLOADS=never
WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY protos ./protos
COPY scoring_service ./scoring_service
COPY migrations ./migrations
COPY fraudscore_client ./fraudscore_client
# The gRPC stubs are generated into the source tree first, so the wheel built by the
# non-editable install carries them (the installed package has no protos/ to build them from).
# db.py finds the Alembic migrations next to the package's parent folder: site-packages/migrations.
# fraudscore_client (the Python client the CLI uses) is not in the wheel's packages (pyproject.toml):
# installed next to scoring_service the same way.
RUN /opt/venv/bin/python -m scoring_service.protos \
 && uv sync --frozen --no-dev --no-editable \
 && site=$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
 && cp -r migrations "$site/migrations" \
 && { [ -d "$site/fraudscore_client" ] || cp -r fraudscore_client "$site/fraudscore_client"; } \
 && cd / && /opt/venv/bin/python -c 'import scoring_service.protos as p; assert p.scoring_pb2.ScoreRequest' \
 && /opt/venv/bin/fraudscore --help >/dev/null \
 && /opt/venv/bin/python -c "import fraudscore_client"

# ---- build-cpu: the same environment with xgboost-cpu (same version, same `xgboost` module, no
# CUDA libraries or NCCL) in place of xgboost. It is swapped here, not in uv.lock: xgboost-cpu and
# xgboost install the same files, so one lock cannot hold both.
FROM build AS build-cpu
RUN version=$(/opt/venv/bin/python -c 'import importlib.metadata as m; print(m.version("xgboost"))') \
 && uv pip uninstall --python /opt/venv/bin/python xgboost \
 && (uv pip uninstall --python /opt/venv/bin/python nvidia-nccl-cu12 || true) \
 && uv pip install --python /opt/venv/bin/python --no-deps "xgboost-cpu==${version}" \
 && /opt/venv/bin/python -c 'import xgboost; print("xgboost", xgboost.__version__)'

# ---- runtime: a non-root user, code and venv owned by root (read-only root filesystem works:
# only /app/var, a volume, and /tmp, a tmpfs, are written)
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 fraudscore \
 && useradd --system --uid 10001 --gid fraudscore --home-dir /app --shell /usr/sbin/nologin fraudscore \
 && apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && mkdir -p /app/var && chown fraudscore:fraudscore /app/var
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OMP_WAIT_POLICY=PASSIVE \
    FRAUDSCORE_DATA_DIR=/app/var \
    FRAUDSCORE_LISTEN=0.0.0.0:50051 \
    FRAUDSCORE_LOG_FORMAT=json
VOLUME ["/app/var"]
USER fraudscore
EXPOSE 50051
# grpc.health.v1 Check, as `fraudscore health` does, without loading the whole CLI (~0.5 s, not 3-8 s on a
# busy host); exit 0 only for SERVING.
HEALTHCHECK --interval=10s --timeout=10s --start-period=90s --retries=3 \
  CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; s = g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=5).status; sys.exit(s != h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["fraudscore"]
CMD ["serve"]

# ---- cpu: the slim image (xgboost-cpu)
FROM runtime AS cpu
COPY --from=build-cpu /opt/venv /opt/venv

# ---- gpu: full xgboost (CUDA kernels; needs the NVIDIA container runtime to see a GPU, and
# scores on the CPU without one). The last stage: a plain `docker build` makes this one.
FROM runtime AS gpu
COPY --from=build /opt/venv /opt/venv
