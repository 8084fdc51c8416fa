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
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$work"' EXIT

python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check grpcio grpcio-tools grpcio-status
"$work/venv/bin/python" -m grpc_tools.protoc -I"$root/proto" --python_out="$work" --grpc_python_out="$work" \
  "$root"/proto/carevault/v1/*.proto

"$bin" certs dev --out "$work/tls" >/dev/null 2>&1
"$bin" serve --data-dir "$work/data" --key-dir "$work/keys" --listen 127.0.0.1:0 --log-format json \
  --tls-cert "$work/tls/server.pem" --tls-key "$work/tls/server.key" \
  --tls-client-ca "$work/tls/ca.pem" --require-client-cert 2>"$work/log" &
server=$!
for _ in $(seq 1 100); do
  addr="$(grep -o '"addr":"[^"]*"' "$work/log" | head -1 | cut -d'"' -f4 || true)"
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { cat "$work/log"; echo "server did not start"; exit 1; }
token="$("$bin" token issue --key-dir "$work/keys" --sub interop --role front_desk,compliance)"
GRPC_VERBOSITY=NONE PYTHONPATH="$work" "$work/venv/bin/python" "$here/python_client.py" "$addr" "$token" "$work/tls"
