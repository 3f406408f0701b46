#!/usr/bin/env bash
# Packages the hello demo service as a drover artifact.
#
#   examples/hello/package.sh VERSION OUT_DIR [--broken | --broken-on HOST,HOST]
#
# Writes OUT_DIR/hello-VERSION.tar.gz and prints its sha256. With --broken the release's
# health check fails (FAIL_HEALTH=1 in release.env): drover must roll it back. With
# --broken-on it fails only on those hosts (the service passes HELLO_HOST={host}).
# Needs the hello binary built: cargo build -p drover-example-hello
set -euo pipefail
version=${1:?usage: package.sh VERSION OUT_DIR [--broken | --broken-on HOSTS]}
out=${2:?usage: package.sh VERSION OUT_DIR [--broken | --broken-on HOSTS]}
broken=${3:-}
broken_hosts=${4:-}
here=$(cd "$(dirname "$0")" && pwd)
target=${CARGO_TARGET_DIR:-$here/../../target}
bin="$target/debug/hello"
[ -x "$bin" ] || { echo "package.sh: $bin not found; run: cargo build -p drover-example-hello" >&2; exit 1; }

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/config"
cp "$bin" "$stage/bin/hello"
cp "$here/release/drain" "$stage/bin/drain"
cp "$here/release/app.env.tmpl" "$stage/config/app.env.tmpl"
{
  echo "VERSION=$version"
  if [ "$broken" = "--broken" ]; then echo "FAIL_HEALTH=1"; fi
  if [ "$broken" = "--broken-on" ]; then echo "FAIL_ON_HOSTS=$broken_hosts"; fi
} > "$stage/release.env"
chmod 755 "$stage/bin/hello" "$stage/bin/drain"
mkdir -p "$out"
file="$out/hello-$version.tar.gz"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$stage" -cf - . | gzip -n > "$file"
sha256sum "$file" | cut -d' ' -f1
