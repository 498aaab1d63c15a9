#!/usr/bin/env bash
# Debian packages for the service tests (tests/test_services.py: headless Chromium + chromedriver;
# tests/test_postgres.py: a PostgreSQL server). Idempotent and quiet: installs only what is missing,
# prints nothing on success, and shows apt's output only if it fails. Root or passwordless sudo.
set -euo pipefail

packages=(chromium chromium-driver postgresql fonts-liberation)

missing=()
for pkg in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
[ "${#missing[@]}" -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "services.sh: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  sudo="sudo -n"
fi

# The tests start their own throwaway PostgreSQL cluster; don't create and start a system one.
if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
  $sudo mkdir -p /etc/postgresql-common
  echo "create_main_cluster = false" | $sudo tee /etc/postgresql-common/createcluster.conf >/dev/null
fi

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! { $sudo apt-get update -qq &&
       $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "services.sh: could not install: ${missing[*]}" >&2
  exit 1
fi
