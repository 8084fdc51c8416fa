#!/usr/bin/env bash
# Generates a Python client from proto/ with grpcio-tools and runs
# python_client.py against a freshly started server. Used by .ci/run.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="${1:-${CARGO_TARGET_DIR:-$root/target}/debug/carevault}"
[ -x "$bin" ] || { echo "no carevault binary at $bin (build it first, or pass its path)"; exit 1; }
work="$(mktemp -d)"
server=""
pg_stop=""
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; [ -n "$pg_stop" ] && eval "$pg_stop" >/dev/null 2>&1; rm -rf "$work"' EXIT

python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check grpcio grpcio-tools grpcio-status "psycopg[binary]"
"$work/venv/bin/python" -m grpc_tools.protoc -I"$root/proto" --python_out="$work" --grpc_python_out="$work" \
  "$root"/proto/carevault/v1/*.proto

"$bin" certs dev --out "$work/tls" >/dev/null 2>&1

# run_client NAME [STORE_URL]: a server on its own data directory (sled, or the given store), then the client.
run_client() {
  local name="$1" store="${2:-}" addr=""
  local args=(serve --data-dir "$work/$name" --key-dir "$work/keys" --listen 127.0.0.1:0 --log-format json
    --tls-cert "$work/tls/server.pem" --tls-key "$work/tls/server.key"
    --tls-client-ca "$work/tls/ca.pem" --require-client-cert)
  [ -n "$store" ] && args+=(--store "$store")
  "$bin" "${args[@]}" 2>"$work/$name.log" &
  server=$!
  for _ in $(seq 1 100); do
    addr="$(grep -o '"addr":"[^"]*"' "$work/$name.log" | head -1 | cut -d'"' -f4 || true)"
    [ -n "$addr" ] && break
    sleep 0.1
  done
  [ -n "$addr" ] || { cat "$work/$name.log"; echo "server did not start"; exit 1; }
  local token
  token="$("$bin" token issue --key-dir "$work/keys" --sub interop --role front_desk,compliance)"
  GRPC_VERBOSITY=NONE PYTHONPATH="$work" "$work/venv/bin/python" "$here/python_client.py" "$addr" "$token" "$work/tls" $store
  kill "$server"; wait "$server" 2>/dev/null || true; server=""
}

run_client data

# Again on PostgreSQL, when its server binaries are here (.ci/run installs them):
# a throwaway cluster, run as the postgres user when this runs as root.
pg_bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
[ -x "$pg_bin/initdb" ] || pg_bin="$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")"
if [ -x "$pg_bin/initdb" ]; then
  as=()
  if [ "$(id -u)" = 0 ]; then chown postgres "$work"; as=(runuser -u postgres --); fi
  pg_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  "${as[@]}" "$pg_bin/initdb" -D "$work/pg" -U carevault --auth=trust --no-sync >/dev/null
  "${as[@]}" "$pg_bin/pg_ctl" -D "$work/pg" -l "$work/pg.log" -w \
    -o "-p $pg_port -k $work -c listen_addresses=127.0.0.1" start >/dev/null
  pg_stop="${as[*]} $pg_bin/pg_ctl -D $work/pg -m immediate -w stop"
  run_client data-pg "postgresql://carevault@127.0.0.1:$pg_port/postgres"
else
  echo "python interop on PostgreSQL: skipped (no PostgreSQL server binaries)"
  [ "${CI:-}" = true ] && { echo "under CI the PostgreSQL run is required"; exit 1; }
fi
