#!/usr/bin/env bash
# scripts/ptxas-local.sh [-maxrregcount N] PTX_DIR_OR_FILE...
#
# What ptxas makes of the tensor-core kernels' PTX, on a machine without a GPU or a CUDA toolkit: registers, spills,
# stack, ptxas's performance warnings (C7514/C7515: wgmma serialized) and a histogram of the SASS instructions per
# kernel (HMMA, HGMMA, MUFU, LDGSTS ...). The PTX comes from the PTX tests:
#   STICKBREAKING_PTX_DIR=/tmp/ptx STICKBREAKING_BACKENDS=Cpu dotnet test StickBreaking.ILGPU.Tests \
#     --filter "FullyQualifiedName~PtxTests"
#   scripts/ptxas-local.sh /tmp/ptx
# ptxas and cuobjdump come from Debian's nvidia-cuda-toolkit 12.4 (trixie, non-free; about 87 MB, downloaded once
# with apt-get into ~/.cache/stickbreaking-ptxas, nothing installed). ILGPU 1.5.3 writes PTX ISA 8.8, which this
# ptxas does not know; the kernels use nothing newer than 8.4, so the copy compiled here says 8.4. The Hopper plan's
# PTX (sm_90a) compiles for sm_90a, the rest for sm_90. -maxrregcount: the launch bound the library gives the kernel
# (168 for three groups of 128 threads a SM, 255 for one or two); default 168.
set -euo pipefail
maxreg=168
if [[ ${1:-} == -maxrregcount ]]; then maxreg=$2; shift 2; fi
[ $# -ge 1 ] || { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 64; }

cache=${XDG_CACHE_HOME:-$HOME/.cache}/stickbreaking-ptxas
bin=$cache/x/usr/bin
if [ ! -x "$bin/ptxas" ]; then
  echo "fetching Debian trixie's nvidia-cuda-toolkit into $cache (once)" >&2
  mkdir -p "$cache/lists/partial" "$cache/archives/partial"
  echo "deb http://deb.debian.org/debian trixie non-free" > "$cache/sources.list"
  apt=(-o Dir::Etc::SourceList="$cache/sources.list" -o Dir::Etc::SourceParts=/dev/null
       -o Dir::State::Lists="$cache/lists" -o Dir::Cache::Archives="$cache/archives")
  apt-get "${apt[@]}" update > "$cache/update.log" 2>&1
  (cd "$cache" && apt-get "${apt[@]}" download nvidia-cuda-toolkit > "$cache/download.log" 2>&1)
  dpkg-deb -x "$cache"/nvidia-cuda-toolkit_*.deb "$cache/x"
  rm -f "$cache"/nvidia-cuda-toolkit_*.deb
fi

tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
files=()
for a in "$@"; do
  if [ -d "$a" ]; then files+=("$a"/*.ptx); else files+=("$a"); fi
done
for f in "${files[@]}"; do
  arch=sm_90
  grep -q '^\.target sm_90a' "$f" && arch=sm_90a
  sed 's/^\.version 8\.[5-9]$/.version 8.4/' "$f" > "$tmp/k.ptx"
  echo "== $(basename "$f") ($arch, -maxrregcount $maxreg)"
  "$bin/ptxas" -arch="$arch" -O3 -v -maxrregcount "$maxreg" "$tmp/k.ptx" -o "$tmp/k.cubin" 2>&1 \
    | grep -E "registers|spill|stack frame|C75[0-9][0-9]|error" | sed 's/^ptxas info *: //'
  "$bin/cuobjdump" -sass "$tmp/k.cubin" | grep -oE '^\s+/\*[0-9a-f]+\*/\s+(@!?U?P[A-Z0-9]+\s+)?[A-Z][A-Z0-9_]*' \
    | awk '{ print $NF }' | sort | uniq -c | sort -rn | head -16 | awk '{ printf "%8d  %s\n", $1, $2 }'
done
