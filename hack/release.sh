#!/usr/bin/env bash
# Builds the release artifacts of VERSION into dist/VERSION/:
#
#   blockcopy-operator-VERSION.oci.tar    the agent image, an OCI archive (buildah), with OCI
#                                         labels: version, revision (the commit), created (the
#                                         commit's time), source, base image name and digest
#   blockcopy-operator-VERSION.tgz        the Helm chart, version and appVersion VERSION, its
#                                         default image RELEASE_REGISTRY/blockcopy-operator:VERSION
#   install.yaml                          for `kubectl apply -f`: the Namespace blockcopy-system,
#                                         the CRDs, and `helm template` of that chart with its
#                                         defaults (RBAC, DaemonSet, plan controller, ...)
#   sbom.cdx.json                         CycloneDX SBOM of the image's Python dependencies, from
#                                         requirements/runtime.txt; the build fails when the
#                                         image's installed packages differ from that lock
#   release.json                          what was built: versions, commit, digests, files
#   SHA256SUMS                            `sha256sum -c SHA256SUMS` in dist/VERSION checks them all
#
#   hack/release.sh VERSION [--no-image] [--push]
#     --no-image  no image, archive or image check (offline: the chart, install.yaml, SBOM)
#     --push      push the image to RELEASE_REGISTRY/blockcopy-operator:VERSION and the chart to
#                 oci://RELEASE_REGISTRY/charts (plain HTTP for a registry on 127.0.0.1)
#
# VERSION is pyproject.toml's version or a pre-release of it (0.2.0, 0.2.0-rc.1).
# Environment: RELEASE_REGISTRY (default ghcr.io/blockcopy, a placeholder: the project's real
# registry is not settled; `make release` uses the local registry of hack/registry.sh),
# BASE_IMAGE (default localhost/debian:bookworm of hack/make-base-image.sh; resolved to its
# digest and built FROM NAME@sha256:..., or give NAME@sha256:... yourself), DIST (instead of
# dist/), HELM, PYTHON (any Python 3.11; default the venv's).
set -euo pipefail

HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/env.sh
source "$HACK/lib/env.sh"   # REPO CACHE STATE ...
RELEASE_REGISTRY=${RELEASE_REGISTRY:-ghcr.io/blockcopy}
DEFAULT_REPOSITORY=ghcr.io/blockcopy/blockcopy-operator   # charts/.../values.yaml's
BASE_IMAGE=${BASE_IMAGE:-localhost/debian:bookworm}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
HELM=${HELM:-$CACHE/bin/helm}
NAMESPACE=blockcopy-system
CHART_NAME=blockcopy-operator

log() { echo "[release] $*" >&2; }
die() { echo "[release] ERROR: $*" >&2; exit 1; }

VERSION=${1:-}
[ -n "$VERSION" ] && [[ "$VERSION" != -* ]] || die "usage: $0 VERSION [--no-image] [--push]"
shift
with_image=1 push=0
for arg in "$@"; do
  case "$arg" in
    --no-image) with_image=0 ;;
    --push) push=1 ;;
    *) die "unknown argument $arg (usage: $0 VERSION [--no-image] [--push])" ;;
  esac
done

