#!/usr/bin/env bash
# Packages the hello demo service as a drover artifact.
#
#   examples/hello/package.sh VERSION OUT_DIR [--broken]
#
# Writes OUT_DIR/hello-VERSION.tar.gz and prints its sha256. With --broken the release's
# health check fails (FAIL_HEALTH=1 in release.env): drover must roll it back.
# Needs the hello binary built: cargo build -p drover-example-hello
set -euo pipefail
version=${1:?usage: package.sh VERSION OUT_DIR [--broken]}
out=${2:?usage: package.sh VERSION OUT_DIR [--broken]}
broken=${3:-}
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
} > "$stage/release.env"
chmod 755 "$stage/bin/hello" "$stage/bin/drain"
mkdir -p "$out"
file="$out/hello-$version.tar.gz"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$stage" -cf - . | gzip -n > "$file"
sha256sum "$file" | cut -d' ' -f1
