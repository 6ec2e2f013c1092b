# shellcheck shell=bash
# Sourced by scripts/package.sh and scripts/arm-e2e.sh: cross-building the edge agent for
# 64-bit ARM boards (aarch64-unknown-linux-gnu) with Debian's cross gcc, and running it here
# with qemu-user. Defines variables and functions only.
#
# The linker and C compiler (ring builds C and assembly) come from the environment rather
# than a committed .cargo/config.toml, so native builds never see them.

AARCH64_TARGET=aarch64-unknown-linux-gnu
# The aarch64 libc of libc6-dev-arm64-cross (also qemu-aarch64's -L).
AARCH64_SYSROOT=${AARCH64_SYSROOT:-/usr/aarch64-linux-gnu}
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
# No strip tool is needed: the agent's profile (release-small) strips at link time, and
# cargo-deb sees that and leaves the binary alone.

# aarch64_toolchain [qemu]: succeed when cross-building (and, with "qemu", running the result
# under qemu-user) works, installing what is missing (rustup target, Debian packages) when
# possible. Otherwise print why on stderr and fail.
aarch64_toolchain() {
  local want_qemu=${1:-} need=()
  if ! rustup target list --installed 2>/dev/null | grep -qx "$AARCH64_TARGET"; then
    rustup target add "$AARCH64_TARGET" >/dev/null 2>&1 || {
      echo "cannot add the Rust target $AARCH64_TARGET (rustup target add failed)" >&2
      return 1
    }
  fi
  command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu)
  [ -f "$AARCH64_SYSROOT/lib/libc.so.6" ] || need+=(libc6-dev-arm64-cross)
  if [ "$want_qemu" = qemu ]; then
    command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
  fi
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
      echo "missing ${need[*]}, and not root to install them" >&2
      return 1
    fi
    echo "installing ${need[*]}" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; } \
      >/dev/null 2>&1 || {
      echo "cannot install ${need[*]} with apt-get (no network or no such package)" >&2
      return 1
    }
    command -v aarch64-linux-gnu-gcc >/dev/null && [ -f "$AARCH64_SYSROOT/lib/libc.so.6" ] &&
      { [ "$want_qemu" != qemu ] || command -v qemu-aarch64 >/dev/null; } || {
      echo "installed ${need[*]}, but the cross toolchain is still incomplete" \
        "(aarch64-linux-gnu-gcc, $AARCH64_SYSROOT/lib/libc.so.6, qemu-aarch64)" >&2
      return 1
    }
  fi
}
