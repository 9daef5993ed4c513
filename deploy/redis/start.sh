#!/bin/sh
# start.sh [REDIS-SERVER OPTIONS...]: the cache's Redis, as docker-compose.yml and deploy/k8s run it
# (and tests/integration/test_redis_acl.py, so the tests start what ships).
#
# The ACL file is rendered (render-acl.sh) into REDIS_ACL_DIR, a tmpfs in both deployments: the
# password hashes never reach a disk. maxmemory comes from REDIS_MAXMEMORY (required: a cache
# without a bound grows until the kernel kills it; docs/deploy.md, "Redis memory", sizes it).
# The rest of the configuration is redis.conf, beside this script; extra arguments follow it.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
acl="${REDIS_ACL_DIR:-/tmp}/users.acl"
sh "$here/render-acl.sh" "$acl"
exec redis-server "$here/redis.conf" --aclfile "$acl" \
    --maxmemory "${REDIS_MAXMEMORY:?set REDIS_MAXMEMORY (docs/deploy.md, Redis memory)}" "$@"
