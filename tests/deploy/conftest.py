"""The deployment tests: Docker images and the compose stack, opt-in (FRAUDSCORE_DOCKER_TESTS=1, `make compose-test`)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.servers.common import REPO_ROOT

ENABLED = os.environ.get("FRAUDSCORE_DOCKER_TESTS") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "docker: builds the images and runs the compose stack (minutes); only with FRAUDSCORE_DOCKER_TESTS=1"
    )


def compose_command() -> list[str]:
    """Compose v2 (`docker compose`) when present, else docker-compose 1.29; FRAUDSCORE_COMPOSE overrides."""
    if os.environ.get("FRAUDSCORE_COMPOSE"):
        return os.environ["FRAUDSCORE_COMPOSE"].split()
    v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if v2.returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("FRAUDSCORE_DOCKER_TESTS=1 but no Docker Compose: install Compose v2 (docs/deploy.md) or docker-compose")


@pytest.fixture(scope="session")
def docker_ready() -> list[str]:
    """Fails (never skips) when the deployment tests were asked for and Docker cannot run them."""
    if shutil.which("docker") is None:
        pytest.fail("FRAUDSCORE_DOCKER_TESTS=1 but the docker CLI is missing (docs/deploy.md: apt-get install docker.io)")
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if info.returncode != 0:
        pytest.fail(f"FRAUDSCORE_DOCKER_TESTS=1 but the Docker daemon does not answer: {info.stderr.strip()[:300]}")
    return compose_command()


def run(cmd: list[str], timeout: float = 900, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess:
    """A command whose output is kept for the failure message."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n"
                    f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def images(docker_ready: list[str]) -> dict[str, int]:
    """The stand-in base and third-party images (unless FRAUDSCORE_DOCKER_STANDINS=0: then the real ones are
    pulled), and the project's cpu and gpu targets built from its Dockerfile; their sizes in bytes."""
    if os.environ.get("FRAUDSCORE_DOCKER_STANDINS", "1") != "0":
        run([str(REPO_ROOT / "scripts" / "docker" / "build-standins.sh")], timeout=1800)
    sizes: dict[str, int] = {}
    for target in ("cpu", "gpu"):
        run(["docker", "build", "--target", target, "-t", f"fraudscore:{target}", str(REPO_ROOT)], timeout=1800)
        out = run(["docker", "image", "inspect", "--format", "{{.Size}}", f"fraudscore:{target}"]).stdout
        sizes[target] = int(out.strip())
    return sizes
