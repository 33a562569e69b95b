#!/bin/sh
# Start redis-server with the password from $REDIS_PASSWORD, never on a command line (where
# `ps` and /proc show it): it goes into a config file only the redis user can read. Any
# printable password works. compose.yaml runs this as the redis service's entrypoint; further
# arguments go to redis-server (--appendonly yes ...).
set -eu
: "${REDIS_PASSWORD:?set REDIS_PASSWORD}"
conf=${REDIS_CONF:-/tmp/aigc-redis.conf}
umask 077
# Inside double quotes redis-server reads \\ and \" as escapes: escape both.
escaped=$(printf '%s' "$REDIS_PASSWORD" | sed 's/[\\"]/\\&/g')
printf 'requirepass "%s"\n' "$escaped" > "$conf"
if [ "$(id -u)" = 0 ] && id redis >/dev/null 2>&1; then
    chown redis "$conf"
fi
unset REDIS_PASSWORD
# The image's entrypoint drops to the redis user; without it (tests), redis-server directly.
if command -v docker-entrypoint.sh >/dev/null 2>&1; then
    exec docker-entrypoint.sh redis-server "$conf" "$@"
fi
exec redis-server "$conf" "$@"
