#!/usr/bin/env bash
# Capture the ACPI DMAR table QEMU (q35 + intel-iommu) really generates.
#
# QEMU boots with no boot disk: SeaBIOS builds the ACPI tables in guest RAM from
# QEMU's fw_cfg table blobs and stops at "No bootable device". We then read guest
# physical memory through QMP `pmemsave`: find the "RSD PTR " signature in the
# BIOS area 0xE0000..0xFFFFF, follow the RSDT to the "DMAR" table and save exactly
# its bytes (header length).
#
# Usage: drivers/dmar/tests/data/capture.sh [OUTDIR]   (default: this directory)
# Needs: qemu-system-x86_64 (Debian: apt-get install -y qemu-system-x86), python3.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here}"
mkdir -p "$out"
qemu="${QEMU:-qemu-system-x86_64}"
command -v "$qemu" >/dev/null || {
    echo "error: $qemu not found; install it with: apt-get install -y qemu-system-x86" >&2
    exit 1
}
version="$("$qemu" --version | sed -n 's/^QEMU emulator version \([0-9]*\.[0-9]*\).*/\1/p')"

# capture NAME QEMU_DEVICE_ARGS...
capture() {
    local name="$1"
    shift
    local work
    work="$(mktemp -d)"
    local sock="$work/qmp.sock"
    "$qemu" -M q35 -accel tcg -m 128M -display none -nodefaults -no-reboot \
        "$@" \
        -qmp "unix:$sock,server=on,wait=off" >"$work/qemu.log" 2>&1 &
    local pid=$!
    local rc=0
    python3 - "$sock" "$work" "$out/qemu-$version-q35-$name.bin" <<'PY' || rc=$?
import json, os, socket, struct, sys, time

sock_path, work, dest = sys.argv[1], sys.argv[2], sys.argv[3]

deadline = time.time() + 30
while True:
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_path)
        break
    except OSError:
        if time.time() > deadline:
            sys.exit("QMP socket never came up")
        time.sleep(0.1)
f = s.makefile("rw")

def cmd(name, **args):
    f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
    f.flush()
    while True:
        msg = json.loads(f.readline())
        if "return" in msg:
            return msg["return"]
        if "error" in msg:
            raise RuntimeError(msg["error"])
        # asynchronous events are ignored

json.loads(f.readline())  # greeting
cmd("qmp_capabilities")

tmp = os.path.join(work, "mem.bin")

def read(addr, size):
    cmd("pmemsave", val=addr, size=size, filename=tmp)
    with open(tmp, "rb") as m:
        return m.read()

def find_dmar():
    bios = read(0xE0000, 0x20000)
    # The RSDP is 16-byte aligned; check its ACPI 1.0 checksum (first 20 bytes).
    for off in range(0, len(bios) - 20, 16):
        if bios[off:off + 8] == b"RSD PTR " and sum(bios[off:off + 20]) & 0xFF == 0:
            break
    else:
        return None
    (rsdt,) = struct.unpack_from("<I", bios, off + 16)
    hdr = read(rsdt, 36)
    if hdr[:4] != b"RSDT":
        return None
    (length,) = struct.unpack_from("<I", hdr, 4)
    body = read(rsdt, length)
    for i in range(36, length, 4):
        (table,) = struct.unpack_from("<I", body, i)
        thdr = read(table, 36)
        if thdr[:4] == b"DMAR":
            (tlen,) = struct.unpack_from("<I", thdr, 4)
            return read(table, tlen)
    return None

# SeaBIOS needs a moment (under TCG) to build the tables: poll until they exist.
deadline = time.time() + 60
while True:
    dmar = find_dmar()
    if dmar is not None:
        break
    if time.time() > deadline:
        sys.exit("no DMAR table found in guest memory")
    time.sleep(0.5)

if sum(dmar) & 0xFF != 0:
    sys.exit("captured DMAR table has a bad checksum")
with open(dest, "wb") as o:
    o.write(dmar)
print(f"{dest}: {len(dmar)} bytes")
cmd("quit")
PY
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    if [ "$rc" -ne 0 ]; then
        echo "error: capture of $name ($*) failed; QEMU said:" >&2
        cat "$work/qemu.log" >&2
        rm -rf "$work"
        return "$rc"
    fi
    rm -rf "$work"
}

# QEMU 7.2 does NOT set INCLUDE_PCI_ALL: it lists every device of the root bus
# explicitly (endpoints, and bridges as sub-hierarchies) plus the I/O APIC.
# intel-iommu must come before the devices it translates.

# Default VT-d as Moat's `cargo xtask run` uses it (interrupt remapping off) + edu.
capture dmar -device intel-iommu,intremap=off -device edu
# 48-bit address width (4-level SAGAW) with caching mode.
capture dmar-aw48-cm -device intel-iommu,intremap=off,aw-bits=48,caching-mode=on -device edu
# Interrupt remapping on (x2APIC mode off: eim=on needs KVM in QEMU 7.2).
capture dmar-ir -device intel-iommu,intremap=on,eim=off -device edu
# Device-IOTLB (ATS) support: QEMU adds an ATSR structure.
capture dmar-ats -device intel-iommu,intremap=off,device-iotlb=on -device edu
# edu behind a PCIe root port: the port appears as a PCI sub-hierarchy scope.
capture dmar-rootport -device intel-iommu,intremap=off \
    -device pcie-root-port,id=rp0,chassis=1,slot=1 -device edu,bus=rp0
