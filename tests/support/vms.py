"""Throwaway QEMU domains with qcow2 backing chains holding known data.

Why here: the integration and e2e tests, hack/demo.py and hack/benchmark.py all need them
(the hack/ scripts import it with PYTHONPATH=tests). Every domain is named ``bct-...`` and
keeps all its files under ``/var/lib/libvirt/images/blockcopy-test/<name>/``, so
``cleanup_all()`` can remove everything this module ever made.

On a node of hack/cluster-nodes.sh (a libvirt session daemon of an unprivileged user,
``qemu+unix:///session?socket=/run/user/UID/libvirt/libvirt-sock``), the files go under that
node's imagesDir instead (``<imagesDir>/<name>/``, from .local/nodes.json or ``images_dir``)
and belong to the node's user, whose QEMU opens them: the same domain name can then exist on
two nodes, and ``cleanup_all(uri)`` clears one node only. qemu:///system is unchanged.

CLI::

    PYTHONPATH=tests python -m support.vms create [--name N] [--layers 2] [--size 64M]
        [--persistent] [--guest-writes] [--disks 1] [--tenant T]
    PYTHONPATH=tests python -m support.vms destroy NAME | cleanup | digest PATH
    (before the command: [--uri URI] [--images-dir DIR], for a node of `make cluster-nodes`)
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import hashlib
import json
import lzma
import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import libvirt

from blockcopy.core.domainxml import POLICY_METADATA_NS
from support.guestwrites import WRITE_MARK, WritePlan, plan_writes
from support.images import Luks, image_digest
from support.paths import NODES_JSON

PREFIX = "bct-"
IMAGES = Path("/var/lib/libvirt/images/blockcopy-test")
GUEST_CACHE = Path("/var/cache/blockcopy-operator/guest")
DEFAULT_URI = "qemu:///system"
GiB = 1 << 30
# A session daemon's socket: /run/user/UID/libvirt/libvirt-sock (hack/cluster-nodes.sh).
_SESSION_SOCKET = re.compile(r"^/run/user/(\d+)/")


def session_uid(uri: str) -> int | None:
    """The user whose libvirt session daemon ``uri`` reaches through its socket
    (``qemu+unix:///session?socket=/run/user/UID/libvirt/libvirt-sock``): its QEMU runs as
    that user, who must own the images. None for any other URI (qemu:///system: libvirt
    gives the files to its own QEMU user itself)."""
    parsed = urllib.parse.urlsplit(uri)
    if not parsed.scheme.startswith("qemu") or parsed.path.rstrip("/") != "/session":
        return None
    sockets = urllib.parse.parse_qs(parsed.query).get("socket") or []
    match = _SESSION_SOCKET.match(sockets[0]) if sockets else None
    return int(match.group(1)) if match else None


def images_root(uri: str = DEFAULT_URI, images_dir: str | Path | None = None) -> Path:
    """Where the VMs of ``uri`` keep their files (one directory per VM below): ``images_dir``
    when given; IMAGES for qemu:///system (and any URI that is not a node's session); for a
    node of hack/cluster-nodes.sh, its imagesDir in nodes.json."""
    if images_dir is not None:
        return Path(images_dir)
    if session_uid(uri) is None:
        return IMAGES
    nodes = json.loads(NODES_JSON.read_text()) if NODES_JSON.exists() else []
    for node in nodes:
        if node["libvirtUri"] == uri:
            return Path(node["imagesDir"])
    raise ValueError(f"{uri} is no node of {NODES_JSON} (make cluster-nodes): "
                     "give images_dir, a directory its QEMU user may write")


def _give_to_session_user(uri: str, path: Path) -> None:
    """chown -R ``path`` to the user whose session daemon ``uri`` reaches (no-op otherwise):
    the images are made by root here, and that user's QEMU opens them read-write."""
    uid = session_uid(uri)
    if uid is None:
        return
    gid = pwd.getpwuid(uid).pw_gid
    for dirpath, _dirs, files in os.walk(path):
        os.chown(dirpath, uid, gid)
        for f in files:
            os.chown(os.path.join(dirpath, f), uid, gid)


@dataclass
class VM:
    name: str
    uuid: str
    uri: str
    workdir: str
    chain: list[str]  # top (active) image first, base last
    disk_target: str = "vda"
    persistent: bool = False
    guest_writes: bool = False
    console_log: str = ""
    initial_digest: str = ""  # sha256 of the merged chain before the domain started
    # Every disk's chain (top first) by target, vda's (= chain) included; with disks=N > 1,
    # vdb... have chains of their own, their files named <target>-base.qcow2, ...
    disk_chains: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    initial_digests: dict[str, str] = dataclasses.field(default_factory=dict)
    # What the chain held before the domain started (layer_plan(layers, data_per_layer) on a
    # disk of size bytes) and, with guest_writes, where the guest writes (support.guestwrites).
    size: int = 0
    layers: int = 0
    data_per_layer: int = 0
    write_plan: WritePlan | None = None
    # encrypted=True: vda is a LUKS qcow2 (one layer) opened with this passphrase, which the
    # libvirt secret secret_uuid holds (its usage: the image's path)
    luks: Luks | None = None
    secret_uuid: str = ""

    def checksum_guest_view(self) -> str:
        return image_digest(self.chain[0], "qcow2", luks=self.luks)

    def initial_layout(self) -> list[tuple[int, int, int]]:
        """(pattern byte, offset, length) of the data the chain held when the VM was created,
        base layer first (zeros elsewhere)."""
        return [w for writes in layer_plan(self.layers, self.data_per_layer) for w in writes]


# ---------------------------------------------------------------- images


def _run(*cmd: str, cwd: str | None = None) -> str:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def parse_size(s: str | int) -> int:
    if isinstance(s, int):
        return s
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    s = s.strip().upper().removesuffix("IB").removesuffix("B")
    return int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)


