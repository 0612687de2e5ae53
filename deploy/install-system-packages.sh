#!/usr/bin/env bash
# Debian packages Tally needs beside Python: Java 17+ and Maven (Kafka's broker jars come from
# Maven Central), and with --clickhouse-server the server backend the tests run every sink
# test on (`tally run` uses embedded ClickHouse and needs no server).
# Installs only what is missing; needs root or sudo for that.
set -euo pipefail

missing=()
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
if [ "${1:-}" = "--clickhouse-server" ]; then
  [ -x /usr/sbin/clickhouse-server ] || [ -x /usr/bin/clickhouse-server ] || missing+=(clickhouse-server)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing Debian packages: ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
