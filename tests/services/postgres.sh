# Start a throwaway PostgreSQL server for the tests (sourced by tests/run).
# Exports PREDTRACE_TEST_POSTGRES_URL; registers its own stop in CLEANUP.

find_pg_bin() {
  local dir
  for dir in /usr/lib/postgresql/*/bin; do
    [[ -x $dir/initdb ]] && { echo "$dir"; return 0; }
  done
  return 1
}

start_postgres() {
  local bin
  if ! bin=$(find_pg_bin); then
    echo "PostgreSQL not found: installing the Debian package"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq postgresql >/dev/null
    bin=$(find_pg_bin) || { echo "could not install PostgreSQL" >&2; return 1; }
  fi
  local data sock port runas=()
  data=$(mktemp -d /tmp/predtrace-pg.XXXXXX)
  sock=$data/sock
  mkdir -p "$sock"
  # initdb refuses to run as root: run the server as the postgres user.
  if [[ $(id -u) == 0 ]]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    chown -R postgres "$data"
    runas=(runuser -u postgres --)
  fi
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "${runas[@]}" "$bin/initdb" -D "$data/db" -U predtrace --auth=trust -E UTF8 >/dev/null
  "${runas[@]}" "$bin/pg_ctl" -D "$data/db" -l "$data/log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $sock -c fsync=off -c max_connections=200" start >/dev/null
  CLEANUP+=("${runas[*]} $bin/pg_ctl -D $data/db -m immediate stop >/dev/null 2>&1; rm -rf $data")
  "$bin/createdb" -h 127.0.0.1 -p "$port" -U predtrace predtrace_test
  export PREDTRACE_TEST_POSTGRES_URL="postgresql://predtrace@127.0.0.1:$port/predtrace_test"
  echo "PostgreSQL on 127.0.0.1:$port (data $data)"
}
