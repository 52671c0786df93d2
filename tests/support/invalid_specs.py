"""Every invalid BlockCopy spec the agent knows, with what the API server says about it.

One table for two sides: the agent's own check (``model.api.parse_spec`` raises SpecError, the
object becomes Failed/InvalidSpec) and admission (the CRD's OpenAPI schema and CEL rules in
crds/blockcopy.yaml refuse it at ``kubectl apply``). tests/unit/test_api.py runs every row
through the agent; tests/e2e/test_invalid_specs_on_server.py sends every row to a real API
server; tests/unit/test_invalid_specs.py keeps the table in step with the code (every
SpecError the agent can raise has a row, every CEL rule of the spec is exercised, every other
refusal reason of the agent is listed in NOT_IN_CEL with why admission cannot check it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

GOOD: dict[str, Any] = {"domain": "vm1", "disk": "vda",
                        "dest": "/var/lib/libvirt/images/copy.qcow2"}
NBD = "nbd://nbd.example:10809/disk0"


def spec(**fields: Any) -> dict[str, Any]:
    """GOOD with ``fields`` (None removes a field)."""
    merged = {**GOOD, **fields}
    return {k: v for k, v in merged.items() if v is not None}


@dataclasses.dataclass(frozen=True)
class Invalid:
    id: str
    spec: Any  # the whole spec, as written
    agent: str | None  # words of the agent's SpecError; None: the agent accepts it
    server: str  # words of the API server's refusal (OpenAPI or CEL)

    def __post_init__(self) -> None:
        assert self.agent or self.server


# The API server's own words for OpenAPI checks (not ours to choose).
def _type(field: str, kind: str) -> str:
    return f"{field} in body must be of type {kind}"


INVALID: tuple[Invalid, ...] = (
    # -- shapes and types (OpenAPI)
    Invalid("not-an-object", ["domain"], "spec must be an object",
            _type("spec", "object")),
    Invalid("domain-missing", spec(domain=None), "spec.domain is required",
            "spec.domain: Required value"),
    Invalid("disk-empty", spec(disk=""), "spec.disk is required",
            "spec.disk in body should be at least 1 chars long"),
    Invalid("dest-not-a-string", spec(dest=5), "spec.dest must be a string",
            _type("spec.dest", "string")),
    Invalid("flags-not-a-list", spec(flags="shallow"), "spec.flags must be a list",
            _type("spec.flags", "array")),
    Invalid("flag-unknown", spec(flags=["shallow", "turbo"]), "unknown flag 'turbo'",
            'spec.flags[1]: Unsupported value: "turbo"'),
    Invalid("pivot-not-a-bool", spec(pivot="yes"), "spec.pivot must be true or false",
            _type("spec.pivot", "boolean")),
    Invalid("granularity-not-an-int", spec(granularity=1.5), "non-negative integer",
            _type("spec.granularity", "integer")),
    Invalid("bufsize-not-an-int", spec(bufSize=True), "non-negative integer",
            _type("spec.bufSize", "integer")),
    Invalid("granularity-negative", spec(granularity=-1), "non-negative integer",
            "spec.granularity in body should be greater than or equal to 0"),
    Invalid("convergence-unknown", spec(convergence="fast"), "the values are 'auto'",
            'spec.convergence: Unsupported value: "fast"'),
    Invalid("backingchain-unknown", spec(backingChain="move"), "the only value is 'copy'",
            'spec.backingChain: Unsupported value: "move"'),
    Invalid("bandwidth-a-bool", spec(bandwidth=True), "bandwidth must be a quantity",
            "spec.bandwidth in body must be of type integer"),
    Invalid("bandwidth-a-list", spec(bandwidth=[1]), "bandwidth must be a quantity",
            "spec.bandwidth in body must be of type integer"),
    # -- strings (CEL)
    Invalid("dest-nul", spec(dest="/var/lib/libvirt/images/a\x00b.qcow2"),
            "spec.dest must not contain NUL characters",
            "spec.dest must not contain NUL characters"),
    Invalid("domain-nul", spec(domain="vm\x00"), "spec.domain must not contain NUL",
            "spec.domain must not contain NUL characters"),
    Invalid("disk-nul", spec(disk="vda\x00"), "spec.disk must not contain NUL",
            "spec.disk must not contain NUL characters"),
    Invalid("node-nul", spec(nodeName="n\x00"), "spec.nodeName must not contain NUL",
            "spec.nodeName must not contain NUL characters"),
    Invalid("base-nul", spec(base="/b\x00"), "spec.base must not contain NUL",
            "spec.base must not contain NUL characters"),
    Invalid("group-nul", spec(group="g\x00"), "spec.group must not contain NUL",
            "spec.group must not contain NUL characters"),
    Invalid("dest-relative", spec(dest="relative/path.qcow2"),
            "spec.dest must be an absolute path or an NBD URI",
            "spec.dest must be an absolute path or an NBD URI"),
    Invalid("dest-a-directory", spec(dest="/var/lib/libvirt/images/"), "not a directory",
            "spec.dest must name a file or block device, not a directory"),
    Invalid("format-not-a-name", spec(format="qcow2; rm -rf /"), "not an image format name",
            "spec.format must be an image format name such as raw or qcow2"),
    Invalid("base-relative", spec(base="rel/base.qcow2"), "spec.base must be an absolute path",
            "spec.base must be an absolute path"),
    # -- NBD URIs (CEL)
    Invalid("nbd-no-export", spec(dest="nbd://nbd.example:10809/"),
            "the NBD export name is missing", "spec.dest: write nbd://HOST[:PORT]/EXPORT"),
    Invalid("nbd-export-with-slash", spec(dest="nbd://nbd.example/a/b"),
            "the NBD export name is missing", "spec.dest: write nbd://HOST[:PORT]/EXPORT"),
    Invalid("nbd-fragment", spec(dest="nbd://nbd.example/disk0#x"), "no #fragment",
            "spec.dest: write nbd://HOST[:PORT]/EXPORT"),
    Invalid("nbd-query", spec(dest="nbd://nbd.example/disk0?tls=1"), "nbd:// takes no query",
            "spec.dest: write nbd://HOST[:PORT]/EXPORT"),
    Invalid("nbd-port", spec(dest="nbd://nbd.example:99999/disk0"),
            "the port is not a number in 1-65535", "spec.dest: write nbd://HOST[:PORT]/EXPORT"),
    Invalid("nbd-no-host", spec(dest="nbd:///disk0"), "needs a host",
            "spec.dest: write nbd://HOST[:PORT]/EXPORT"),
    Invalid("nbd-export-with-encoded-slash", spec(dest="nbd://nbd.example/a%2Fb"),
            "the NBD export name is missing", "spec.dest: write nbd://HOST[:PORT]/EXPORT"),
    Invalid("nbd-unix-export-with-encoded-slash",
            spec(dest="nbd+unix:///a%2fb?socket=/run/nbd.sock"), "the NBD export name is missing",
            "spec.dest: write nbd+unix:///EXPORT?socket=/ABSOLUTE/PATH"),
    Invalid("nbd-unbalanced-ipv6", spec(dest="nbd://[fd00::1/disk0"), "is not a valid URI",
            "spec.dest: write nbd://HOST[:PORT]/EXPORT"),
    Invalid("nbd-unix-relative-socket", spec(dest="nbd+unix:///disk0?socket=run/nbd.sock"),
            "write nbd+unix:///EXPORT?socket=/ABSOLUTE/PATH",
            "spec.dest: write nbd+unix:///EXPORT?socket=/ABSOLUTE/PATH"),
    Invalid("not-nbd", spec(dest="http://nbd.example/disk0"),
            "network destinations are NBD URIs",
            "spec.dest must be an absolute path or an NBD URI"),
    # -- quantities and numbers (CEL)
    Invalid("bandwidth-not-a-quantity", spec(bandwidth="fast"), "is not a quantity",
            "spec.bandwidth must be a quantity of bytes per second"),
    Invalid("bandwidth-unknown-suffix", spec(bandwidth="1Zi"), "is not a quantity",
            "spec.bandwidth must be a quantity of bytes per second"),
    Invalid("bandwidth-infinite", spec(bandwidth="inf"), "finite, non-negative",
            "spec.bandwidth must be a quantity of bytes per second"),
    Invalid("bandwidth-nan", spec(bandwidth="nan"), "finite, non-negative",
            "spec.bandwidth must be a quantity of bytes per second"),
    Invalid("bandwidth-suffix-only", spec(bandwidth="Mi"), "is not a quantity",
            "spec.bandwidth must be a quantity of bytes per second"),
    Invalid("bandwidth-negative", spec(bandwidth="-1Mi"), "finite, non-negative",
            "spec.bandwidth must be a quantity of bytes per second"),
    Invalid("bandwidth-negative-int", spec(bandwidth=-5), "finite, non-negative",
            "spec.bandwidth must be a quantity of bytes per second"),
    Invalid("bandwidth-too-large", spec(bandwidth="9Ei"), "is too large",
            "spec.bandwidth must be a quantity of bytes per second"),
    Invalid("bandwidth-milli", spec(bandwidth="5m"), "is not a quantity",
            "spec.bandwidth must be a quantity of bytes per second"),
    Invalid("granularity-too-large", spec(granularity=2**32),
            "libvirt takes at most 4294967295",
            "spec.granularity must be 0 (libvirt's default) or a power of two"),
    # -- combinations (CEL on spec)
    Invalid("base-with-shallow", spec(base="/var/lib/libvirt/images/base.qcow2",
                                      flags=["shallow"]),
            "spec.base and the shallow flag cannot be combined",
            "spec.base and the shallow flag cannot be combined"),
    Invalid("base-into-raw", spec(base="/var/lib/libvirt/images/base.qcow2", format="raw"),
            "spec.base needs a qcow2 destination", "spec.base needs a qcow2 destination"),
    Invalid("chain-with-reuse", spec(backingChain="copy", flags=["reuseExternal"]),
            "copy moves the whole chain", "copy moves the whole chain"),
    Invalid("chain-with-base", spec(backingChain="copy",
                                    base="/var/lib/libvirt/images/base.qcow2"),
            "copy moves the whole chain", "copy moves the whole chain"),
    Invalid("chain-with-shallow", spec(backingChain="copy", flags=["shallow"]),
            "copy moves the whole chain", "copy moves the whole chain"),
    Invalid("chain-onto-nbd", spec(backingChain="copy", dest=NBD),
            "copy needs a directory for the lower images",
            "copy needs a directory for the lower images"),
    Invalid("chain-into-raw", spec(backingChain="copy", format="raw"),
            "copy writes qcow2 images", "copy writes qcow2 images"),
    Invalid("nbd-as-qcow2", spec(dest=NBD, format="qcow2"),
            "a network destination is written raw", "an NBD destination is written raw"),
    Invalid("nbd-shallow", spec(dest=NBD, flags=["shallow"]),
            "a network destination takes a full copy", "an NBD destination takes a full copy"),
    Invalid("nbd-with-base", spec(dest=NBD, base="/var/lib/libvirt/images/base.qcow2"),
            "a network destination takes a full copy", "an NBD destination takes a full copy"),
    # -- refused at admission only: the agent accepts these (abort wins over pivot; libvirt
    #    itself refuses a bad granularity when the copy starts; the bounds are sanity limits;
    #    the agent rounds a fraction of a byte down and strips spaces)
    Invalid("pivot-and-abort", spec(pivot=True, abort=True), None,
            "spec.pivot and spec.abort cannot both be true"),
    Invalid("granularity-not-a-power-of-two", spec(granularity=1000), None,
            "spec.granularity must be 0 (libvirt's default) or a power of two"),
    Invalid("granularity-above-64mi", spec(granularity=2**27), None,
            "spec.granularity must be 0 (libvirt's default) or a power of two"),
    Invalid("granularity-below-512", spec(granularity=256), None,
            "spec.granularity must be 0 (libvirt's default) or a power of two"),
    Invalid("bufsize-above-1gi", spec(bufSize=2**31), None,
            "spec.bufSize must be at most 1073741824"),
    Invalid("bandwidth-above-1ti", spec(bandwidth="2Ti"), None,
            "spec.bandwidth must be a quantity of bytes per second"),
    Invalid("bandwidth-fraction", spec(bandwidth="0.5"), None,
            "spec.bandwidth must be a quantity of bytes per second"),
    Invalid("bandwidth-with-spaces", spec(bandwidth=" 5 "), None,
            "spec.bandwidth must be a quantity of bytes per second"),
    # -- what a plan's children carry (CEL)
    Invalid("create-directories-nbd", spec(dest=NBD, format="raw", createDirectories=True),
            "spec.createDirectories needs a path destination",
            "spec.createDirectories needs a path destination"),
    Invalid("delete-sources-relative", spec(deleteSourcesUnder="srv/array-a"),
            "must be an absolute directory other than /",
            "an absolute, normalised directory other than /"),
    Invalid("delete-sources-not-normalised", spec(deleteSourcesUnder="/srv/a/../b"), None,
            "an absolute, normalised directory other than /"),
)

# Valid specs at the edges of the rules: both sides accept them.
VALID: tuple[dict[str, Any], ...] = (
    GOOD,
    spec(dest=NBD, format="raw"),
    spec(dest="nbd://[fd00::1]/disk0"),
    spec(dest="nbd+unix:///disk0?socket=/run/nbd/disk0.sock"),
    spec(dest="nbd+unix:///disk0?socket=/run/nbd%2Fx.sock"), spec(dest="nbd://h/a%20b"),
    spec(bandwidth="1.5Ki"), spec(bandwidth=0), spec(bandwidth="1Ti"), spec(bandwidth=1048576),
    spec(bandwidth="0"), spec(bandwidth="1e3"), spec(bandwidth="100M"),
    spec(granularity=512), spec(granularity=2**26), spec(granularity=0),
    spec(bufSize=2**30), spec(bufSize=0),
    spec(base="/var/lib/libvirt/images/base.qcow2", format="qcow2"),
    spec(backingChain="copy", format="qcow2"),
    spec(flags=["shallow", "reuseExternal"], format="qcow2"),
    spec(pivot=True, abort=False), spec(pivot=False, abort=True),
    spec(format="", base=""),
)

# The agent's other refusal reasons, and why admission cannot check them: each depends on
# the node (its libvirt, its files, its configuration) at the time the copy starts.
NOT_IN_CEL: dict[str, str] = {
    "DestNotAllowed": "the allowed roots and NBD endpoints are each agent's flags "
                      "(the chart's admissionPolicy checks the tenant policy's roots)",
    "Forbidden": "the tenant policy is the agent's (the chart's admissionPolicy has its roots)",
    "DestExists": "whether the file exists is on the node",
    "DestMissing": "whether the file exists is on the node",
    "DestNotCreatable": "the directory is on the node",
    "DestNotFileOrDevice": "what the path is, is on the node",
    "DestNoSpace": "free space and device sizes are on the node",
    "DestSizeMismatch": "the NBD export's size is learnt from the export",
    "DestUnreadable": "the file system is on the node",
    "DestUnreachable": "the NBD export is reached from the node",
    "DestVanished": "the file is on the node, after the start",
    "DestReplaced": "the file is on the node, after the start",
    "DestInUse": "libvirt knows which VMs use an image",
    "VerifyMismatch": "the check at the switch reads both images while the VM is paused",
    "NotVerifiable": "whether the images can be read is known on the node (their format, "
                     "encryption, an NBD export)",
    "DestIsSource": "the disk's current source is libvirt's",
    "DestInSourceChain": "the disk's backing chain is libvirt's",
    "DestConflict": "the backing chain's file names are libvirt's",
    "DestNotEncrypted": "whether the disk is encrypted is libvirt's",
    "EncryptionNotKept": "whether the disk is encrypted is libvirt's",
    "BaseNotInChain": "the disk's backing chain is libvirt's",
    "DiskBusy": "libvirt knows the disk's block jobs",
    "DiskNotFound": "the domain's disks are libvirt's",
    "DomainNotFound": "the domains are libvirt's",
    "DomainNotRunning": "the domain's state is libvirt's",
    "NotSupportedHere": "the node's libvirt and QEMU versions",
}