project_version=$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$REPO/pyproject.toml")
# SemVer: the project's version itself, or a pre-release of it (VERSION-IDENTIFIERS).
if [ "$VERSION" != "$project_version" ] \
   && ! [[ "$VERSION" =~ ^${project_version//./\\.}-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*$ ]]; then
  die "VERSION $VERSION is neither pyproject.toml's version $project_version nor a pre-release of it ($project_version-rc.1)"
fi
# SemVer forbids leading zeros in a numeric identifier (rc.01, test.028212); Helm refuses such a
# chart version only after the build, so say it here, before anything is written.
if [ "$VERSION" != "$project_version" ]; then
  IFS=. read -ra identifiers <<< "${VERSION#"$project_version"-}"
  for identifier in "${identifiers[@]}"; do
    if [[ "$identifier" =~ ^0[0-9]+$ ]]; then
      die "VERSION $VERSION is not SemVer: the numeric identifier $identifier has a leading zero"
    fi
  done
fi
[ -x "$PYTHON" ] || die "no $PYTHON: run make venv"
# The SBOM tool: a venv of its own under the cache directory, named after its lock file
# (requirements/release.txt), installed once with hashes.
SBOM_TOOL="$CACHE/tools/cyclonedx-$(sha256sum "$REPO/requirements/release.txt" | cut -c1-16)"
# shellcheck source=lib/toolvenv.sh
source "$HACK/lib/toolvenv.sh"
tool_venv "$SBOM_TOOL" cyclonedx-py --require-hashes --no-deps -r "$REPO/requirements/release.txt"
if [ ! -x "$HELM" ]; then
  BLOCKCOPY_STATE_DIR="$STATE" BLOCKCOPY_CACHE_DIR="$CACHE" "$HACK/install-kube-tools.sh" >&2
fi
case "$RELEASE_REGISTRY" in
  127.0.0.1:*|localhost:*|localhost) plain_http=1 ;;
  *) plain_http=0 ;;
esac

IMAGE_REPOSITORY="$RELEASE_REGISTRY/blockcopy-operator"
IMAGE="$IMAGE_REPOSITORY:$VERSION"
REVISION=$(git -C "$REPO" rev-parse HEAD)
# The commit's time, in UTC: a rebuild of the same commit carries the same date.
CREATED=$(TZ=UTC git -C "$REPO" log -1 --format=%cd --date=format-local:%Y-%m-%dT%H:%M:%SZ HEAD)
dirty=false
if [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no)" ]; then
  dirty=true
  log "WARNING: the work tree has uncommitted changes; release.json says so (dirty: true)"
fi
SOURCE=https://github.com/blockcopy/blockcopy-operator

OUT="${DIST:-$REPO/dist}/$VERSION"
# shellcheck source=lib/buildah.sh
source "$HACK/lib/buildah.sh"   # BUILDAH, TMP and ctr (removed on exit)
rm -rf "$OUT"
mkdir -p "$OUT"
start=$SECONDS

# ---------------------------------------------------------------- chart
# A copy with the release's version, appVersion and default image repository.
cp -rL "$REPO/charts/$CHART_NAME" "$TMP/chart"
sed -i -e "s/^version: .*/version: $VERSION/" -e "s/^appVersion: .*/appVersion: \"$VERSION\"/" \
  "$TMP/chart/Chart.yaml"
grep -qxF "  repository: $DEFAULT_REPOSITORY" "$TMP/chart/values.yaml" \
  || die "charts/$CHART_NAME/values.yaml: image.repository is not $DEFAULT_REPOSITORY"
sed -i "s|^  repository: $DEFAULT_REPOSITORY\$|  repository: $IMAGE_REPOSITORY|" "$TMP/chart/values.yaml"
"$HELM" package "$TMP/chart" --destination "$OUT" >/dev/null
CHART="$OUT/$CHART_NAME-$VERSION.tgz"
[ -s "$CHART" ] || die "helm package made no $CHART"
log "chart $(basename "$CHART")"

# ---------------------------------------------------------------- install.yaml
{
  echo "# blockcopy-operator $VERSION: the CRD, the agent's RBAC and DaemonSet in namespace"
  echo "# $NAMESPACE (the chart's defaults, rendered by helm template)."
  echo "#   kubectl apply -f install.yaml"
  echo "---"
  echo "apiVersion: v1"
  echo "kind: Namespace"
  echo "metadata:"
  echo "  name: $NAMESPACE"
  "$HELM" template "$CHART_NAME" "$CHART" --namespace "$NAMESPACE" --include-crds
} >"$OUT/install.yaml"
log "install.yaml: $(grep -c '^kind: ' "$OUT/install.yaml") objects"

# ---------------------------------------------------------------- SBOM
"$SBOM_TOOL/bin/cyclonedx-py" requirements --of JSON --output-reproducible \
  --pyproject "$REPO/pyproject.toml" --mc-type application \
  -o "$OUT/sbom.cdx.json" "$REPO/requirements/runtime.txt" 2>"$TMP/sbom.log" \
  || { cat "$TMP/sbom.log" >&2; die "cyclonedx-py failed"; }
log "SBOM: $("$PYTHON" -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["components"]))' "$OUT/sbom.cdx.json") components"

# ---------------------------------------------------------------- image
base_ref= archive_digest= pushed_digest= chart_digest=
if [ "$with_image" = 1 ]; then
  if [[ "$BASE_IMAGE" == *@sha256:* ]]; then
    base_ref=$BASE_IMAGE
  else
    [ "$BASE_IMAGE" != localhost/debian:bookworm ] \
      || BLOCKCOPY_CACHE_DIR="$CACHE" "$HACK/make-base-image.sh"
    "${BUILDAH[@]}" inspect --type image "$BASE_IMAGE" >/dev/null 2>&1 \
      || "${BUILDAH[@]}" pull --quiet "$BASE_IMAGE" >/dev/null
    digest=$("${BUILDAH[@]}" inspect --type image --format '{{.FromImageDigest}}' "$BASE_IMAGE")
    [[ "$digest" == sha256:* ]] || die "no digest for the base image $BASE_IMAGE"
    name=${BASE_IMAGE%@*}
    [[ "${name##*/}" != *:* ]] || name=${name%:*}
    base_ref="$name@$digest"
  fi
  log "building $IMAGE on $base_ref"
  labels=(
    "org.opencontainers.image.version=$VERSION"
    "org.opencontainers.image.revision=$REVISION"
    "org.opencontainers.image.created=$CREATED"
    "org.opencontainers.image.source=$SOURCE"
    "org.opencontainers.image.base.name=$base_ref"
    "org.opencontainers.image.base.digest=${base_ref#*@}"
  )
  args=(--build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION" --build-arg "CREATED=$CREATED")
  for label in "${labels[@]}"; do args+=(--label "$label"); done
  IMAGE="$IMAGE" BASE_IMAGE="$base_ref" BLOCKCOPY_CACHE_DIR="$CACHE" \
    "$HACK/build-image.sh" "${args[@]}" >"$TMP/build.log" 2>&1 \
    || { tail -n 40 "$TMP/build.log" >&2; die "image build failed (hack/build-image.sh)"; }

  # The image's labels are the release's.
  got=$("${BUILDAH[@]}" inspect --type image --format '{{range $k, $v := .OCIv1.Config.Labels}}{{$k}}={{$v}}{{"\n"}}{{end}}' "$IMAGE")
  for label in "${labels[@]}"; do
    grep -qxF "$label" <<<"$got" || die "image $IMAGE lacks the label $label (it has: $got)"
  done

  # Its Python packages are the lock's, no more and no fewer (plus the project itself).
  ctr=$("${BUILDAH[@]}" from --pull=false "$IMAGE")
  "${BUILDAH[@]}" run --isolation chroot "$ctr" -- /opt/blockcopy/bin/python -c '
import importlib.metadata as m
for d in m.distributions():
    print(d.metadata["Name"], d.version)' >"$TMP/installed.txt"
  "${BUILDAH[@]}" rm "$ctr" >/dev/null
  ctr=
  "$PYTHON" - "$REPO/requirements/runtime.txt" "$TMP/installed.txt" "$project_version" <<'PY'
import re
import sys

def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()

lock = {norm(m[1]): m[2] for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)",
                                                open(sys.argv[1]).read(), re.M)}
