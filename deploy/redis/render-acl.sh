#!/bin/sh
# render-acl.sh OUTPUT: Redis' ACL file from users.acl (beside this script) and the passwords in
# REDIS_ADMIN_PASSWORD, REDIS_SCORER_PASSWORD, REDIS_NIGHTLY_PASSWORD.
#
# Each password is written as its SHA-256 ('#<hex>'), so neither the file nor ACL LIST shows it.
# The template's comments are dropped and its indented lines joined to the user line above (Redis
# reads one user per line and knows no comments). Refused: a missing or empty password, two users
# with the same password (the scorer could then log in as another user), a mark left unreplaced.
set -eu

out=${1:?usage: render-acl.sh OUTPUT}
here=$(cd "$(dirname "$0")" && pwd)

sha256() { printf '%s' "$1" | sha256sum | cut -d ' ' -f 1; }

admin=$(sha256 "${REDIS_ADMIN_PASSWORD:?set REDIS_ADMIN_PASSWORD}")
scorer=$(sha256 "${REDIS_SCORER_PASSWORD:?set REDIS_SCORER_PASSWORD}")
nightly=$(sha256 "${REDIS_NIGHTLY_PASSWORD:?set REDIS_NIGHTLY_PASSWORD}")
if [ "$admin" = "$scorer" ] || [ "$admin" = "$nightly" ] || [ "$scorer" = "$nightly" ]; then
    echo "render-acl.sh: the admin, scorer and nightly passwords must all differ" >&2
    exit 1
fi

umask 077
awk -v admin="$admin" -v scorer="$scorer" -v nightly="$nightly" '
    /^#/ || /^[[:space:]]*$/ { next }
    {
        gsub(/@ADMIN_PASSWORD_SHA256@/, admin)
        gsub(/@SCORER_PASSWORD_SHA256@/, scorer)
        gsub(/@NIGHTLY_PASSWORD_SHA256@/, nightly)
    }
    /^[[:space:]]/ { sub(/^[[:space:]]+/, ""); line = line " " $0; next }
    { if (line != "") print line; line = $0 }
    END { if (line != "") print line }
' "$here/users.acl" > "$out.tmp"
if grep -q '@[A-Z_]*_SHA256@' "$out.tmp"; then
    echo "render-acl.sh: a password mark of users.acl was not replaced" >&2
    rm -f "$out.tmp"
    exit 1
fi
mv "$out.tmp" "$out"
