#!/usr/bin/env python3
"""Capture the ACPI DMAR table QEMU (q35 + intel-iommu) really generates.

Find the "RSD PTR " signature in the BIOS area 0xE0000..0xFFFFF, follow the RSDT to the
"DMAR" table and save exactly its bytes (header length) as qemu-<version>-q35-<name>.bin.
How the machine is booted and read: drivers/qemu_capture.py.

Usage: drivers/dmar/tests/data/capture.py [OUTDIR]   (default: this directory)
"""

import os
import struct
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from qemu_capture import Machine, output_dir, poll, qemu_version  # noqa: E402


def find_dmar(m):
    """The DMAR table's bytes, or None while SeaBIOS has not built the tables yet."""
    bios = m.read(0xE0000, 0x20000)
    # The RSDP is 16-byte aligned; check its ACPI 1.0 checksum (first 20 bytes).
    for off in range(0, len(bios) - 20, 16):
        if bios[off:off + 8] == b"RSD PTR " and sum(bios[off:off + 20]) & 0xFF == 0:
            break
    else:
        return None
    (rsdt,) = struct.unpack_from("<I", bios, off + 16)
    hdr = m.read(rsdt, 36)
    if hdr[:4] != b"RSDT":
        return None
    (length,) = struct.unpack_from("<I", hdr, 4)
    body = m.read(rsdt, length)
    for i in range(36, length, 4):
        (table,) = struct.unpack_from("<I", body, i)
        thdr = m.read(table, 36)
        if thdr[:4] == b"DMAR":
            (tlen,) = struct.unpack_from("<I", thdr, 4)
            return m.read(table, tlen)
    return None


def capture(name, *devices):
    """Boots q35 with `devices` and saves its DMAR table as qemu-<version>-q35-<name>.bin."""
    with Machine(*devices) as m:
        dmar = poll("no DMAR table found in guest memory", lambda: find_dmar(m))
        if sum(dmar) & 0xFF != 0:
            sys.exit("captured DMAR table has a bad checksum")
    dest = os.path.join(out, f"qemu-{version}-q35-{name}.bin")
    with open(dest, "wb") as o:
        o.write(dmar)
    print(f"{dest}: {len(dmar)} bytes")


version = qemu_version()
out = output_dir(__file__)

# QEMU 7.2 does NOT set INCLUDE_PCI_ALL: it lists every device of the root bus
# explicitly (endpoints, and bridges as sub-hierarchies) plus the I/O APIC.
# intel-iommu must come before the devices it translates.

# Default VT-d as Moat's `cargo xtask run` uses it (interrupt remapping off) + edu.
capture("dmar", "-device", "intel-iommu,intremap=off", "-device", "edu")
# 48-bit address width (4-level SAGAW) with caching mode.
capture("dmar-aw48-cm", "-device", "intel-iommu,intremap=off,aw-bits=48,caching-mode=on",
        "-device", "edu")
# Interrupt remapping on (x2APIC mode off: eim=on needs KVM in QEMU 7.2).
capture("dmar-ir", "-device", "intel-iommu,intremap=on,eim=off", "-device", "edu")
# Device-IOTLB (ATS) support: QEMU adds an ATSR structure.
capture("dmar-ats", "-device", "intel-iommu,intremap=off,device-iotlb=on", "-device", "edu")
# edu behind a PCIe root port: the port appears as a PCI sub-hierarchy scope.
capture("dmar-rootport", "-device", "intel-iommu,intremap=off",
        "-device", "pcie-root-port,id=rp0,chassis=1,slot=1", "-device", "edu,bus=rp0")