lock["blockcopy-operator"] = sys.argv[3]
installed = {}
for line in open(sys.argv[2]):
    name, version = line.split()
    installed[norm(name)] = version
if installed != lock:
    extra = sorted(f"{k}=={v}" for k, v in installed.items() if lock.get(k) != v)
    missing = sorted(f"{k}=={v}" for k, v in lock.items() if installed.get(k) != v)
    sys.exit(f"[release] ERROR: the image's Python packages differ from requirements/runtime.txt:"
             f" in the image {extra}, in the lock {missing}")
print(f"[release] the image holds exactly the {len(lock) - 1} locked packages and the project",
      file=sys.stderr)
PY

  ARCHIVE="$OUT/blockcopy-operator-$VERSION.oci.tar"
  "${BUILDAH[@]}" push --quiet --format oci --digestfile "$TMP/archive.digest" "$IMAGE" \
    "oci-archive:$ARCHIVE:$IMAGE" >/dev/null
  archive_digest=$(cat "$TMP/archive.digest")
  log "image archive $(basename "$ARCHIVE") ($archive_digest)"
fi

# ---------------------------------------------------------------- push
if [ "$push" = 1 ]; then
  if [ "$with_image" = 1 ]; then
    tls=(--tls-verify=true)
    [ "$plain_http" = 0 ] || tls=(--tls-verify=false)
    "${BUILDAH[@]}" push --quiet --format oci "${tls[@]}" --digestfile "$TMP/push.digest" \
      "$IMAGE" "docker://$IMAGE" >/dev/null
    pushed_digest=$(cat "$TMP/push.digest")
    log "pushed $IMAGE@$pushed_digest"
  fi
  http=()
  [ "$plain_http" = 0 ] || http=(--plain-http)
  "$HELM" push "$CHART" "oci://$RELEASE_REGISTRY/charts" "${http[@]}" >"$TMP/push.log" 2>&1 \
    || { cat "$TMP/push.log" >&2; die "helm push failed"; }
  chart_digest=$(sed -n 's/^Digest: *\(sha256:[0-9a-f]*\).*/\1/p' "$TMP/push.log")
  log "pushed oci://$RELEASE_REGISTRY/charts/$CHART_NAME:$VERSION ($chart_digest)"
