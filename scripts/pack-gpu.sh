#!/usr/bin/env bash
# Packs the tests and the benchmark for the GPU box (../shared/gpu/pack.sh), then drops what the box
# never loads (code-coverage and Windows/macOS/ARM native folders, BenchmarkDotNet's disassembler and
# Windows tracing libraries, which its in-process toolchain does not load, symbols and XML docs), so that .gpu/ fits the device tool's 64 MiB carry.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
../shared/gpu/pack.sh StickBreaking.ILGPU.Tests StickBreaking.ILGPU.Bench
rm -rf .gpu/StickBreaking.ILGPU.Tests/{CodeCoverage,alpine,macos,ubuntu,arm64,x86,x64} \
       .gpu/StickBreaking.ILGPU.Bench/{amd64,arm64,x86,runtimes} \
       .gpu/StickBreaking.ILGPU.Bench/{Iced,Gee.External.Capstone,Dia2Lib,TraceReloggerLib,Microsoft.Diagnostics.Tracing.TraceEvent}.dll
find .gpu -name '*.pdb' -delete
find .gpu -name '*.xml' -delete
du -sh .gpu | sed 's/^/carry size after pruning: /' >&2