def layer_plan(layers: int, per_layer: int) -> list[list[tuple[int, int, int]]]:
    """(pattern byte, offset, length) writes per layer, base first.

    Layer i fills its own region [i*D, (i+1)*D) and also overwrites the first
    half of layer i-1's region, so the merged view differs from every lower layer.
    """
    plan = []
    for i in range(layers):
        pattern = 0xA0 + i  # never 0x55/0xAA at both ends of sector 0: SeaBIOS won't boot it
        writes = [(pattern, i * per_layer, per_layer)]
        if i > 0:
            writes.append((pattern, (i - 1) * per_layer, per_layer // 2))
        plan.append(writes)
    return plan


def build_chain(
    workdir: Path, layers: int, size: int, per_layer: int, relative_backing: bool = False,
    prefix: str = "",
) -> list[str]:
    if layers < 1 or layers * per_layer > size:
        raise ValueError(f"{layers} layers of {per_layer} bytes do not fit in {size} bytes")
    paths: list[Path] = []
    for i, writes in enumerate(layer_plan(layers, per_layer)):
        img = workdir / (f"{prefix}base.qcow2" if i == 0 else f"{prefix}layer{i}.qcow2")
        if i == 0:
            _run("qemu-img", "create", "-q", "-f", "qcow2", str(img), str(size))
        else:
            # -F records the backing format, so neither qemu nor libvirt has to probe it
            lower = paths[-1].name if relative_backing else str(paths[-1])
            qcow2 = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", lower]
            _run(*qcow2, str(img), cwd=str(workdir))
        for pattern, off, length in writes:
            # qemu-io refuses one request of 2 GiB or more: the bench's 2 GiB layers are
            # written in 1 GiB requests (the same bytes)
            chunks = [("-c", f"write -P {pattern:#x} {start} {min(GiB, off + length - start)}")
                      for start in range(off, off + length, GiB)]
            _run("qemu-io", "-f", "qcow2", *[arg for chunk in chunks for arg in chunk], str(img))
        paths.append(img)
    return [str(p) for p in reversed(paths)]


def build_encrypted(workdir: Path, size: int, per_layer: int, luks: Luks) -> list[str]:
    """One LUKS-encrypted qcow2 image (base.qcow2) holding layer_plan(1, per_layer)'s data."""
    img = str(workdir / "base.qcow2")
    luks.create(img, "qcow2", size)
    for pattern, off, length in layer_plan(1, per_layer)[0]:
        luks.qemu_io(img, "qcow2", f"write -P {pattern:#x} {off} {length}")
    return [img]


def write_into(image: str, writes: list[tuple[int, int, int]], luks: Luks | None) -> None:
    """(pattern byte, offset, length) written as data into a qcow2 image (pattern 0 too:
    real zero bytes, allocated like any other data, as a guest zeroing its disk writes)."""
    commands = [f"write -P {pattern:#x} {start} {min(GiB, off + length - start)}"
                for pattern, off, length in writes for start in range(off, off + length, GiB)]
    if luks is not None:
        luks.qemu_io(image, "qcow2", *commands)
    else:
        _run("qemu-io", "-f", "qcow2", *[a for c in commands for a in ("-c", c)], image)


def define_secret(uri: str, usage: str, passphrase: str) -> str:
    """A libvirt secret (a LUKS passphrase) for the volume ``usage``; its UUID."""
    xml = (f"<secret ephemeral='no' private='yes'><description>bct test image</description>"
           f"<usage type='volume'><volume>{usage}</volume></usage></secret>")
    with libvirt.open(uri) as conn:
        secret = conn.secretDefineXML(xml)
        secret.setValue(passphrase.encode())
        return str(secret.UUIDString())


def undefine_secrets(uri: str, workdir: Path) -> None:
    """The secrets define_secret made for images under ``workdir``."""
    with libvirt.open(uri) as conn:
        for secret in conn.listAllSecrets():
            try:
                if (secret.usageID() or "").startswith(f"{workdir}/"):
                    secret.undefine()
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_SECRET:
                    raise


def expected_digest(vm: VM) -> str:
    return vm.initial_digest


# ---------------------------------------------------------------- guest: kernel + busybox initrd

# The writing guest (support.guestwrites describes its blocks and checks them): write n
# puts one 4 KiB block, which says (offset, n, md5), at the slot the plan on the kernel
# command line gives (bct.writes=START,STRIDE,SLOTS,MULT in 4 KiB blocks: block START +
# (n * MULT % SLOTS) * STRIDE; bct.pause=MICROSECONDS between writes). dd conv=fsync returns
# once the block is stable (the write, then a FLUSH); only then is the write logged:
# "{mark} <n> off=<bytes> seq=<n> md5=<md5> rc=<dd's exit code>" (rc=0: acknowledged).
# bct.load=MIB,FIRST,COUNT: after each block, also write MIB MiB of random data, rotating
# over the scratch area of COUNT MiB from MiB FIRST: a guest that dirties its disk faster
# than a throttled copy copies (the scratch area is not verified, the blocks still are).
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /tmp
for m in {modules}; do insmod /lib/modules/$m || echo "bct-guest: insmod $m failed"; done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do usleep 100000; i=$((i+1)); done
[ -b /dev/vda ] || {{ echo "bct-guest: no /dev/vda"; sleep 100000; }}
blocks=$(( $(cat /sys/block/vda/size) / 8 ))
# default plan: 128 slots over the second half of the disk
start=$(( blocks / 2 )); stride=$(( blocks / 256 )); slots=128; mult=37; pause=50000; load=0
for a in $(cat /proc/cmdline); do
  case $a in
    bct.writes=*) set -- $(echo ${{a#bct.writes=}} | tr , ' ')
                  start=$1; stride=$2; slots=$3; mult=$4 ;;
    bct.pause=*) pause=${{a#bct.pause=}} ;;
    bct.load=*) set -- $(echo ${{a#bct.load=}} | tr , ' ')
                load=$1; first=$2; mibs=$3 ;;
  esac
done
[ $stride -ge 1 ] || stride=1
echo "bct-guest: ready, /dev/vda has $(( blocks / 256 )) MiB;" \
  "writes: start=$start stride=$stride slots=$slots mult=$mult pause=$pause"
nl='
'
n=0
while true; do
  blk=$(( start + (n * mult % slots) * stride )); off=$(( blk * 4096 ))
  line=$(printf 'off=%012d seq=%010d' $off $n)"$nl"
  body="$line$line"; body="$body$body"; body="$body$body"; body="$body$body"
  body="$body$body"; body="$body$body"; body="$body$body"  # 128 lines
  body=${{body:0:3968}}                                     # 124 lines
  head=$(printf 'BCTW off=%012d seq=%010d' $off $n)
  printf '%s\n%s' "$head" "$body" > /tmp/sum
  sum=$(md5sum < /tmp/sum); sum=${{sum%% *}}
  printf '%-127s\n%s' "$head md5=$sum" "$body" > /tmp/block
  dd if=/tmp/block of=/dev/vda bs=4096 count=1 seek=$blk conv=notrunc,fsync 2>/dev/null
  rc=$?
  echo "{mark} $n off=$off seq=$n md5=$sum rc=$rc"
  if [ $load -gt 0 ]; then
    dd if=/dev/urandom of=/dev/vda bs=64k count=$(( load * 16 )) \
      seek=$(( (first + n * load % mibs) * 16 )) conv=notrunc,fsync 2>/dev/null
  fi
  n=$((n + 1)); usleep $pause
done
"""


def _kernel() -> tuple[str, str]:
    kernels = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))
    if not kernels:
        raise RuntimeError("no /boot/vmlinuz-*-cloud-amd64: install linux-image-cloud-amd64")
    path = kernels[-1]
    return path, os.path.basename(path).removeprefix("vmlinuz-")


def _modules_for(kver: str, wanted: list[str]) -> list[str]:
    """Module files (under /lib/modules/<kver>) to insmod, dependencies first, built-ins skipped."""
    mdir = Path("/lib/modules") / kver
    builtin = set((mdir / "modules.builtin").read_text().split())
    deps: dict[str, list[str]] = {}
    for line in (mdir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(m).name.split(".ko")[0].replace("-", "_"): m for m in deps}
    order: list[str] = []

    def visit(mod: str) -> None:
        for d in reversed(deps[mod]):  # modules.dep lists the deepest dependency last
            visit(d)
        if mod not in order:
            order.append(mod)

    for name in wanted:
        if not any(Path(b).name.split(".ko")[0].replace("-", "_") == name for b in builtin):
            visit(by_name[name])
    return order


def guest_boot_files() -> tuple[str, str]:
    """(kernel, initramfs) in GUEST_CACHE; the initramfs is built only if missing.

    The kernel is copied too, so libvirt's dynamic ownership relabels our copy, not /boot.
    """
    kpath, kver = _kernel()
    mods = _modules_for(kver, ["virtio_pci", "virtio_blk"])
    init = INIT.format(
        modules=" ".join(Path(m).name.split(".ko")[0] + ".ko" for m in mods), mark=WRITE_MARK
    )
    key = hashlib.sha256((kver + init).encode()).hexdigest()[:12]
    GUEST_CACHE.mkdir(parents=True, exist_ok=True)
    GUEST_CACHE.chmod(0o755)
    kernel, initrd = GUEST_CACHE / f"vmlinuz-{kver}", GUEST_CACHE / f"initramfs-{key}.cpio.gz"
    if not kernel.exists():
        shutil.copyfile(kpath, kernel)
    # Readable by everyone: the QEMU of a session node runs as an unprivileged user.
    kernel.chmod(0o644)
    if initrd.exists():
        return str(kernel), str(initrd)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("bin", "sbin", "proc", "sys", "dev", "lib/modules"):
            (root / d).mkdir(parents=True)
        shutil.copy2("/bin/busybox", root / "bin/busybox")
        for m in mods:
            src = Path("/lib/modules") / kver / m
            data = lzma.decompress(src.read_bytes()) if m.endswith(".xz") else src.read_bytes()
            (root / "lib/modules" / (src.name.split(".ko")[0] + ".ko")).write_bytes(data)
        (root / "init").write_text(init)
        (root / "init").chmod(0o755)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        cmd = ["cpio", "-o", "-H", "newc", "--quiet"]
        listing = "\n".join(files).encode()
        cpio = subprocess.run(cmd, cwd=tmp, input=listing, capture_output=True, check=True).stdout
        part = initrd.with_name(f"{initrd.name}.{os.getpid()}.part")
        part.write_bytes(gzip.compress(cpio))
        part.chmod(0o644)
        part.rename(initrd)  # atomic: a concurrent builder never sees half a file
    return str(kernel), str(initrd)


# ---------------------------------------------------------------- domains


def tenant_metadata(tenant: str) -> str:
    """The <metadata> content that assigns a domain to ``tenant`` for the agent's policy."""
    return f'<blockcopy:policy xmlns:blockcopy="{POLICY_METADATA_NS}" tenant="{tenant}"/>'


def disk_target(index: int) -> str:
    """vda, vdb, ... (virtio disk targets in order)."""
    return "vd" + "abcdefghijklmnopqrstuvwxyz"[index]


def encryption_xml(secret_uuid: str) -> str:
    """A disk's <encryption> element: LUKS, the passphrase in the libvirt secret."""
    return (f"<encryption format='luks'><secret type='passphrase' uuid='{secret_uuid}'/>"
            "</encryption>")


def _disk_xml(target: str, top: str, secret_uuid: str = "") -> str:
    encryption = f"\n      {encryption_xml(secret_uuid)}" if secret_uuid else ""
    return f"""    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{top}'/>
      <target dev='{target}' bus='virtio'/>{encryption}
    </disk>"""


def domain_xml(name: str, top: str, console_log: str, boot: tuple[str, str] | None,
               extra_tops: list[str] | tuple[str, ...] = (), metadata: str | None = None,
               cmdline: str = "", secret_uuid: str = "", hotplug: bool = False) -> str:
    """``top`` is vda's active image; ``extra_tops`` those of vdb, vdc, ...;
    ``metadata`` the XML inside <metadata>, if any; ``cmdline`` extra kernel arguments;
    ``secret_uuid``: vda is LUKS-encrypted, its passphrase in that libvirt secret;
    ``hotplug``: ACPI on (the pc machine's PCI bus then takes hot-plugged disks)."""
    # The cloud kernel resets while unpacking itself in 64 MiB; it boots in 128 MiB.
    memory, os_extra = (128 if boot else 64), ""
    if boot:
        os_extra = (
            f"<kernel>{boot[0]}</kernel><initrd>{boot[1]}</initrd>"
            f"<cmdline>console=ttyS0 loglevel=4 panic=-1{' ' + cmdline if cmdline else ''}"
            "</cmdline>"
        )
    # No <backingStore> on purpose: libvirt detects the chain from the qcow2 headers.
    disks = "\n".join(_disk_xml(disk_target(i), t, secret_uuid if i == 0 else "")
                      for i, t in enumerate([top, *extra_tops]))
    meta = f"\n  <metadata>{metadata}</metadata>" if metadata else ""
    features = "\n  <features><acpi/></features>" if hotplug else ""
    return f"""<domain type='qemu'>
  <name>{name}</name>{meta}
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>{os_extra}</os>{features}
  <on_poweroff>destroy</on_poweroff><on_crash>destroy</on_crash>
  <devices>
{disks}
    <serial type='file'><source path='{console_log}'/><target port='0'/></serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>"""


def create_vm(
    name: str | None = None,
    *,
    uri: str = DEFAULT_URI,
    layers: int = 2,
    size: str | int = "64M",
    persistent: bool = False,
    guest_writes: bool = False,
    data_per_layer: str | int = "4M",
    relative_backing: bool = False,
    disks: int = 1,
    tenant: str | None = None,
    metadata: str | None = None,
    write_slots: int = 128,
    guest_load_mib: int = 0,
    images_dir: str | Path | None = None,
    zeros: str | int = 0,
    encrypted: bool = False,
    extra_writes: list[tuple[int, int, int]] | None = None,
    start: bool = True,
    hotplug: bool = False,
) -> VM:
    """Create and start a domain. ``name`` is a purpose ('copy' -> 'bct-copy-1a2b3c');
    a name that already starts with 'bct-' is used as is. ``disks`` > 1 adds vdb, vdc...,
    each with a chain of its own like vda's (same layers and sizes), in the same directory,
    its files prefixed with the target (vdb-base.qcow2, vdb-layer1.qcow2, ...).
    ``tenant``: the agent's policy element in its <metadata> (see blockcopy.core.policy);
    ``metadata``: any other XML there. With ``guest_writes``, the guest writes
    ``write_slots`` blocks in turn (support.guestwrites.plan_writes); with ``guest_load_mib``
    it also writes that many MiB of random data into a scratch area after each block (a
    guest that outruns a throttled copy, whose blocks still verify). ``images_dir``: where
    its directory goes (default: ``images_root(uri)``, see there); on a session node's URI
    the files are given to that node's user. ``zeros``: that many bytes of zero bytes written
    right after the layers' data into the top image (allocated: data to QEMU, as when a guest
    writes zeros), for the zero-detection tests and bench. ``encrypted``: vda is one LUKS
    qcow2 image (layers=1), its passphrase in a libvirt secret (VM.luks, VM.secret_uuid;
    undefined with the domain). ``extra_writes``: (pattern byte, offset, length) written into
    vda's top image after its layers (pattern 0: real zero bytes). ``start=False`` (with
    ``persistent``): the domain is defined, shut off. ``hotplug``: disks may be hot-plugged
    (ACPI on)."""
    if not 1 <= disks <= 16:
        raise ValueError(f"disks must be 1 to 16, not {disks}")
    if encrypted and (layers != 1 or disks != 1):
        raise ValueError("an encrypted VM has one disk of one layer")
    if not start and not persistent:
        raise ValueError("a domain that is not started must be persistent (defined)")
    if name is None or not name.startswith(PREFIX):
        name = f"{PREFIX}{name or 'vm'}-{secrets.token_hex(3)}"
    root = images_root(uri, images_dir)
    workdir = root / name
    if root != IMAGES and not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory (a node's imagesDir is made by "
                                "hack/cluster-nodes.sh)")
    with libvirt.open(uri) as conn:
        if workdir.exists() or _find(conn, name):
            # never fall into the cleanup below: that would remove someone else's domain
            raise FileExistsError(f"{name} already exists: destroy it first")
    try:
        # libvirt runs qemu as libvirt-qemu: it must be able to traverse to the images
        workdir.mkdir(parents=True, exist_ok=False)
        if root == IMAGES:
            IMAGES.chmod(0o755)
        workdir.chmod(0o755)
        luks = Luks(secrets.token_hex(8)) if encrypted else None
        if luks is not None:
            chain = build_encrypted(workdir, parse_size(size), parse_size(data_per_layer), luks)
        else:
            chain = build_chain(
                workdir, layers, parse_size(size), parse_size(data_per_layer), relative_backing
            )
        if extra_writes:
            write_into(chain[0], extra_writes, luks)
        if zeros:
            if luks is not None:
                raise ValueError("zeros= is for plain images")
            at, length = layers * parse_size(data_per_layer), parse_size(zeros)
            _run("qemu-io", "-f", "qcow2", *[arg for off in range(at, at + length, GiB)
                                             for arg in ("-c", f"write -P 0 {off} "
                                                         f"{min(GiB, at + length - off)}")],
                 chain[0])
        secret_uuid = define_secret(uri, chain[0], luks.passphrase) if luks else ""
        chains = {"vda": chain}
        for i in range(1, disks):
            target = disk_target(i)
            chains[target] = build_chain(workdir, layers, parse_size(size),
                                         parse_size(data_per_layer), relative_backing,
                                         prefix=f"{target}-")
        digests = {t: image_digest(c[0], "qcow2", luks=luks if t == "vda" else None)
                   for t, c in chains.items()}
        digest = digests["vda"]
        console = str(workdir / "console.log")
        extra = (tenant_metadata(tenant) if tenant else "") + (metadata or "")
        # The guest writes beyond the layers' data, which therefore stays as it was built.
        plan = plan_writes(layers * parse_size(data_per_layer), parse_size(size),
                           slots=write_slots, load_mib=guest_load_mib) if guest_writes else None
        boot = guest_boot_files() if guest_writes else None
        _give_to_session_user(uri, workdir)
        xml = domain_xml(name, chain[0], console, boot,
                         [c[0] for t, c in chains.items() if t != "vda"], metadata=extra or None,
                         cmdline=plan.cmdline() if plan else "", secret_uuid=secret_uuid,
                         hotplug=hotplug)
        with libvirt.open(uri) as conn:
            if persistent:
                dom = conn.defineXML(xml)
                if start:
                    dom.create()
            else:
                dom = conn.createXML(xml, 0)
            uuid = dom.UUIDString()
    except BaseException:
        destroy_vm_by_name(name, uri=uri, images_dir=root)
        raise
    return VM(
        name=name,
        uuid=uuid,
        uri=uri,
        workdir=str(workdir),
        chain=chain,
        persistent=persistent,
        guest_writes=guest_writes,
        console_log=console,
        initial_digest=digest,
        disk_chains=chains,
        initial_digests=digests,
        size=parse_size(size),
        layers=layers,
        data_per_layer=parse_size(data_per_layer),
        write_plan=plan,
        luks=luks,
        secret_uuid=secret_uuid,
    )


def define_on(image: str, name: str | None = None, *, uri: str = DEFAULT_URI,
              secret_uuid: str = "") -> VM:
    """A domain defined (shut off) whose vda is ``image``, an existing qcow2 file that
    stays where it is (another VM's, or a copy's destination): a second user of that image
    (``secret_uuid``: a LUKS one, its passphrase in that libvirt secret). Its own directory
    holds only its console log; destroy_vm leaves ``image`` alone unless it lies there."""
    if name is None or not name.startswith(PREFIX):
        name = f"{PREFIX}{name or 'user'}-{secrets.token_hex(3)}"
    workdir = images_root(uri) / name
    workdir.mkdir(parents=True, exist_ok=False)
    workdir.chmod(0o755)
    xml = domain_xml(name, image, str(workdir / "console.log"), None, secret_uuid=secret_uuid)
    try:
        with libvirt.open(uri) as conn:
            uuid = conn.defineXML(xml).UUIDString()
    except BaseException:
        destroy_vm_by_name(name, uri=uri)
        raise
    return VM(name=name, uuid=uuid, uri=uri, workdir=str(workdir), chain=[image],
              persistent=True, console_log=str(workdir / "console.log"))


def _find(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    # listAllDomains instead of lookupByName: no "domain not found" noise on stderr
    return next((d for d in conn.listAllDomains() if d.name() == name), None)


def destroy_vm_by_name(name: str, *, uri: str = DEFAULT_URI,
                       images_dir: str | Path | None = None) -> None:
    """Destroy (if running), undefine (if persistent) and remove the image dir (under
    ``images_root(uri, images_dir)``). Idempotent."""
    if not name.startswith(PREFIX) or "/" in name:
        raise ValueError(f"refusing to touch {name!r}: not a {PREFIX} test domain")
    with libvirt.open(uri) as conn:
        dom = _find(conn, name)
        if dom is not None:
            try:
                # ask isPersistent first: a destroyed transient domain is gone
                persistent = dom.isPersistent()
                if dom.isActive():
                    dom.destroy()
                if persistent:
                    dom.undefineFlags(
                        libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                        | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                        | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                    )
            except libvirt.libvirtError as e:
                # someone else removed or stopped it in between: that is "already gone"
                if e.get_error_code() not in (
                    libvirt.VIR_ERR_NO_DOMAIN,
                    libvirt.VIR_ERR_OPERATION_INVALID,
                ):
                    raise
    undefine_secrets(uri, images_root(uri, images_dir) / name)
    shutil.rmtree(images_root(uri, images_dir) / name, ignore_errors=True)


def destroy_vm(vm: VM) -> None:
    destroy_vm_by_name(vm.name, uri=vm.uri, images_dir=Path(vm.workdir).parent)


class BackgroundDestroyer:
    """Test VMs destroyed off the tests' critical path: libvirt's destroy takes 1-2 s (QEMU's
    exit and the cleanup after it), which the next test's setup (an agent starting) can
    overlap. ``destroy`` hands a VM over; ``drain`` returns once every VM handed over is gone,
    and raises if one could not be destroyed. Whatever needs the earlier tests' VMs gone (a
    test making VMs, a test listing the host's domains, libvirtd restarted) drains first."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="destroy-vm")
        self._pending: list[tuple[str, Future[None]]] = []

    def destroy(self, vm: VM) -> None:
        self._pending.append((vm.name, self._pool.submit(destroy_vm, vm)))

    def drain(self) -> None:
        pending, self._pending = self._pending, []
        failed = []
        for name, future in pending:
            try:
                future.result(timeout=120)
            except Exception as exc:  # every one waited for, then all reported
                failed.append(f"{name}: {exc!r}")
        if failed:
            raise RuntimeError(f"test VMs not destroyed: {'; '.join(failed)}")

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._pool.shutdown()


def cleanup_all(uri: str = DEFAULT_URI, images_dir: str | Path | None = None) -> list[str]:
    """Remove every bct- domain of ``uri`` and their files. Returns the domain names removed.
    On qemu:///system the whole image root goes; on a node, only its bct-* directories (its
    imagesDir belongs to hack/cluster-nodes.sh, and other nodes' files are not touched)."""
    root = images_root(uri, images_dir)
    with libvirt.open(uri) as conn:
        names = [d.name() for d in conn.listAllDomains() if d.name().startswith(PREFIX)]
    for name in names:
        destroy_vm_by_name(name, uri=uri, images_dir=root)
    if root == IMAGES:
        shutil.rmtree(IMAGES, ignore_errors=True)
    else:
        for leftover in root.glob(f"{PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
    return names


# ---------------------------------------------------------------- guest


def wait_guest_writing(vm: VM, timeout: float = 120, writes: int = 2) -> float:
    """Wait until the console log shows ``writes`` guest writes; returns the seconds waited."""
    start = time.monotonic()
    while True:
        try:
            log = Path(vm.console_log).read_text(errors="replace")
        except FileNotFoundError:
            log = ""
        if log.count(WRITE_MARK) >= writes:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            tail = "\n".join(log.splitlines()[-15:])
            raise TimeoutError(
                f"{vm.name}: no guest writes after {timeout}s; console tail:\n{tail}"
            )
        time.sleep(0.5)


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--uri", default=DEFAULT_URI)
    p.add_argument("--images-dir", help="where the VMs' directories go (default: "
                   f"{IMAGES}, or a node's imagesDir from {NODES_JSON.name} for its URI)")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="create and start a domain, print it as JSON")
    c.add_argument("--name")
    c.add_argument("--layers", type=int, default=2)
    c.add_argument("--size", default="64M")
    c.add_argument("--data-per-layer", default="4M")
    c.add_argument("--persistent", action="store_true")
    c.add_argument("--guest-writes", action="store_true")
    c.add_argument("--relative-backing", action="store_true")
    c.add_argument("--disks", type=int, default=1, help="vda, plus vdb... with chains of their own")
    c.add_argument("--tenant", help="the tenant in its <metadata>, for the agent's policy")
    c.add_argument(
        "--wait-writes",
        type=float,
        metavar="TIMEOUT",
        help="with --guest-writes: wait until the guest is writing",
    )
    sub.add_parser("destroy", help="destroy one domain and its images").add_argument("name")
    sub.add_parser("cleanup", help="destroy every bct- domain and the image root")
    sub.add_parser("digest", help="sha256 of an image's guest view").add_argument("path")
    a = p.parse_args(argv)
    libvirt.registerErrorHandler(lambda *_: None, None)  # errors still raise; don't also print them

    if a.cmd == "create":
        vm = create_vm(
            a.name,
            uri=a.uri,
            layers=a.layers,
            size=a.size,
            persistent=a.persistent,
            guest_writes=a.guest_writes,
            data_per_layer=a.data_per_layer,
            relative_backing=a.relative_backing,
            disks=a.disks,
            tenant=a.tenant,
            images_dir=a.images_dir,
        )
        if a.guest_writes and a.wait_writes:
            wait_guest_writing(vm, a.wait_writes)
        print(json.dumps(dataclasses.asdict(vm), indent=2))
    elif a.cmd == "destroy":
        destroy_vm_by_name(a.name, uri=a.uri, images_dir=a.images_dir)
    elif a.cmd == "cleanup":
        for name in cleanup_all(a.uri, a.images_dir):
            print(f"removed {name}")
    elif a.cmd == "digest":
        print(image_digest(a.path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
