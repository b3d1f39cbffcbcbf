#!/bin/sh
# The part of the official postgres image's entrypoint that docker-compose.yml relies on:
#   POSTGRES_USER (default postgres), POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE, POSTGRES_DB
#   (default the user), PGDATA, PGPORT; on the first start, a cluster with that superuser and
#   database, password (scram-sha-256) authentication over TCP from anywhere, trust on the local
#   socket, and each /docker-entrypoint-initdb.d/*.sql run in POSTGRES_DB (a failure empties
#   PGDATA, so the next start initialises again). Then `postgres` as PID 1, listening on all
#   addresses unless the command says otherwise. Another command (psql, a shell) runs as given.
set -eu

# `-c name=value …` alone: options for postgres (as the official image).
case "${1:-}" in -*) set -- postgres "$@" ;; esac

# Anything but the server (psql, pg_dump, a shell) runs as it is, with no initialisation.
if [ "${1:-}" != postgres ]; then
  exec "$@"
fi

if [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA" /var/run/postgresql
  chown postgres:postgres "$PGDATA" /var/run/postgresql
  chmod 700 "$PGDATA"
  exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  user="${POSTGRES_USER:-postgres}"
  db="${POSTGRES_DB:-$user}"
  if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
    password="$(cat "$POSTGRES_PASSWORD_FILE")"
  else
    password="${POSTGRES_PASSWORD:-}"
  fi
  if [ -z "$password" ]; then
    echo "entrypoint: no password (POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE, not empty): not initialising" >&2
    exit 1
  fi
  # A first start that fails part-way leaves nothing for the next start to mistake for a cluster.
  trap 'status=$?; if [ "$status" != 0 ]; then pg_ctl -D "$PGDATA" -m immediate -w stop > /dev/null 2>&1 || true;
        find "$PGDATA" -mindepth 1 -delete; echo "entrypoint: initialisation failed ($status); $PGDATA emptied" >&2; fi' EXIT
  pwfile="$(mktemp)"
  printf '%s\n' "$password" > "$pwfile"
  initdb --username="$user" --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 \
    --encoding=UTF8 -D "$PGDATA" > /dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
  # A server on the local socket only while the databases are made.
  pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start > /dev/null
  if [ "$db" != postgres ]; then
    psql -v ON_ERROR_STOP=1 --username "$user" --dbname postgres -q -c "CREATE DATABASE \"$db\""
  fi
  for script in /docker-entrypoint-initdb.d/*.sql; do
    [ -e "$script" ] || continue
    echo "entrypoint: running $script"
    psql -v ON_ERROR_STOP=1 --username "$user" --dbname "$db" -q -f "$script"
  done
  pg_ctl -D "$PGDATA" -m fast -w stop > /dev/null
  trap - EXIT
  echo "entrypoint: PostgreSQL initialised in $PGDATA (user $user, database $db)"
fi

exec "$@"
