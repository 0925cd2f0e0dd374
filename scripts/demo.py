#!/usr/bin/env python3
"""The VIO demo: the same workload on two VMs side by side, each with a vdpu (the software DPU)
passed through, one as plain passthrough (`--user-device`: all guest RAM pinned, reclaim
refuses it) and one under VIO (`--vio`: IOPA-Snoop with Lockpage, guest RAM reclaimable).

Both guests run blk-verify (random 4 KiB reads and writes, every byte verified) over a 256 MiB
buffer pool spread across 1 GiB of RAM, with the same reclaim policy (pages idle for 1 s go, up
to 70% of RAM). A live table shows each VM's IOPS and resident memory, and for VIO what it
reclaimed, keeps locked and faulted back in, and the device's I/O page faults (0: the device
never sees a request whose pages are not resident and mapped). Then a summary.

    scripts/demo.sh [--seconds N]     (default 60)

Run through scripts/demo.sh, which builds everything first.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMM = os.path.join(ROOT, "target/release/vio-hypervisor")
VDPU = os.path.join(ROOT, "target/release/vdpu")
GUEST = os.path.join(ROOT, "guest/target/x86_64-unknown-linux-gnu/release/vio-guest")
MIB = 1 << 20


def api(sock, method, endpoint, body=""):
    """One request to a VMM's API socket: (status, body); (0, "") if the VMM is gone."""
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock)
        s.sendall(f"{method} /api/v1/{endpoint} HTTP/1.1\r\nContent-Length: {len(body)}\r\n"
                  f"Connection: close\r\n\r\n{body}".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        head, _, rest = out.decode().partition("\r\n\r\n")
        return int(head.split(" ")[1]), rest
    except (OSError, IndexError, ValueError):
        return 0, ""


class Vm:
    def __init__(self, name, flag, extra, work, seconds, rate):
        self.name, self.work = name, work
        disk = os.path.join(work, f"{name}.img")
        with open(disk, "wb") as f:
            f.truncate(256 * MIB)
        vsock = os.path.join(work, f"{name}-vdpu.sock")
        self.vdpu = subprocess.Popen([VDPU, "--socket", vsock, "--blk", f"path={disk}"],
                                     stderr=open(os.path.join(work, f"{name}-vdpu.log"), "w"))
        for _ in range(200):
            if os.path.exists(vsock):
                break
            time.sleep(0.05)
        self.sock = os.path.join(work, f"{name}-api.sock")
        self.serial = os.path.join(work, f"{name}-serial.log")
        cmdline = (f"vio.workload=blk-verify vio.ops=1000000000 vio.phases={rate}:{seconds}s vio.qd=16 "
                   "vio.pool_pages=65536 vio.seed=1")
        self.vmm = subprocess.Popen(
            [VMM, "--kernel", GUEST, "--memory", "size=1G,shared=on,reclaim=on",
             "--reclaim", f"interval_ms=500,idle_ms=1000,target_pct=70,store={work}",
             flag, f"socket={vsock},id=dpu0{extra}", "--api-socket", self.sock,
             "--serial", f"file={self.serial}", "--console", "off", "--cmdline", cmdline],
            stderr=open(os.path.join(work, f"{name}-vmm.log"), "w"))
        self.last = {}
        self.resident = 0

    def progress(self):
        """The guest's last complete progress line, or None while it is half written."""
        try:
            with open(self.serial, "rb") as f:
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            if line.startswith("VIO-GUEST-PROGRESS "):
                try:
                    return json.loads(line.split(" ", 1)[1])
                except ValueError:
                    return None
        return {}

    def result(self):
        try:
            with open(self.serial, "rb") as f:
                for line in f.read().decode(errors="replace").splitlines():
                    if line.startswith(("VIO-GUEST-RESULT ", "VIO-GUEST-ERROR ")):
                        return line
        except OSError:
            pass
        return None

    def sample(self):
        st, body = api(self.sock, "GET", "vm.counters")
        if st != 200:
            return None
        c = json.loads(body)
        self.last = c
        self.resident = c.get("memory", {}).get("resident_bytes", 0)
        return c

    def stop(self):
        for p in (self.vmm, self.vdpu):
            if p.poll() is None:
                p.terminate()
            p.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=60, help="how long the guests run (default 60)")
    ap.add_argument("--rate", type=int, default=5000, help="requests/s each guest asks for (default 5000)")
    a = ap.parse_args()
    if not os.path.exists("/dev/kvm"):
        sys.exit("The demo needs /dev/kvm.")
    work = tempfile.mkdtemp(prefix="vio-demo.", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    print(f"Two VMs, 1 GiB each, blk-verify at up to {a.rate} requests/s for {a.seconds} s over a 256 MiB "
          "buffer pool,\nreclaim policy on both (pages idle for 1 s, up to 70% of RAM). vdpu passed through:\n"
          "  passthrough: --user-device (today's cloud: all RAM pinned, reclaim refuses it)\n"
          "  VIO:         --vio ...,lockpage=on (IOPA-Snoop: RAM reclaimable, the device never faults)\n")
    vms = [Vm("passthrough", "--user-device", "", work, a.seconds, a.rate),
           Vm("vio", "--vio", ",lockpage=on", work, a.seconds, a.rate)]
    pt, vio = vms
    print(f"{'':>5} | {'passthrough':^21} | {'VIO':^62}")
    print(f"{'time':>5} | {'IOPS':>7} {'resident MiB':>13} | {'IOPS':>7} {'resident MiB':>13} "
          f"{'reclaimed MiB':>14} {'locked MiB':>11} {'fault-ins':>9} {'iopf':>4}")
    start = time.monotonic()
    try:
        while any(v.vmm.poll() is None for v in vms):
            time.sleep(1)
            cols = []
            for v in vms:
                p = v.progress()
                c = v.sample()
                if p is None or c is None:
                    cols = None  # a line still being written, or the VM is gone: skip
                    break
                cols.append((p, c))
            if not cols:
                continue
            (pp, pc), (vp, vc) = cols
            m, d = vc.get("memory", {}), vc.get("dpu0", {})
            print(f"{time.monotonic() - start:>4.0f}s | {pp.get('iops', 0):>7} "
                  f"{pc.get('memory', {}).get('resident_bytes', 0) // MIB:>13} | "
                  f"{vp.get('iops', 0):>7} {m.get('resident_bytes', 0) // MIB:>13} "
                  f"{m.get('reclaimed_bytes', 0) // MIB:>14} {d.get('locked_bytes', 0) // MIB:>11} "
                  f"{d.get('faultins', 0):>9} {d.get('iopf', 0):>4}", flush=True)
    finally:
        for v in vms:
            v.stop()
    print()
    ok = True
    for v in vms:
        line = v.result() or "no result"
        print(f"{v.name}: {line}")
        if not line.startswith("VIO-GUEST-RESULT "):
            ok = False
            continue
        r = json.loads(line.split(" ", 1)[1])
        v.res = r
        ok &= r.get("mismatches", 1) == 0 and r.get("io_errors", 1) == 0
    if ok:
        give = pt.resident - vio.resident
        print(f"\nSummary: passthrough {pt.res['iops']:,} IOPS, VIO {vio.res['iops']:,} IOPS, both with 0 "
              f"mismatches and 0 I/O errors; the VIO device took {vio.last.get('dpu0', {}).get('iopf', 0)} I/O "
              f"page faults.\nResident guest memory at the end: passthrough {pt.resident // MIB} MiB, "
              f"VIO {vio.resident // MIB} MiB: {give // MIB} MiB given back to the host "
              f"({give * 100 // (1 << 30)}% of the VM's RAM).")
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
