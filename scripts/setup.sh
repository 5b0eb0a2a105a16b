#!/usr/bin/env bash
# Installs what x2v needs to build, run and test, and nothing already there: Debian packages, and a
# Python venv with the pip torch wheel whose libtorch tch links against, plus the pinned reference
# libraries (diffusers, transformers) and the official openai client used by the tests.
# Idempotent: a second run only checks. Prints what it installed.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${VENV:-$HOME/.cache/x2v/venv}"
installed=()

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian packages: build (pkg-config, protoc, clang for bindgen), servers and tools the tests start.
apt_packages=(build-essential pkg-config protobuf-compiler clang libclang-dev cmake
              redis-server redis-tools ffmpeg iproute2)
# A python3 that can make venvs is enough (pyenv's is); otherwise Debian's.
command -v python3 >/dev/null && python3 -c 'import venv, ensurepip' 2>/dev/null ||
    apt_packages+=(python3 python3-venv)
missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    sudo_if_needed apt-get update -qq
    DEBIAN_FRONTEND=noninteractive sudo_if_needed apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    installed+=("apt: ${missing[*]}")
fi

# Python venv: torch first (its wheel carries libtorch), then the pinned requirements.
req="$root/tools/requirements.txt"
stamp="$venv/.x2v-requirements-$(sha256sum "$req" | cut -c1-16)"
if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating Python venv at $venv"
    python3 -m venv "$venv"
    installed+=("venv: $venv")
fi
if [ ! -f "$stamp" ]; then
    torch_pin="$(grep -E '^torch==' "$req")"
    echo "setup: installing $torch_pin and tools/requirements.txt into $venv (first time: a few minutes)"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "$torch_pin"
    "$venv/bin/python" -m pip install -q -r "$req"
    rm -f "$venv"/.x2v-requirements-*
    touch "$stamp"
    installed+=("pip: $(tr '\n' ' ' < <(grep -vE '^\s*(#|$)' "$req"))")
fi

if [ "${#installed[@]}" -eq 0 ]; then
    echo "setup: everything already installed (venv $venv)"
else
    printf 'setup: installed %s\n' "${installed[@]}"
fi
