#!/usr/bin/env bash
# Installs Debian's Chromium for the kedro-viz rendering test when it is missing.
# Only root can apt-get; elsewhere the test reports that Chromium is absent (and fails under CI=true).
set -u
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing chromium for the kedro-viz test (apt-get, about 30 s)..."
  apt-get update -qq >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
    || echo "warning: could not install chromium; the kedro-viz rendering test will report it"
else
  echo "note: chromium not found and not root; the kedro-viz rendering test will report it"
fi
exit 0
