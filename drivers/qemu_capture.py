"""Read the guest-physical memory of a QEMU q35 machine as SeaBIOS leaves it.

The one helper behind the drivers' fixture captures (drivers/dmar/tests/data/capture.py: the
ACPI DMAR table; drivers/pci/tests/data/capture.py: PCI configuration space). QEMU boots with
no boot disk: SeaBIOS builds the ACPI tables in guest RAM from QEMU's fw_cfg blobs, assigns the
PCI resources and stops at "No bootable device". The capture then reads guest-physical memory
through QMP `pmemsave`.

Needs: qemu-system-x86_64 (Debian: apt-get install -y qemu-system-x86; $QEMU overrides the
name) and python3.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

QEMU = os.environ.get("QEMU", "qemu-system-x86_64")


def qemu_version():
    """QEMU's major.minor version (the fixtures are named after it); exits if QEMU is missing."""
    if shutil.which(QEMU) is None:
        sys.exit(f"error: {QEMU} not found; install it with: apt-get install -y qemu-system-x86")
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True).stdout
    return re.match(r"QEMU emulator version (\d+\.\d+)", out).group(1)


def output_dir(script):
    """The directory a capture writes to: argv[1], or the directory of the capture script."""
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(script))
    os.makedirs(out, exist_ok=True)
    return out


def poll(what, probe, timeout=60):
    """Calls `probe` every half second until it returns something other than None (SeaBIOS
    needs a moment under TCG); exits naming `what` after `timeout` seconds."""
    deadline = time.time() + timeout
    while True:
        found = probe()
        if found is not None:
            return found
        if time.time() > deadline:
            sys.exit(f"{what}: timed out")
        time.sleep(0.5)


class Machine:
    """A q35 machine (TCG, 128 MiB, no disk) with `devices` as extra QEMU arguments, driven
    through QMP. Use it as a context manager; on failure it prints what QEMU said."""

    def __init__(self, *devices):
        self.devices = devices

    def __enter__(self):
        self.work = tempfile.mkdtemp()
        sock_path = os.path.join(self.work, "qmp.sock")
        self.log_path = os.path.join(self.work, "qemu.log")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [QEMU, "-M", "q35", "-accel", "tcg", "-m", "128M", "-display", "none",
                 "-nodefaults", "-no-reboot", *self.devices,
                 "-qmp", f"unix:{sock_path},server=on,wait=off"],
                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 30
            while True:
                try:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.connect(sock_path)
                    break
                except OSError:
                    if self.proc.poll() is not None:
                        sys.exit("QEMU exited")
                    if time.time() > deadline:
                        sys.exit("QMP socket never came up")
                    time.sleep(0.1)
            self.qmp = s.makefile("rw")
            json.loads(self.qmp.readline())  # greeting
            self.cmd("qmp_capabilities")
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def cmd(self, name, **args):
        """Runs one QMP command and returns its result (asynchronous events are skipped)."""
        self.qmp.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.qmp.flush()
        while True:
            msg = json.loads(self.qmp.readline())
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise RuntimeError(msg["error"])

    def read(self, addr, size):
        """`size` bytes of guest-physical memory at `addr`."""
        tmp = os.path.join(self.work, "mem.bin")
        self.cmd("pmemsave", val=addr, size=size, filename=tmp)
        with open(tmp, "rb") as m:
            return m.read()

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.cmd("quit")
        finally:
            self.proc.kill()
            self.proc.wait()
            if exc_type is not None:
                print(f"error: capture with {' '.join(self.devices)} failed; QEMU said:",
                      file=sys.stderr)
                with open(self.log_path) as log:
                    sys.stderr.write(log.read())
            shutil.rmtree(self.work)
        return False