fi

# ---------------------------------------------------------------- release.json, SHA256SUMS
"$PYTHON" - "$OUT" <<PY
import hashlib, json, os, sys
out = sys.argv[1]
files = {name: hashlib.sha256(open(os.path.join(out, name), "rb").read()).hexdigest()
         for name in sorted(os.listdir(out))}
release = {
    "version": "$VERSION",
    "projectVersion": "$project_version",
    "revision": "$REVISION",
    "created": "$CREATED",
    "dirty": $( [ "$dirty" = true ] && echo True || echo False ),
    "source": "$SOURCE",
    "image": {
        "repository": "$IMAGE_REPOSITORY",
        "tag": "$VERSION",
        "base": "$base_ref" or None,
        "archive": "blockcopy-operator-$VERSION.oci.tar" if $with_image else None,
        "archiveDigest": "$archive_digest" or None,
        "pushedDigest": "$pushed_digest" or None,
    },
    "chart": {
        "name": "$CHART_NAME",
        "version": "$VERSION",
        "appVersion": "$VERSION",
        "archive": "$CHART_NAME-$VERSION.tgz",
        "oci": "oci://$RELEASE_REGISTRY/charts/$CHART_NAME" if $push else None,
        "pushedDigest": "$chart_digest" or None,
    },
    "installYaml": "install.yaml",
    "sbom": "sbom.cdx.json",
    "files": files,
}
with open(os.path.join(out, "release.json"), "w") as f:
    json.dump(release, f, indent=2)
    f.write("\n")
PY
(cd "$OUT" && find . -maxdepth 1 -type f ! -name SHA256SUMS -printf '%f\n' | LC_ALL=C sort \
  | xargs sha256sum >SHA256SUMS)
log "dist/$VERSION ready in $((SECONDS - start)) s:"
(cd "$OUT" && ls -l) >&2
