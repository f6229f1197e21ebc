#!/usr/bin/env python3
"""Capture the real PCI configuration space of QEMU's q35 machine with the edu device, as
SeaBIOS leaves it (BARs assigned, decode enabled).

Read bus 0 through ECAM (q35's MCFG base is 0xb0000000) and save the first 256 bytes of every
function that answers as qemu-<version>-q35-<bus>.<dev>.<fn>.cfg. How the machine is booted
and read: drivers/qemu_capture.py.

Usage: drivers/pci/tests/data/capture.py [OUTDIR]   (default: this directory)
"""

import os
import struct
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from qemu_capture import Machine, output_dir, poll, qemu_version  # noqa: E402

ECAM = 0xB0000000

version = qemu_version()
out = output_dir(__file__)


def edu_assigned(m):
    """True once SeaBIOS has assigned edu's BAR0 (00:01.0, offset 0x10) and enabled memory
    decode; None before."""
    edu = m.read(ECAM + (1 << 15), 256)
    bar0 = struct.unpack_from("<I", edu, 0x10)[0] & ~0xF
    decode = struct.unpack_from("<H", edu, 4)[0] & 2
    return True if bar0 and decode else None


with Machine("-device", "intel-iommu,intremap=off", "-device", "edu") as m:
    poll("SeaBIOS never assigned edu's BAR", lambda: edu_assigned(m))
    # A moment more for SeaBIOS to finish with the other functions.
    time.sleep(2)
    mem = m.read(ECAM, 1 << 20)

for dev in range(32):
    for fn in range(8):
        off = (dev << 15) | (fn << 12)
        cfg = mem[off:off + 256]
        if struct.unpack_from("<H", cfg, 0)[0] in (0xFFFF, 0):
            continue
        name = os.path.join(out, f"qemu-{version}-q35-00.{dev:02x}.{fn}.cfg")
        with open(name, "wb") as o:
            o.write(cfg)
        print(name)
