#!/usr/bin/env bash
# Local stand-ins for the images the Dockerfile and docker-compose.yml name, for a machine that
# reaches PyPI, Debian and Maven Central but no image registry (docs/deploy.md):
#   - a Debian bookworm base (debootstrap, with this machine's CA bundle), tagged as the
#     Dockerfile's PYTHON_IMAGE default (python:3.11-slim-bookworm);
#   - the uv image (ghcr.io/astral-sh/uv:0.5) from the uv wheel on PyPI;
#   - redis:7.2-alpine, postgres:16-alpine, apache/kafka:4.4.0 from Debian packages and the Kafka
#     jars, with the same users, paths and health-check commands as the real images.
# A tag that already exists (a real image pulled elsewhere, or an earlier run) is kept: FORCE=1
# rebuilds the stand-ins. Needs root (debootstrap), docker, mvn, python3 and uv (make install).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${FRAUDSCORE_DOCKER_CACHE:-$REPO/.cache/docker}
BASE=fraudscore-standin/base:bookworm
FORCE=${FORCE:-0}
mkdir -p "$CACHE"

have() { [ "$FORCE" != 1 ] && docker image inspect "$1" >/dev/null 2>&1; }
say() { echo "build-standins: $*" >&2; }

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  root=$CACHE/rootfs
  if [ ! -x "$root/usr/bin/python3" ]; then
    command -v debootstrap >/dev/null || { say "debootstrap missing: apt-get install -y debootstrap"; exit 1; }
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    rm -rf "$root"
    say "debootstrap bookworm into $root (about a minute)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" \
      "${mirror:-http://deb.debian.org/debian}" >"$CACHE/debootstrap.log"
  fi
  # Registries may be reached through a TLS proxy whose CA only this machine's bundle holds.
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
  tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["bash"]' - "$BASE" >/dev/null
  say "imported $BASE"
fi
docker image inspect python:3.11-slim-bookworm >/dev/null 2>&1 || docker tag "$BASE" python:3.11-slim-bookworm

if ! have ghcr.io/astral-sh/uv:0.5; then
  ctx=$(mktemp -d)
  # pip through uvx (uv is what `make install` puts on PATH): `python3 -m pip` failed under `uv run`,
  # where python3 is the project's venv, which has no pip
  uvx pip download -q --no-deps --only-binary=:all: --platform manylinux_2_17_x86_64 "uv==0.5.*" -d "$ctx/whl"
  python3 - "$ctx" <<'PY'
import pathlib, sys, zipfile
ctx = pathlib.Path(sys.argv[1])
with zipfile.ZipFile(next((ctx / "whl").glob("uv-*.whl"))) as z:
    for name in z.namelist():
        if "/scripts/" in name and name.rsplit("/", 1)[1] in ("uv", "uvx"):
            (ctx / name.rsplit("/", 1)[1]).write_bytes(z.read(name))
            (ctx / name.rsplit("/", 1)[1]).chmod(0o755)
PY
  printf 'FROM scratch\nCOPY uv uvx /\n' >"$ctx/Dockerfile"
  docker build -q -t ghcr.io/astral-sh/uv:0.5 "$ctx" >/dev/null
  rm -rf "$ctx"
  say "built ghcr.io/astral-sh/uv:0.5"
fi

if ! have redis:7.2-alpine; then
  docker build -q --build-arg BASE="$BASE" -t redis:7.2-alpine "$HERE/standins/redis" >/dev/null
  say "built redis:7.2-alpine"
fi
if ! have postgres:16-alpine; then
  docker build -q --build-arg BASE="$BASE" -t postgres:16-alpine "$HERE/standins/postgres" >/dev/null
  say "built postgres:16-alpine"
fi
if ! have apache/kafka:4.4.0; then
  ctx=$CACHE/kafka-context
  rm -rf "$ctx" && mkdir -p "$ctx"
  cp -r "$HERE/standins/kafka/." "$ctx/"
  mvn -q -f "$HERE/standins/kafka/pom.xml" dependency:copy-dependencies -DoutputDirectory="$ctx/libs"
  docker build -q --build-arg BASE="$BASE" -t apache/kafka:4.4.0 "$ctx" >/dev/null
  say "built apache/kafka:4.4.0"
fi
