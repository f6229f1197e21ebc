#!/usr/bin/env python3
"""Instructions per operation by function, from tbprof profiles (see README.md).

usage: profile.py A.txt OPS_A [B.txt OPS_B] [--elf ELF ...] [--top N]

OPS is the number of operations the profile covers (a number, or an xtask log whose
`dma-bench` line has `ops=`). With two profiles (same build), prints A, B and A - B per
function. Counts of the boot, firmware and calibration are not per operation: look at the
functions of the path you measure.
"""
import argparse, bisect, collections, re, subprocess

ap = argparse.ArgumentParser()
ap.add_argument("runs", nargs="+")
ap.add_argument("--elf", action="append", default=[])
ap.add_argument("--top", type=int, default=45)
a = ap.parse_args()
elfs = a.elf or ["target/x86_64-unknown-none/release/moat", "target/x86_64-unknown-none/release/moat-test-guest"]
if len(a.runs) not in (2, 4):
    ap.error("give PROFILE OPS, or two of them")

def ops(x):
    if x.endswith(".log"):
        m = re.findall(r"dma-bench policy=.* ops=(\d+)", open(x).read())
        return float(m[-1])
    return float(x)

syms = []
for elf in elfs:
    out = subprocess.run(["nm", "-n", "-C", "--defined-only", elf], capture_output=True, text=True, check=True).stdout
    tag = elf.rsplit("/", 1)[-1]
    for l in out.splitlines():
        p = l.split(" ", 2)
        if len(p) == 3 and p[1] in "tTwW":
            syms.append((int(p[0], 16), tag + ": " + p[2]))
syms.sort()
addrs = [s[0] for s in syms]

def load(path, n):
    agg = collections.Counter()
    for l in open(path):
        va, k, c = l.split()
        i = bisect.bisect_right(addrs, int(va, 16)) - 1
        agg[syms[i][1] if i >= 0 else "?"] += int(k) * int(c)
    return {f: v / n for f, v in agg.items()}

profs = [load(a.runs[i], ops(a.runs[i + 1])) for i in range(0, len(a.runs), 2)]
names = sorted(set().union(*profs), key=lambda f: -max(p.get(f, 0) for p in profs))
if len(profs) == 1:
    print(f"{'per op':>9}  function")
    for f in names[: a.top]:
        print(f"{profs[0][f]:9.1f}  {f[:150]}")
else:
    print(f"{'A':>9} {'B':>9} {'A - B':>9}  function")
    for f in names[: a.top]:
        x, y = profs[0].get(f, 0), profs[1].get(f, 0)
        print(f"{x:9.1f} {y:9.1f} {x - y:9.1f}  {f[:150]}")
