#!/usr/bin/env bash
# scripts/publish-gpu.sh [--with-runtime] [OUT]
#
# Prepares a folder (default .gpu/, git-ignored) to copy to a Linux x64 machine with an NVIDIA GPU
# (or any other accelerator) and run the tests and the benchmark there without building:
#   OUT/StickBreaking.ILGPU.Tests/  framework-dependent Release publish of the test executable
#   OUT/StickBreaking.ILGPU.Bench/  the same for the benchmark (main job, --throughput, --bdn)
#   OUT/peers.py                    PyTorch / Triton peer timings (scripts/peers.py)
#   OUT/run.sh                      bash OUT/run.sh <Project> [args...]  runs `dotnet <Project>.dll args`
#   OUT/dotnet.tar.xz               with --with-runtime only: this machine's .NET runtime, which run.sh
#                                   unpacks once into $TMPDIR, for a machine without .NET
# Without --with-runtime, run.sh uses the `dotnet` (the .NET 10 runtime) on the machine's PATH.
#
# What a Linux x64 machine never loads is dropped: code-coverage and Windows, macOS, Alpine and ARM
# native folders, BenchmarkDotNet's disassemblers and Windows tracing libraries (its in-process
# toolchain does not load them), translated resources, symbols and XML docs. The folder is about
# 33 MiB, 57 MiB with the runtime.
#
# Then, on the GPU machine, for example:
#   bash .gpu/run.sh StickBreaking.ILGPU.Tests                     # the suite on every backend present
#   bash .gpu/run.sh StickBreaking.ILGPU.Bench                     # the main job
#   bash .gpu/run.sh StickBreaking.ILGPU.Bench --throughput Cuda 4 12 128 1024 4096 > ours.jsonl
#   python3 .gpu/peers.py 4 12 128 1024 4096 > peers.jsonl
set -euo pipefail

with_runtime=0
out=""
for arg in "$@"; do
  case "$arg" in
    --with-runtime) with_runtime=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "publish-gpu.sh: unknown option $arg (see --help)" >&2; exit 64 ;;
    *) [ -z "$out" ] || { echo "publish-gpu.sh: one output folder only" >&2; exit 64; }; out=$arg ;;
  esac
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
out=${out:-.gpu}
mkdir -p "$out"
out=$(cd "$out" && pwd)
case "$out" in
  "$root"|/) echo "publish-gpu.sh: refusing to publish into $out" >&2; exit 64 ;;
esac
export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1

projects=(StickBreaking.ILGPU.Tests StickBreaking.ILGPU.Bench)
for p in "${projects[@]}"; do
  echo "publishing $p into $out/$p" >&2
  rm -rf "${out:?}/$p"
  dotnet publish "$p/$p.csproj" -c Release -o "$out/$p" -p:UseAppHost=false -p:SatelliteResourceLanguages=en --nologo -v q >&2
done

rm -rf "$out"/StickBreaking.ILGPU.Tests/{CodeCoverage,alpine,macos,ubuntu,arm64,x86,x64} \
       "$out"/StickBreaking.ILGPU.Bench/{amd64,arm64,x86,runtimes} \
       "$out"/StickBreaking.ILGPU.Bench/{Iced,Gee.External.Capstone,Dia2Lib,TraceReloggerLib,Microsoft.Diagnostics.Tracing.TraceEvent}.dll
find "$out" \( -name '*.pdb' -o -name '*.xml' \) -type f -delete

cp scripts/peers.py "$out/peers.py"

if [ "$with_runtime" -eq 1 ]; then
  dn=$(dirname "$(readlink -f "$(command -v dotnet)")")
  rt=$(ls -d "$dn"/shared/Microsoft.NETCore.App/* | sort -V | tail -n 1)
  version=$(basename "$rt")
  if [ ! -f "$out/dotnet.tar.xz" ] || [ "$(cat "$out/dotnet.version" 2>/dev/null)" != "$version" ]; then
    echo "packing the .NET runtime $version (about a minute; reused on later runs)" >&2
    tmp=$(mktemp -d)
    mkdir -p "$tmp/dn/shared/Microsoft.NETCore.App"
    cp -a "$dn/dotnet" "$dn/host" "$tmp/dn/"
    cp -a "$rt" "$tmp/dn/shared/Microsoft.NETCore.App/"
    XZ_OPT="-T0 -9" tar -cJf "$out/dotnet.tar.xz" -C "$tmp" dn
    echo "$version" > "$out/dotnet.version"
    rm -rf "$tmp"
  fi
else
  rm -f "$out/dotnet.tar.xz" "$out/dotnet.version"
fi

cat > "$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# bash run.sh <Project> [args...]: runs a project published by scripts/publish-gpu.sh as
# `dotnet <Project>/<Project>.dll args`. Uses the runtime packed beside this script (dotnet.tar.xz,
# unpacked once into $TMPDIR) when there is one, else the machine's own `dotnet`.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ $# -ge 1 ] || { echo "usage: bash $0 <Project> [args...]; projects: $(cd "$here" && ls -d StickBreaking.* | tr '\n' ' ')" >&2; exit 64; }
if [ -f "$here/dotnet.tar.xz" ]; then
  dn=${TMPDIR:-/tmp}/stickbreaking-dotnet-$(cat "$here/dotnet.version")
  if [ ! -x "$dn/dotnet" ]; then
    mkdir -p "$dn.partial"
    tar -xJf "$here/dotnet.tar.xz" -C "$dn.partial"
    rm -rf "$dn" && mv "$dn.partial/dn" "$dn" && rm -rf "$dn.partial"
  fi
  export DOTNET_ROOT=$dn PATH=$dn:$PATH
elif ! command -v dotnet >/dev/null; then
  echo "run.sh: no dotnet on PATH and no packed runtime; install the .NET 10 runtime or publish with --with-runtime" >&2
  exit 127
fi
export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1
p=$1; shift
[ -f "$here/$p/$p.dll" ] || { echo "run.sh: $here/$p/$p.dll not found" >&2; exit 66; }
exec dotnet "$here/$p/$p.dll" "$@"
RUN
chmod +x "$out/run.sh"
du -sh "$out" | sed 's/^/published: /' >&2
