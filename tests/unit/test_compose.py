"""docker-compose.yml and the Dockerfile: the services, ports, dependencies and health checks."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.servers.common import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"


def _is_grpc_health_check(code: str) -> bool:
    """The image's health check: grpc.health.v1 Check on the serving port, exit 0 only for SERVING."""
    return ("grpc_health.v1" in code and ".Check(" in code and "'127.0.0.1:50051'" in code
            and "sys.exit(s != h.HealthCheckResponse.SERVING)" in code)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_services(compose):
    assert {"redis", "kafka", "postgres", "migrate", "scorer", "nightly"} <= set(compose["services"])


def test_scorer_port_dependencies_and_healthcheck(compose):
    scorer = compose["services"]["scorer"]
    # published on loopback unless FRAUDSCORE_BIND says otherwise
    assert scorer["ports"] == ["${FRAUDSCORE_BIND:-127.0.0.1}:${FRAUDSCORE_PORT:-50051}:50051"]
    deps = scorer["depends_on"]
    assert deps["migrate"]["condition"] == "service_completed_successfully"
    assert deps["redis"]["condition"] == "service_healthy"
    assert deps["kafka"]["condition"] == "service_healthy"
    assert scorer["healthcheck"]["test"][:3] == ["CMD", "python", "-c"]
    assert _is_grpc_health_check(scorer["healthcheck"]["test"][3])
    env = scorer["environment"]
    assert env["REDIS_URL"].startswith("redis://scorer:${REDIS_SCORER_PASSWORD:?") and env["REDIS_URL"].endswith("}@redis:6379/0")
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["FRAUDSCORE_DATABASE_URL"].startswith("postgresql+psycopg://fraudscore:${POSTGRES_PASSWORD:?")


def test_dependencies_have_healthchecks(compose):
    for name in ("redis", "kafka", "postgres"):
        assert compose["services"][name]["healthcheck"]["test"], name


def test_kafka_is_kraft_and_keeps_history(compose):
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert str(env["KAFKA_LOG_RETENTION_MS"]) == "-1"


