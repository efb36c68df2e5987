#!/usr/bin/env bash
# .ci/consume-package.sh WORKDIR: the package as an outsider gets it. Called by .ci/run; runs alone too.
#   1. dotnet pack StickBreaking.ILGPU into WORKDIR/feed (a folder feed);
#   2. a new console app in WORKDIR/consumer (outside the repository, so that neither the repository's
#      Directory.Build.props nor its global.json applies) with a real
#      <PackageReference Include="StickBreaking.ILGPU" Version="..."/>, restored from that folder plus the
#      machine's usual NuGet sources (for ILGPU), into a package cache of its own (WORKDIR/nuget-packages),
#      so that a cached older package of the same version cannot stand in for the one just packed;
#   3. its Program.cs is the README's first ```csharp block, unchanged; it is built and run, and this
#      script fails if it does not exit with 0.
# The consumer's build output stays in WORKDIR/consumer/bin/Release/net10.0 (consumer.dll), so that the
# caller can run it elsewhere (.ci/run runs it again with PoCL's OpenCL device).
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 WORKDIR (outside the repository, e.g. under /tmp)" >&2; exit 64; }
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
mkdir -p "$1"
WORKDIR=$(cd "$1" && pwd)
case "$WORKDIR/" in
  "$REPO"/*) echo "consume-package.sh: WORKDIR must be outside the repository" >&2; exit 64 ;;
esac
FEED=$WORKDIR/feed
APP=$WORKDIR/consumer
export NUGET_PACKAGES=$WORKDIR/nuget-packages
export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1 DOTNET_SKIP_FIRST_TIME_EXPERIENCE=1
rm -rf "$FEED" "$APP" "$NUGET_PACKAGES"

echo "--- dotnet pack StickBreaking.ILGPU -c Release -o $FEED"
dotnet pack StickBreaking.ILGPU -c Release -o "$FEED" --nologo -v q
nupkg=$(find "$FEED" -maxdepth 1 -name 'StickBreaking.ILGPU.*.nupkg' ! -name '*.snupkg' | head -n 1)
[ -n "$nupkg" ] || { echo "no .nupkg in $FEED" >&2; exit 1; }
version=$(basename "$nupkg" .nupkg); version=${version#StickBreaking.ILGPU.}
[ -f "$FEED/StickBreaking.ILGPU.$version.snupkg" ] || { echo "no symbol package (.snupkg) next to $nupkg" >&2; exit 1; }
echo "packed $(basename "$nupkg") and its .snupkg"

mkdir -p "$APP"
cat > "$APP/consumer.csproj" <<EOF
<Project Sdk="Microsoft.NET.Sdk">
  <PropertyGroup>
    <OutputType>Exe</OutputType>
    <TargetFramework>net10.0</TargetFramework>
    <ImplicitUsings>enable</ImplicitUsings>
    <Nullable>enable</Nullable>
  </PropertyGroup>
  <ItemGroup>
    <PackageReference Include="StickBreaking.ILGPU" Version="$version" />
  </ItemGroup>
</Project>
EOF
cat > "$APP/nuget.config" <<EOF
<?xml version="1.0" encoding="utf-8"?>
<configuration>
  <packageSources>
    <add key="stickbreaking-local-feed" value="$FEED" />
  </packageSources>
</configuration>
EOF
# The README's first C# block, unchanged.
awk '/^```csharp[[:space:]]*$/ { inside = 1; next } inside && /^```[[:space:]]*$/ { exit } inside { print }' \
  README.md > "$APP/Program.cs"
[ -s "$APP/Program.cs" ] || { echo "README.md has no \`\`\`csharp block" >&2; exit 1; }
echo "Program.cs: the README's first csharp block, $(wc -l < "$APP/Program.cs") lines"

echo "--- dotnet build (restore from $FEED and the usual sources, into a fresh package cache)"
dotnet build "$APP/consumer.csproj" -c Release --nologo -v q
# The package must be the one just packed: restored from the folder feed, with the same bytes.
meta=$NUGET_PACKAGES/stickbreaking.ilgpu/$version/.nupkg.metadata
grep -q "\"source\": *\"$FEED\"" "$meta" || { echo "StickBreaking.ILGPU $version was not restored from $FEED:" >&2; cat "$meta" >&2; exit 1; }
cmp -s "$nupkg" "$NUGET_PACKAGES/stickbreaking.ilgpu/$version/stickbreaking.ilgpu.$version.nupkg" \
  || { echo "the restored StickBreaking.ILGPU $version differs from $nupkg" >&2; exit 1; }
echo "restored StickBreaking.ILGPU $version from the folder feed (same bytes as packed)"

echo "--- dotnet consumer.dll (host)"
rc=0
dotnet "$APP/bin/Release/net10.0/consumer.dll" || rc=$?
echo "quick start exit code: $rc"
exit $rc
