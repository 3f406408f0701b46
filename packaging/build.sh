#!/usr/bin/env bash
# Builds the .deb and .rpm packages of drover-agent and drover-coordinator (with the drover CLI).
#
#   packaging/build.sh [OUT_DIR] [--revision N]
#
# Needs cargo-deb and cargo-generate-rpm (cargo install --locked cargo-deb cargo-generate-rpm).
# Packages land in OUT_DIR (default: $CARGO_TARGET_DIR/packages, else target/packages).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
out=$target/packages
revision=1
while [ $# -gt 0 ]; do
  case $1 in
    --revision) revision=$2; shift 2 ;;
    *) out=$1; shift ;;
  esac
done
mkdir -p "$out"
cd "$root"
cargo build --release --locked -p drover-agent -p drover-coordinator --bins
for pkg in drover-agent drover-coordinator; do
  cargo deb -p "$pkg" --no-build --deb-revision "$revision" -o "$out/"
done
for dir in agent coordinator; do
  cargo generate-rpm -p "$dir" --target-dir "$target" -s "release = \"$revision\"" -o "$out/"
done
ls -1 "$out"/*-"$revision"_*.deb "$out"/*-"$revision".*.rpm
