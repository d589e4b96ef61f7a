#!/usr/bin/env bash
# The simpul demo, in one command on a fresh Debian 12:
#   installs what is missing, builds, starts a local mosquitto (127.0.0.1:1883), the
#   simulated Dumai pumps and streetlights (simpul-sim on 127.0.0.1:15020) and simpul with
#   config/dumai-demo.json, then shows the live MQTT feed. Ctrl-C stops everything.
#
#   scripts/demo.sh                  run until Ctrl-C
#   scripts/demo.sh --duration 60    run 60 s, then stop (prints simpul's RSS and CPU time)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
duration=0
if [ "${1:-}" = "--duration" ]; then
  duration=${2:?--duration needs seconds}
fi

bash scripts/install-deps.sh
if [ ! -f build/build.ninja ]; then
  meson setup build --buildtype=release >/dev/null
fi
ninja -C build >/dev/null

RUN=$ROOT/demo-data
mkdir -p "$RUN"
pids=()
cleanup() {
  trap - EXIT INT TERM
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[$i]}" 2>/dev/null || true
  done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  echo "demo stopped; logs in $RUN/"
}
trap cleanup EXIT INT TERM

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # port, what
  for _ in $(seq 1 100); do port_open "$1" && return 0; sleep 0.1; done
  echo "demo: $2 did not start on port $1; see $RUN/" >&2
  exit 1
}

if port_open 1883; then
  echo "demo: an MQTT broker is already listening on 127.0.0.1:1883; using it"
else
  cat >"$RUN/mosquitto.conf" <<EOF
listener 1883 127.0.0.1
allow_anonymous true
persistence false
EOF
  /usr/sbin/mosquitto -c "$RUN/mosquitto.conf" >"$RUN/mosquitto.log" 2>&1 &
  pids+=($!)
  wait_port 1883 mosquitto
fi

if port_open 15020; then
  echo "demo: port 15020 is taken (another simpul-sim?); stop it first" >&2
  exit 1
fi
build/tests/sim/simpul-sim --port 15020 >"$RUN/simpul-sim.log" 2>&1 &
pids+=($!)
wait_port 15020 simpul-sim

build/gateway/simpul -c config/dumai-demo.json --plugin-dir build/protocols/modbus \
  >"$RUN/simpul.log" 2>&1 &
simpul_pid=$!
pids+=($simpul_pid)

cat <<EOF

  simpul demo: 3 pumps and 8 streetlights of Dumai, polled over Modbus TCP, published to MQTT.
  Live feed below (topic payload). In another terminal, try a command:
    mosquitto_pub -q 1 -t simpul/dumai-gw-01/pump-03/cmd -m '{"id":"start-1","op":"write","tag":"running","value":true}'
    mosquitto_sub -v -t 'simpul/dumai-gw-01/+/cmd/result'
  Logs: $RUN/simpul.log   Stop: Ctrl-C

EOF

if [ "$duration" -gt 0 ]; then
  mosquitto_sub -h 127.0.0.1 -p 1883 -v -t 'simpul/#' &
  sub_pid=$!
  pids+=($sub_pid)
  t0=$(date +%s)
  sleep "$duration" # the demo's own run time, not a synchronisation
  ticks=$(awk '{print $14 + $15}' "/proc/$simpul_pid/stat")
  hz=$(getconf CLK_TCK)
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$simpul_pid/status")
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$simpul_pid/status")
  echo
  echo "demo: simpul after $(($(date +%s) - t0)) s: RSS ${rss} kB (peak ${hwm} kB)," \
       "CPU $(awk -v t="$ticks" -v h="$hz" 'BEGIN {printf "%.2f", t / h}') s"
  exit 0
fi
mosquitto_sub -h 127.0.0.1 -p 1883 -v -t 'simpul/#'
