#!/usr/bin/env bash
# Installs the Debian packages ctformer builds and tests against (idempotent).
set -euo pipefail
packages=(cmake g++ make ninja-build ccache libboost-dev libomp-dev catch2 libbenchmark-dev libopenblas-dev libopenmpi-dev openmpi-bin
          nlohmann-json3-dev libcli11-dev libcpp-httplib-dev pkg-config python3 python3-venv)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo_cmd=""
  [[ $(id -u) -ne 0 ]] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
