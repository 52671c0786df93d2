#!/usr/bin/env bash
# Puts the machine's libvirt + QEMU on one of two stacks (called by install-system-deps.sh):
#
#   stock      Debian 12's own libvirt 9.0 + QEMU 7.2 (the default; what CI runs)
#   backports  bookworm-backports' libvirt 11.3 + QEMU 10.0 (what Debian 13 ships)
#
#   HYPERVISOR_STACK=backports hack/hypervisor-stack.sh     (or: make cluster HYPERVISOR_STACK=...)
#
# Only the packages built from the sources libvirt, qemu and seabios (QEMU 10 needs the newer
# firmware) follow the switch: an apt preferences file pins exactly those to the chosen suite;
# nothing else on the machine comes from backports. Switching back downgrades them and removes
# the packages that exist only in the newer libvirt (it split its daemons into more packages).
# When the installed stack changes, the running libvirtd and virtlogd are stopped (they run the
# old binaries); hack/cluster-up.sh starts the new ones. Idempotent: a machine already on the
# stack, with all of the stack's files in place, is left alone (the apt lists are not even
# refreshed); one on the stack with files missing is repaired by reinstalling the stack.
set -euo pipefail

STACK=${HYPERVISOR_STACK:-stock}
SOURCES=(libvirt qemu seabios)
PIN=/etc/apt/preferences.d/blockcopy-hypervisor-stack
LIST=/etc/apt/sources.list.d/blockcopy-bookworm-backports.list

log() { echo "[hypervisor-stack] $*" >&2; }
die() { echo "[hypervisor-stack] ERROR: $*" >&2; exit 1; }

case "$STACK" in
  stock) suite=bookworm ;;
  backports) suite=bookworm-backports ;;
  *) die "HYPERVISOR_STACK must be stock or backports, not '$STACK'" ;;
esac

# installed PACKAGE VERSION lines of the packages built from SOURCES
installed() {
  dpkg-query -W -f='${db:Status-Abbrev}\t${Package}\t${Version}\t${source:Package}\n' \
    | awk -F'\t' -v srcs=" ${SOURCES[*]} " '$1 ~ /^ii/ && index(srcs, " " $4 " ") { print $2 "\t" $3 }'
}

# On the stack already? Backports versions carry "~bpo12", stock ones do not.
version() { installed | awk -F'\t' -v p="$1" '$1 == p { print $2 }'; }
on_stack() {
  if [ "$STACK" = backports ]; then
    [[ "$(version libvirt0)" == *~bpo12* && "$(version qemu-system-x86)" == *~bpo12* ]]
  else
    [ -n "$(version libvirt0)" ] && ! installed | grep '~bpo12' >/dev/null
  fi
}

# Files the installed stack packages should have but do not. A downgrade can leave some: files
# that moved between packages across versions (libvirt 11 moved /usr/share/libvirt/cpu_map from
# libvirt0 to libvirt-common) are deleted when the newer owner is removed, and dpkg no longer
# lists them under the older owner, so only a reinstall brings them back. libvirtd then fails
# every domain start with "failed to parse xml document .../cpu_map/index.xml".
missing_files() {
  [ -s /usr/share/libvirt/cpu_map/index.xml ] || echo /usr/share/libvirt/cpu_map/index.xml
  installed | cut -f1 | xargs -r dpkg --verify 2>/dev/null \
    | awk '$1 == "missing" && $NF !~ "^/usr/share/doc/" { print $NF }' || true
}

# stock: the packages and no pin (the machine as Debian made it); backports: both.
pinned=no; [ -f "$PIN" ] && pinned=yes
if on_stack && [ "$STACK/$pinned" = backports/yes -o "$STACK/$pinned" = stock/no ] \
    && [ -z "$(missing_files)" ]; then
  exit 0
fi
[ "$(id -u)" -eq 0 ] || die "switching to the $STACK stack needs root"
log "switching libvirt + QEMU to the $STACK stack ($suite)"

if [ ! -f "$LIST" ]; then
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main" >"$LIST"
fi
# Priority 1001 lets apt downgrade to the stock versions; 990 takes backports' over stock's.
priority=990; [ "$STACK" = stock ] && priority=1001
{
  echo "# Written by blockcopy-operator's hack/hypervisor-stack.sh: the $STACK hypervisor stack."
  echo "Package: $(printf 'src:%s ' "${SOURCES[@]}")"
  echo "Pin: release n=$suite"
  echo "Pin-Priority: $priority"
} >"$PIN"

export DEBIAN_FRONTEND=noninteractive
if [ ! -e /usr/sbin/policy-rc.d ]; then   # no init system: package scripts start nothing
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update -qq

# The packages to (re)install at the stack's version; on the way back, the packages that only
# the newer libvirt has (no version in bookworm) are removed in the same transaction.
want=() drop=()
while IFS=$'\t' read -r pkg _; do
  if apt-cache madison "$pkg" | awk -F'|' -v s="$suite" '$3 ~ (" " s "[/ ]")' | grep . >/dev/null; then
    want+=("$pkg")
  else
    drop+=("$pkg-")
  fi
done < <(installed)
for base in libvirt-daemon-system qemu-system-x86 qemu-utils libvirt-dev; do
  printf '%s\n' "${want[@]}" | grep -x "$base" >/dev/null || want+=("$base")
done
apt-get install -y -qq --no-install-recommends --allow-downgrades \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${want[@]}" "${drop[@]}"

on_stack || die "after the switch the installed packages are not all on the $STACK stack:
$(installed)"
# A second transaction puts back what the first one's removals took (see missing_files): every
# package of the stack is reinstalled, conffiles included. It costs seconds and runs only on a
# switch or a repair.
if [ -n "$(missing_files)" ]; then
  log "restoring files the switch removed: $(missing_files | sed -n 1,3p | tr '\n' ' ')..."
  mapfile -t stack_packages < <(installed | cut -f1)
  apt-get install -y -qq --no-install-recommends --reinstall \
    -o Dpkg::Options::=--force-confmiss -o Dpkg::Options::=--force-confold "${stack_packages[@]}"
fi
leftover=$(missing_files)
[ -z "$leftover" ] || die "files of the $STACK stack are still missing after reinstalling it:
$leftover"
if [ "$STACK" = stock ]; then   # back to the machine as Debian made it
  rm -f "$PIN" "$LIST"
  apt-get update -qq
fi
log "now: libvirt $(dpkg-query -W -f='${Version}' libvirt0), QEMU $(dpkg-query -W -f='${Version}' qemu-system-x86)"

# The daemons still run the old binaries: stop them (cluster-up.sh starts the new ones).
for daemon in libvirtd virtlogd; do
  for pid in $(pgrep -x "$daemon" || true); do
    log "stopping $daemon (pid $pid): it runs the previous stack"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
done
