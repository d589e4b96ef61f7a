#!/usr/bin/env bash
# Installs every Debian 12 package simpul needs to build, test, benchmark and run its demo.
# README, .ci/run and the demo all call this one script, so a package missing here fails
# everywhere at once instead of hiding on one machine.
set -euo pipefail

PKGS=(
  build-essential pkg-config meson ninja-build clang libclang-rt-14-dev clang-format
  libuv1-dev libmodbus-dev libmosquitto-dev libsqlite3-dev libjansson-dev libcmocka-dev
  mosquitto mosquitto-clients sqlite3
  python3 python3-pymodbus python3-serial python3-serial-asyncio python3-paho-mqtt python3-jsonschema
  socat mbpoll valgrind procps openssl util-linux
  libsnmp-dev snmpd snmp  # SNMP driver (#11)
  debhelper dpkg-dev lintian systemd libssl-dev  # issue 12: Debian package, systemd-analyze, TLS
  collectd-core linux-perf  # issue #9: the city bench runs collectd side by side; perf profiles
  libprotobuf-c-dev protobuf-c-compiler protobuf-compiler python3-protobuf # Sparkplug B (#13)
  zlib1g-dev  # outbox packs: an outage backlog deflated (#7)
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "install-deps: installing ${missing[*]}"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
