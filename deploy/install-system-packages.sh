#!/usr/bin/env bash
# Debian packages Tally needs beside Python: Java 17+ and Maven (Kafka's broker jars come from
# Maven Central), and with --tests what only the tests use: clickhouse-server, the server
# backend every sink test runs on (`tally run` uses embedded ClickHouse and needs no server),
# and clickhouse-client, with which a test logs in as the analyst user; prometheus, for
# promtool, which checks and unit-tests the alerting rules;
# kcat, a Kafka client on librdkafka that produces compressed batches as non-Python
# clients do; chromium, the browser the browser SDK tests drive through Playwright (a WebRTC
# call on fake media); and wrk, the HTTP load generator of the collector's benchmark.
# Installs only what is missing; needs root or sudo for that.
set -euo pipefail

missing=()
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
if [ "${1:-}" = "--tests" ]; then
  [ -x /usr/sbin/clickhouse-server ] || [ -x /usr/bin/clickhouse-server ] || missing+=(clickhouse-server)
  command -v clickhouse-client >/dev/null || missing+=(clickhouse-client)
  command -v promtool >/dev/null || missing+=(prometheus)
  command -v kcat >/dev/null || missing+=(kcat)
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  command -v wrk >/dev/null || missing+=(wrk)
elif [ -n "${1:-}" ]; then
  echo "usage: $0 [--tests]" >&2
  exit 2
fi
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing Debian packages: ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