def test_one_shot_jobs_use_the_cli(compose):
    migrate = compose["services"]["migrate"]
    assert migrate["command"] == ["db", "upgrade"] and migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    nightly = compose["services"]["nightly"]
    assert nightly["profiles"] == ["nightly"] and nightly["command"][0] == "nightly"
    retrain = compose["services"]["retrain"]  # the weekly retrain (docs/model.md): registry and Kafka, no Redis
    assert retrain["profiles"] == ["retrain"] and retrain["command"][0] == "retrain"
    assert "REDIS_URL" not in retrain["environment"] and "redis" not in retrain["depends_on"]
    assert nightly["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_cli_commands_in_compose_exist():
    from typer.main import get_command

    from scoring_service.cli import app

    names = set(get_command(app).commands)  # type: ignore[attr-defined]
    assert {"serve", "nightly", "replay", "health", "db", "events"} <= names


def test_dockerfile_is_multistage_nonroot_with_healthcheck():
    text = DOCKERFILE.read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    assert re.search(r"^USER (?!root)\S+", text, re.M)
    healthcheck = re.search(r'^HEALTHCHECK .*\\\n\s*CMD \["python", "-c", "(.*)"\]$', text, re.M)
    assert healthcheck and _is_grpc_health_check(healthcheck.group(1))
    assert "EXPOSE 50051" in text
    # the two targets, the base images as build arguments, a non-editable install
    assert {"cpu", "gpu"} <= set(re.findall(r"^FROM \S+ AS (\S+)$", text, re.M))
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim-bookworm$", text, re.M)
    assert re.search(r"^ARG UV_IMAGE=ghcr\.io/astral-sh/uv:", text, re.M)
    assert "--no-editable" in text and "xgboost-cpu" in text


def test_only_the_scorer_and_the_dashboards_publish_ports(compose):
    published = {name for name, svc in compose["services"].items() if svc.get("ports")}
    assert published == {"scorer", "prometheus", "grafana"}
    for name in published:
        for port in compose["services"][name]["ports"]:
            assert port.startswith("${FRAUDSCORE_BIND:-127.0.0.1}:"), (name, port)
    assert {"prometheus", "grafana"} == {n for n, s in compose["services"].items() if s.get("profiles") == ["observability"]}


def test_backing_services_on_the_internal_network_only(compose):
    assert compose["networks"]["backend"]["internal"] is True
    for name in ("redis", "kafka", "postgres", "migrate", "nightly", "retrain"):
        assert compose["services"][name]["networks"] == ["backend"], name
    assert set(compose["services"]["scorer"]["networks"]) == {"backend", "frontend"}


def test_services_non_root_and_read_only(compose):
    for name, svc in compose["services"].items():
        assert svc.get("read_only") is True, name
        user = str(svc["user"])
        assert user.split(":")[0] not in ("0", "root"), name


REDIS_PASSWORDS = ("REDIS_ADMIN_PASSWORD", "REDIS_SCORER_PASSWORD", "REDIS_NIGHTLY_PASSWORD")


def test_secrets_come_from_the_env_file_not_the_compose_file(compose):
    redis = compose["services"]["redis"]
    for var in REDIS_PASSWORDS:  # read by deploy/redis/render-acl.sh inside the container
        assert redis["environment"][var].startswith(f"${{{var}:?"), var
    assert not any("PASSWORD" in part for part in redis["command"])  # never on a command line
    assert "$$REDIS_ADMIN_PASSWORD" in " ".join(redis["healthcheck"]["test"])
    assert compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    example = (REPO_ROOT / ".env.example").read_text()
    for var in (*REDIS_PASSWORDS, "POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        assert re.search(rf"^{var}=change-me", example, re.M), var
    ignored = (REPO_ROOT / ".gitignore").read_text().splitlines()
    assert "/.env" in ignored or ".env" in ignored


def test_redis_is_the_shipped_one_and_each_client_logs_in_as_its_own_user(compose):
    """deploy/redis (the files deploy/k8s ships too and tests/integration/test_redis_acl.py starts):
    the scorer as ``scorer``, the batch jobs as ``nightly``, the health check as ``admin``; the
    migrations never reach Redis; maxmemory is set."""
    redis = compose["services"]["redis"]
    assert redis["volumes"] == ["./deploy/redis:/etc/fraudscore-redis:ro"]
    assert redis["command"] == ["sh", "/etc/fraudscore-redis/start.sh"]
    assert (REPO_ROOT / "deploy" / "redis" / "start.sh").is_file()
    assert redis["environment"]["REDIS_MAXMEMORY"].startswith("${REDIS_MAXMEMORY:-")
    assert redis["environment"]["REDIS_ACL_DIR"] in redis["tmpfs"]  # the rendered users never reach a disk
    assert "redis-cli --user admin ping" in redis["healthcheck"]["test"][1]
    services = compose["services"]
    for name, user in (("scorer", "scorer"), ("nightly", "nightly")):
        url = services[name]["environment"]["REDIS_URL"]
        assert url.startswith(f"redis://{user}:${{REDIS_{user.upper()}_PASSWORD:?") and url.endswith("}@redis:6379/0")
    assert "REDIS_URL" not in services["migrate"]["environment"]


def test_no_top_level_name_for_docker_compose_1_29(compose):
    assert "name" not in compose


def test_compose_env_names_are_settings(compose):
    from pydantic import AliasChoices

    from scoring_service.config import Settings

    known = {"OMP_WAIT_POLICY"}
    for field, info in Settings.model_fields.items():
        known.add(f"FRAUDSCORE_{field.upper()}")
        if isinstance(info.validation_alias, AliasChoices):
            known |= {c for c in info.validation_alias.choices if isinstance(c, str)}
    for name in ("migrate", "scorer", "nightly", "retrain"):
        assert set(compose["services"][name]["environment"]) <= known, name


def test_readme_mentions_compose():
    readme = (REPO_ROOT / "README.md").read_text()
    assert "docker compose up" in readme and "50051" in readme
