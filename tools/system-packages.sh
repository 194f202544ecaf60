#!/usr/bin/env bash
# Debian packages the optional features and their tests use, installed when missing (needs root):
# ffmpeg/ffprobe (checking outputs as a client would), nginx with the RTMP module (a real RTMP
# server), chromium (the live page in a real browser).
set -euo pipefail
PACKAGES=(ffmpeg nginx libnginx-mod-rtmp chromium)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${missing[*]}; install them with: sudo apt-get install -y ${missing[*]}" >&2
    exit 0  # the tests that need them skip with a reason
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${missing[@]}" >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
