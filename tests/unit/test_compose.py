"""docker-compose.yml and the Dockerfile: the services, ports, dependencies and health checks."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.servers.common import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_services(compose):
    assert {"redis", "kafka", "postgres", "migrate", "scorer", "nightly"} <= set(compose["services"])


def test_scorer_port_dependencies_and_healthcheck(compose):
    scorer = compose["services"]["scorer"]
    assert "50051:50051" in scorer["ports"]
    deps = scorer["depends_on"]
    assert deps["migrate"]["condition"] == "service_completed_successfully"
    assert deps["redis"]["condition"] == "service_healthy"
    assert deps["kafka"]["condition"] == "service_healthy"
    assert "health" in scorer["healthcheck"]["test"]
    env = scorer["environment"]
    assert env["REDIS_URL"].startswith("redis://redis:") and env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["FRAUDSCORE_DATABASE_URL"].startswith("postgresql+psycopg://")


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
    assert nightly["profiles"] == ["batch"] and nightly["command"][0] == "nightly"
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
    assert re.search(r"^HEALTHCHECK .*\n?.*fraudscore\", \"health\"", text, re.M)
    assert "EXPOSE 50051" in text


def test_readme_mentions_compose():
    readme = (REPO_ROOT / "README.md").read_text()
    assert "docker compose up" in readme and "50051" in readme
