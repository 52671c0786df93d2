# blockcopy-operator: the node agent image.
#
#   builder: compilers + libvirt headers; builds the virtualenv /opt/blockcopy with the project
#            (libvirt-python is compiled from source against the distribution's libvirt).
#   final:   python3 + the libvirt client library (libvirt0) + that virtualenv; nothing else.
#
# Both stages start from the same base (the venv's interpreter is the base's /usr/bin/python3).
# Pin it by digest with --build-arg BASE_IMAGE=debian:bookworm-slim@sha256:... (hack/release.sh
# always does: it resolves the base to its digest and records it);
# on machines without a registry, hack/make-base-image.sh makes localhost/debian:bookworm and
# hack/build-image.sh builds this file with buildah on top of it.
#
# Versions: the Python dependencies are installed from the hashed lock files of hack/lock.sh
# (requirements/build.txt, then requirements/runtime.txt, pip --require-hashes: every package,
# transitive ones included, at its locked version and checked against its hash); the Debian
# packages come from the base's suite (bookworm: python3 3.11, libvirt 9.0). Exact Debian versions can be
# pinned with the *_VERSION build arguments below (e.g. --build-arg LIBVIRT0_VERSION=9.0.0-4+deb12u2);
# they are not hard-coded because the Debian mirror drops superseded versions at every point and
# security release, which would turn each of those into a failing build.
ARG BASE_IMAGE=debian:bookworm-slim

# ------------------------------------------------------------------------------------- builder
FROM ${BASE_IMAGE} AS builder
ARG LIBVIRT_DEV_VERSION=
ARG PYTHON3_VERSION=
RUN set -eux; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get update; \
    apt-get install -y --no-install-recommends \
        python3${PYTHON3_VERSION:+=$PYTHON3_VERSION} python3-venv python3-dev \
        gcc pkg-config libvirt-dev${LIBVIRT_DEV_VERSION:+=$LIBVIRT_DEV_VERSION}; \
    rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/blockcopy

# Dependencies first (their own layers: source edits do not rebuild libvirt-python), from the
# lock files only: pip and the build backend (build.txt), then the runtime set (runtime.txt).
# --no-build-isolation: libvirt-python's sdist builds with the locked setuptools, so nothing is
# fetched without a hash; --no-deps: the lock is complete (`pip check` below proves it).
COPY requirements/build.txt requirements/runtime.txt /src/requirements/
RUN /opt/blockcopy/bin/pip install --require-virtualenv --require-hashes --no-deps \
        -r /src/requirements/build.txt
RUN /opt/blockcopy/bin/pip install --require-virtualenv --require-hashes --no-deps \
        --no-build-isolation -r /src/requirements/runtime.txt

COPY . /src
# --no-deps: every dependency is already installed above at its locked version; `pip check`
# fails the build if pyproject.toml gained a dependency that the lock does not hold.
# Then the runtime venv is trimmed: it needs none of the build tools of build.txt that the
# runtime lock does not hold (pip, setuptools: 23 MB; wheel, packaging), nor bytecode
# (compiled .pyc would add about 50 MB for the kubernetes client's thousands of model modules;
# Python compiles what it imports in memory, the root filesystem being read-only anyway).
RUN set -eux; \
    /opt/blockcopy/bin/pip install --require-virtualenv --no-deps --no-build-isolation /src; \
    /opt/blockcopy/bin/pip check; \
    /opt/blockcopy/bin/blockcopy-operator --help >/dev/null; \
    /opt/blockcopy/bin/pip uninstall -y -q $(sed -n 's/^\([A-Za-z0-9._-]*\)==.*/\1/p' \
        /src/requirements/build.txt | while read -r p; do \
          grep -qi "^$p==" /src/requirements/runtime.txt || echo "$p"; done); \
    rm -f /opt/blockcopy/bin/pip* /opt/blockcopy/bin/wheel; \
    find /opt/blockcopy -name __pycache__ -type d -prune -exec rm -rf {} +

# --------------------------------------------------------------------------------------- final
FROM ${BASE_IMAGE}
ARG LIBVIRT0_VERSION=
ARG PYTHON3_VERSION=
RUN set -eux; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get update; \
    apt-get install -y --no-install-recommends \
        python3${PYTHON3_VERSION:+=$PYTHON3_VERSION} \
        libvirt0${LIBVIRT0_VERSION:+=$LIBVIRT0_VERSION} \
        qemu-utils; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log

# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only in the chart, so no attempt to
# write .pyc files. PYTHONUNBUFFERED: log lines reach `kubectl logs` at once.
ENV PATH=/opt/blockcopy/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LIBVIRT_URI=qemu:///system

# OCI annotations. hack/release.sh sets version, revision (the commit), created (the commit's
# time, so that a rebuild of the same commit says the same) and the base image with these
# build arguments, and also as buildah --label (buildah 1.28 reuses a cached LABEL step whatever
# the build arguments' values; a --label is applied to the final image regardless).
ARG VERSION=dev
ARG REVISION=unknown
ARG CREATED=
ARG BASE_IMAGE
LABEL org.opencontainers.image.title="blockcopy-operator" \
      org.opencontainers.image.description="Node agent for BlockCopy objects: live libvirt disk copies driven from Kubernetes" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/blockcopy/blockcopy-operator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# Root on purpose: libvirt's qemu:///system socket accepts root (or, on hosts configured for
# it, the libvirt group) only. The Helm chart drops every capability and makes the root
# filesystem read-only; see charts/blockcopy-operator/values.yaml (securityContext).
USER 0:0
ENTRYPOINT ["blockcopy-operator"]

# Last, so that the metadata steps above stay cached when only the venv changes.
COPY --from=builder /opt/blockcopy /opt/blockcopy
