#!/usr/bin/env bash
# Builds simpul's Debian packages (simpul, simpul-dev) from a clean copy of the source tree and
# checks them with lintian. The copy keeps dpkg-buildpackage's by-products (obj-*/, debian/tmp,
# the .debs it writes next to the source) out of the worktree.
#   scripts/build-deb.sh [OUTDIR]      (default: build-deb/; prints the .deb paths at the end)
# DEB_BUILD_OPTIONS is passed through; CI sets nocheck (the unit tests ran already).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-build-deb}")
work=$(mktemp -d /tmp/simpul-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/simpul" "$out"
# Every tracked file plus new ones not ignored: what the next commit would hold.
git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
  tar --null -T - -cf - | tar -xf - -C "$work/simpul"
(cd "$work/simpul" && dpkg-buildpackage -b -us -uc) >"$out/dpkg-buildpackage.log" 2>&1 || {
  tail -40 "$out/dpkg-buildpackage.log"; exit 1; }
rm -f "$out"/*.deb
cp "$work"/*.deb "$work"/*.changes "$work"/*.buildinfo "$out"/
# --fail-on warning: an error or a warning fails the build; every override is explained in
# debian/*.lintian-overrides.
lintian --fail-on error,warning --info --display-info "$out"/*.changes | tee "$out/lintian.log"
ls "$out"/*.deb
