#!/usr/bin/env bash
# Installs (when missing) and starts the services the test suite needs: Redis and PostgreSQL, from Debian.
# Prints the URLs to export. Safe to run twice.
set -euo pipefail

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need_apt+=(postgresql)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "services: installing ${need_apt[*]} with apt-get" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >&2
fi

# Redis: a private instance on its own port so it cannot collide with a system one.
REDIS_PORT=${SLICEWISE_TEST_REDIS_PORT:-6390}
if ! redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
  mkdir -p /tmp/slicewise-ci-redis
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes --save '' --appendonly no \
    --maxmemory-policy noeviction --dir /tmp/slicewise-ci-redis --logfile /tmp/slicewise-ci-redis/redis.log >&2
  for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

# PostgreSQL: the Debian cluster, started if it is down, with a test role and database.
PG_VER=$(ls /usr/lib/postgresql | sort -n | tail -1)
if ! pg_lsclusters -h 2>/dev/null | grep -q "^$PG_VER "; then
  pg_createcluster "$PG_VER" main >&2
fi
PG_PORT=$(pg_lsclusters -h | awk -v v="$PG_VER" '$1==v && $2=="main" {print $3}')
if ! pg_lsclusters -h | awk -v v="$PG_VER" '$1==v && $2=="main" {print $4}' | grep -q online; then
  pg_ctlcluster "$PG_VER" main start >&2
fi
for _ in $(seq 50); do su postgres -c "psql -p $PG_PORT -tAc 'select 1'" >/dev/null 2>&1 && break; sleep 0.2; done
su postgres -c "psql -p $PG_PORT -v ON_ERROR_STOP=1 -q" >&2 <<SQL
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'slicewise') THEN
    CREATE ROLE slicewise LOGIN PASSWORD 'slicewise' CREATEDB;
  END IF;
  -- The secrets test makes a role of its own with a random password.
  ALTER ROLE slicewise CREATEDB CREATEROLE;
END \$\$;
SQL
su postgres -c "psql -p $PG_PORT -tAc \"select 1 from pg_database where datname='slicewise_test'\"" | grep -q 1 ||
  su postgres -c "createdb -p $PG_PORT -O slicewise slicewise_test" >&2

echo "export TEST_REDIS_URL=redis://127.0.0.1:$REDIS_PORT"
echo "export TEST_DATABASE_URL=postgres://slicewise:slicewise@127.0.0.1:$PG_PORT/slicewise_test"
