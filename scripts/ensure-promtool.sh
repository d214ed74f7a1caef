#!/bin/sh
# promtool for tests/test_alert_rules.py (`promtool check rules`, `promtool test rules`),
# taken out of Debian's prometheus package into the virtualenv's bin/: installing the
# package would also install (and may start) a Prometheus server, which the tests never want.
# Usage: scripts/ensure-promtool.sh .venv/bin
set -eu
bin=$1
command -v promtool >/dev/null 2>&1 && exit 0
[ -x "$bin/promtool" ] && exit 0
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
  echo "note: no apt-get here: the promtool checks of the alert rules will be skipped"; exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! apt-get download -qq prometheus >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] && apt-get update -qq >/dev/null 2>&1 && apt-get download -qq prometheus >/dev/null 2>&1 \
    || { echo "note: could not fetch Debian's prometheus package: promtool checks skipped"; exit 0; }
fi
dpkg-deb -x prometheus_*.deb root
cd - >/dev/null
cp "$work/root/usr/bin/promtool" "$bin/promtool"
echo "promtool: $("$bin/promtool" --version 2>&1 | head -1)"
