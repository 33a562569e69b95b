#!/usr/bin/env bash
# Start the local Redis and PostgreSQL the tests use, when they are installed but not running.
set -uo pipefail

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    if command -v redis-server >/dev/null; then
        mkdir -p /var/lib/redis /var/log/redis
        redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
            --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
    else
        echo "services: no Redis on 127.0.0.1:6379 and no redis-server to start" >&2
    fi
fi

if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
    else
        echo "services: no PostgreSQL on 127.0.0.1:5432 and no cluster to start" >&2
    fi
fi

for _ in $(seq 1 30); do
    redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432 && exit 0
    sleep 1
done
echo "services: Redis or PostgreSQL did not come up; their tests skip locally and fail in CI" >&2
exit 0
