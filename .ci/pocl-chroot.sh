#!/usr/bin/env bash
# .ci/pocl-chroot.sh: a cached Debian trixie chroot with PoCL 6 (OpenCL on the CPU), used by
# .ci/run to run the published test executable against a real OpenCL device.
#
# Why: bookworm only has PoCL 3.1, which ILGPU refuses (no OpenCL C 2.0 generic address space);
# trixie's PoCL 6 needs glibc 2.38, so it lives in a chroot. See docs/testing.md, "CI".
#
#   pocl-chroot.sh ensure
#       Build the chroot at $POCL_ROOT (default /opt/trixie-pocl) unless a complete one is there
#       (marker file .pocl-ready holding the recipe below). A missing or different marker means a
#       half-built or outdated chroot: it is removed (never across a mount) and built afresh.
#       From scratch 1.5 to 2.5 min here (debootstrap: about 1 min of download, ~130 MB, and 50 s
#       of unpacking; ~830 MB on disk); cached: instant.
#   pocl-chroot.sh run PUBDIR [NAME=VALUE ...] DLL [ARGS ...]
#       Copy this machine's .NET runtime to /dn and PUBDIR to /app in the chroot, mount /proc and
#       /sys (unmounted again by a trap), and run `/dn/dotnet /app/DLL ARGS` under `env -i` with
#       only PATH, HOME, LANG and the NAME=VALUE pairs given. Exits with the test program's status
#       (124 if it ran past $POCL_TIMEOUT seconds, default 2100).
#
# Never bind-mounts /dev (debootstrap's static nodes suffice) so that removing the chroot is safe.
set -euo pipefail

POCL_ROOT=${POCL_ROOT:-/opt/trixie-pocl}
ROOT=$POCL_ROOT
PKGS=pocl-opencl-icd,ocl-icd-libopencl1,ocl-icd-opencl-dev,ca-certificates,libicu76
# Change RECIPE (or PKGS) to force every cached chroot to be rebuilt.
RECIPE="v1 trixie minbase $PKGS"
MARKER=$ROOT/.pocl-ready

log() { echo "[pocl-chroot] $*" >&2; }

# Unmount everything mounted at or below $1, deepest first. Fails if something stays mounted.
unmount_below() {
  local dir=$1 m
  [ -e "$dir" ] || return 0
  dir=$(readlink -f "$dir")
  # findmnt lists mount targets; keep those equal to or below $dir, deepest first.
  local mounts
  mounts=$(findmnt -rn -o TARGET | awk -v d="$dir" '$0==d || index($0, d"/")==1' | sort -r) || true
  for m in $mounts; do
    log "unmounting stale mount $m"
    umount "$m" 2>/dev/null || umount -l "$m" || true
  done
  if findmnt -rn -o TARGET | awk -v d="$dir" '$0==d || index($0, d"/")==1' | grep -q .; then
    log "still mounted below $dir; refusing to go on"; return 1
  fi
}

# Remove a directory tree, but only after making sure nothing is mounted inside it, and never
# crossing into another file system.
safe_rm() {
  local dir=$1
  [ -e "$dir" ] || return 0
  case "$(readlink -f "$dir")" in
    /|/opt|/usr|/var|/home|/root|/tmp|/proc|/sys|/dev) log "refusing to remove $dir"; return 1 ;;
  esac
  unmount_below "$dir"
  rm -rf --one-file-system "$dir"
}

debian_mirror() {
  local m=""
  if [ -r /etc/apt/sources.list.d/debian.sources ]; then
    m=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  fi
  if [ -z "$m" ] && [ -r /etc/apt/sources.list ]; then
    m=$(awk '$1=="deb" && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list)
  fi
  echo "${m:-http://deb.debian.org/debian}"
}

ensure() {
  if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$RECIPE" ] && [ -x "$ROOT/usr/bin/env" ]; then
    log "cached chroot at $ROOT is ready"
    return 0
  fi
  local t0=$SECONDS
  if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends debootstrap >/dev/null
  fi
  local mirror tmp=$ROOT.partial
  mirror=$(debian_mirror)
  log "building $ROOT from scratch (debootstrap trixie from $mirror)"
  # A half-built tree from an interrupted run, at either path, is thrown away.
  safe_rm "$tmp"
  safe_rm "$ROOT"
  if ! debootstrap --variant=minbase --include="$PKGS" trixie "$tmp" "$mirror" \
       > "$(dirname "$ROOT")/trixie-pocl-debootstrap.log" 2>&1; then
    log "debootstrap failed; its log (tail):"
    tail -n 30 "$(dirname "$ROOT")/trixie-pocl-debootstrap.log" >&2 || true
    unmount_below "$tmp" || true
    return 1
  fi
  # debootstrap unmounts what it mounted; make sure before the tree is moved.
  unmount_below "$tmp"
  chroot "$tmp" apt-get clean
  echo "$RECIPE" > "$tmp/.pocl-ready"
  mv "$tmp" "$ROOT"
  log "chroot built in $((SECONDS - t0)) s"
}

cleanup_mounts() {
  local m
  for m in "$ROOT/sys" "$ROOT/proc"; do
    if mountpoint -q "$m"; then umount "$m" || umount -l "$m" || true; fi
  done
}

run() {
  [ $# -ge 2 ] || { log "usage: $0 run PUBDIR [NAME=VALUE ...] DLL [ARGS ...]"; return 64; }
  local pubdir=$1; shift
  local -a envs=()
  while [ $# -gt 0 ] && [[ $1 == *=* ]] && [[ $1 != *.dll ]]; do envs+=("$1"); shift; done
  [ $# -ge 1 ] || { log "no DLL given"; return 64; }
  local dll=$1; shift
  [ -f "$pubdir/$dll" ] || { log "$pubdir/$dll not found"; return 66; }
  [ -f "$MARKER" ] || { log "chroot not ready; run '$0 ensure' first"; return 1; }

  local dn
  dn=$(dirname "$(readlink -f "$(command -v dotnet)")")

  trap cleanup_mounts EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  cleanup_mounts            # stale mounts of a run that was killed
  mount -t proc proc "$ROOT/proc"
  mount -t sysfs sysfs "$ROOT/sys"

  # /dn and /app hold no mounts (only /proc and /sys are ever mounted), so plain removal is safe.
  safe_rm "$ROOT/dn"
  safe_rm "$ROOT/app"
  mkdir -p "$ROOT/dn/shared" "$ROOT/app"
  cp -a "$dn/dotnet" "$dn/host" "$ROOT/dn/"
  cp -a "$dn/shared/Microsoft.NETCore.App" "$ROOT/dn/shared/"
  cp -a "$pubdir/." "$ROOT/app/"

  local rc=0
  # The time limit kills the test program itself, so the trap still unmounts after a hang.
  timeout --foreground -k 30 "${POCL_TIMEOUT:-2100}" chroot "$ROOT" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
    DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1 "${envs[@]}" \
    /dn/dotnet "/app/$dll" "$@" || rc=$?
  return $rc
}

# One user of the chroot at a time (two CI runs on one machine must not rebuild it under each other).
mkdir -p "$(dirname "$ROOT")"
exec 9>"$ROOT.lock"
flock -w 1200 9 || { log "could not lock $ROOT.lock"; exit 1; }

case "${1:-}" in
  ensure) shift; ensure "$@" ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 ensure | run PUBDIR [NAME=VALUE ...] DLL [ARGS ...]" >&2; exit 64 ;;
esac
