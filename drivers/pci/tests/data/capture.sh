#!/usr/bin/env bash
# Capture the real PCI configuration space of QEMU's q35 machine with the edu
# device, as SeaBIOS leaves it (BARs assigned, decode enabled).
#
# QEMU boots with no boot disk and stops at "No bootable device"; we then read
# bus 0 through ECAM (q35's MCFG base is 0xb0000000) with QMP `pmemsave` and save
# the first 256 bytes of every function that answers as
# qemu-<version>-q35-<bus>.<dev>.<fn>.cfg.
#
# Usage: drivers/pci/tests/data/capture.sh [OUTDIR]   (default: this directory)
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
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
sock="$work/qmp.sock"

"$qemu" -M q35 -accel tcg -m 128M -display none -nodefaults -no-reboot \
    -device intel-iommu,intremap=off -device edu \
    -qmp "unix:$sock,server=on,wait=off" >"$work/qemu.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT

python3 - "$sock" "$work" "$out" "$version" <<'PY'
import json, os, socket, struct, sys, time

sock_path, work, out, version = sys.argv[1:5]
ECAM = 0xB0000000

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

json.loads(f.readline())
cmd("qmp_capabilities")
tmp = os.path.join(work, "bus0.bin")

def bus0():
    cmd("pmemsave", val=ECAM, size=1 << 20, filename=tmp)
    with open(tmp, "rb") as m:
        return m.read()

# Wait until SeaBIOS has assigned edu's BAR0 (00:01.0, offset 0x10) and enabled
# memory decode, and a moment more for it to finish with the other functions.
deadline = time.time() + 60
while True:
    mem = bus0()
    edu = mem[1 << 15:(1 << 15) + 256]
    if struct.unpack_from("<I", edu, 0x10)[0] & ~0xF and struct.unpack_from("<H", edu, 4)[0] & 2:
        break
    if time.time() > deadline:
        sys.exit("SeaBIOS never assigned edu's BAR")
    time.sleep(0.5)
time.sleep(2)
mem = bus0()

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
cmd("quit")
PY
