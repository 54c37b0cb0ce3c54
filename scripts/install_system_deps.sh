#!/usr/bin/env bash
# Headless rendering for robosuite needs Mesa's EGL (or OSMesa); the CPU kernels
# (dpjax/models/csrc/) need a C++ compiler; the Makefile runs Python on tcmalloc.
# Installs Debian packages only when missing.
set -euo pipefail
export PATH="$PATH:/sbin:/usr/sbin"  # ldconfig, for users whose PATH lacks them.
missing=()
ldconfig -p | grep -q 'libEGL.so.1' || missing+=(libegl1 libegl-mesa0)
ldconfig -p | grep -q 'libGL.so.1' || missing+=(libgl1 libgl1-mesa-dri)
ldconfig -p | grep -q 'libOSMesa.so' || missing+=(libosmesa6)
command -v g++ >/dev/null || command -v c++ >/dev/null || missing+=(g++)
ldconfig -p | grep -q 'libtcmalloc_minimal.so.4' || missing+=(libtcmalloc-minimal4)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "Missing system packages; run as root: apt-get install -y ${missing[*]}" >&2
  exit 1
fi
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
