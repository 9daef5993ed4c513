#!/usr/bin/env bash
# Docker for the deployment tests on a Debian 12 machine (root): the docker.io daemon, debootstrap
# (scripts/docker/build-standins.sh), Debian's docker-compose 1.29 and Compose v2 built from the Go
# module proxy (~7 min once; cached in ~/go/bin). Leaves dockerd running (log: .cache/docker/dockerd.log).
# Does nothing that is already done.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
LOG_DIR=$REPO/.cache/docker
mkdir -p "$LOG_DIR"
say() { echo "docker-setup: $*" >&2; }

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v mvn >/dev/null || missing+=(maven)
if [ ${#missing[@]} -gt 0 ]; then
  say "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >"$LOG_DIR/apt.log"
fi

if ! docker info >/dev/null 2>&1; then
  say "starting dockerd (log: $LOG_DIR/dockerd.log)"
  nohup dockerd >"$LOG_DIR/dockerd.log" 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { say "dockerd did not answer in 60 s; see $LOG_DIR/dockerd.log"; exit 1; }
fi

if ! docker compose version >/dev/null 2>&1; then
  gobin=$(go env GOPATH 2>/dev/null || echo "$HOME/go")/bin/cmd
  if [ ! -x "$gobin" ]; then
    command -v go >/dev/null || { say "no Compose v2 and no Go: the tests use docker-compose 1.29"; exit 0; }
    say "go install github.com/docker/compose/v2/cmd@v2.29.7 (about 7 minutes once)"
    (cd /tmp && go install github.com/docker/compose/v2/cmd@v2.29.7)
  fi
  mkdir -p "$HOME/.docker/cli-plugins"
  cp "$gobin" "$HOME/.docker/cli-plugins/docker-compose"
fi
say "ready: $(docker version --format 'docker {{.Server.Version}}'), $(docker compose version 2>/dev/null || docker-compose version --short)"
