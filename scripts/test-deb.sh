#!/usr/bin/env bash
# CI step: the Debian packages, built, listed, installed and checked on this machine.
#   1. build simpul + simpul-dev (scripts/build-deb.sh: lintian must be clean), list them and
#      check that every file the integrator needs is in the right package, the config a conffile;
#   2. dpkg -i both; the system user exists and is in dialout, /var/lib/simpul is its own, and
#      `simpul --check` passes on the installed config as that user (what ExecStartPre runs);
#   3. systemd-analyze verify on the installed unit, and its sandbox exposure at most 2.0;
#   4. an upgrade (dpkg -i again) keeps an edited conffile and the store, and its postinst
#      restarts the service;
#   5. the packages are purged again if they were not installed before.
# Prints "deb: OK" or the first failure; exits non-zero on failure. Needs root (or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
out=build-deb
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
fail() { echo "deb: FAILED: $*"; exit 1; }

DEB_BUILD_OPTIONS="nocheck ${DEB_BUILD_OPTIONS:-}" scripts/build-deb.sh "$out" >"$out.log" 2>&1 ||
  { tail -40 "$out.log"; fail "package build or lintian (log: $out.log)"; }
deb=$(ls "$out"/simpul_*_*.deb)
dev=$(ls "$out"/simpul-dev_*_*.deb)
echo "=== deb: built $(basename "$deb") $(basename "$dev"), lintian clean"

contents=$(dpkg-deb -c "$deb" | awk '{print $6}')
for f in ./usr/bin/simpul ./usr/bin/simpul-sim ./etc/simpul/simpul.json \
  ./lib/systemd/system/simpul.service ./usr/lib/sysusers.d/simpul.conf \
  ./usr/lib/tmpfiles.d/simpul.conf ./usr/share/simpul/simpul.schema.json \
  ./usr/share/doc/simpul/install.md ./usr/share/doc/simpul/config.md \
  ./usr/share/man/man1/simpul.1; do
  # dh_compress gzips documentation above 4 KiB and every manual page.
  grep -qxE -- "$f(\.gz)?" <<<"$contents" || fail "$f is not in $(basename "$deb")"
done
grep -qE '^\./usr/lib/[^/]+/simpul/plugins/modbus\.so$' <<<"$contents" ||
  fail "the Modbus plugin is not in $(basename "$deb")"
[ "$(dpkg-deb -I "$deb" conffiles)" = "/etc/simpul/simpul.json" ] || fail "conffiles"
dpkg-deb -I "$deb" postinst | grep -q '_dh_action=restart' || fail "postinst does not restart"
devc=$(dpkg-deb -c "$dev" | awk '{print $6}')
grep -qx ./usr/include/simpul/plugin.h <<<"$devc" || fail "plugin.h is not in simpul-dev"
grep -qE '^\./usr/lib/[^/]+/pkgconfig/simpul-plugin\.pc$' <<<"$devc" ||
  fail "simpul-plugin.pc is not in simpul-dev"
echo "=== deb: contents OK"

was_installed=0
dpkg-query -W -f='${Status}' simpul 2>/dev/null | grep -q "install ok installed" && was_installed=1
had_state=0
[ -e /var/lib/simpul ] && had_state=1
cleanup() {
  if [ $was_installed -eq 0 ]; then
    $SUDO dpkg --purge simpul-dev simpul >/dev/null 2>&1 || true
    [ $had_state -eq 1 ] || $SUDO rm -rf /var/lib/simpul
  fi
}
trap cleanup EXIT
$SUDO dpkg -i "$deb" "$dev" >"$out/dpkg-i.log" 2>&1 || { cat "$out/dpkg-i.log"; fail "dpkg -i"; }
getent passwd simpul >/dev/null || fail "no system user simpul"
id -nG simpul | tr ' ' '\n' | grep -qx dialout || fail "simpul is not in dialout"
[ "$(stat -c %U /var/lib/simpul)" = simpul ] || fail "/var/lib/simpul is not owned by simpul"
check=$($SUDO runuser -u simpul -- simpul -c /etc/simpul/simpul.json --check 2>&1) ||
  fail "simpul --check on the installed config: $check"
echo "=== deb: installed; as user simpul: $check"
verify=$(systemd-analyze verify /lib/systemd/system/simpul.service 2>&1) ||
  fail "systemd-analyze verify: $verify"
[ -z "$verify" ] || fail "systemd-analyze verify: $verify"
exposure=$(systemd-analyze security --offline=yes /lib/systemd/system/simpul.service 2>&1 |
  sed -n 's/.*Overall exposure level for simpul.service: \([0-9.]*\).*/\1/p')
awk -v x="${exposure:-99}" 'BEGIN { exit !(x <= 2.0) }' ||
  fail "systemd-analyze security: exposure ${exposure:-unknown} > 2.0"
echo "=== deb: systemd-analyze verify OK, security exposure $exposure"

# Upgrade: the integrator's edit of the conffile and the store survive.
$SUDO sed -i 's/"site-gw-01"/"upgrade-gw"/' /etc/simpul/simpul.json
$SUDO runuser -u simpul -- sh -c 'echo store > /var/lib/simpul/simpul.db'
$SUDO dpkg -i "$deb" >"$out/dpkg-upgrade.log" 2>&1 || { cat "$out/dpkg-upgrade.log"; fail "upgrade"; }
grep -q '"upgrade-gw"' /etc/simpul/simpul.json || fail "the upgrade replaced the edited conffile"
[ "$(cat /var/lib/simpul/simpul.db)" = store ] || fail "the upgrade lost the store"
echo "=== deb: upgrade keeps the conffile and the store"
echo "deb: OK"
