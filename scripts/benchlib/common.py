"""What every bench suite uses: where the binaries are, running a VM, a vdpu, the API, and the
machine's facts."""
import json
import mmap
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time

from benchlib import record

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VMM = os.path.join(ROOT, "target/release/vio-hypervisor")
GUEST = os.path.join(ROOT, "guest/target/x86_64-unknown-linux-gnu/release/vio-guest")
LINUX = os.environ.get("VIO_LINUX_KERNEL", os.path.join(os.path.dirname(ROOT), "shared/linux/vmlinux"))
INITRAMFS = os.path.join(ROOT, "build/linux-initramfs.cpio")
# What the shared kernel needs on this machine (its README); tests/common/mod.rs has the same.
LINUX_CMDLINE = ("console=ttyS0 noxsave clearcpuid=popcnt,smap,fsgsbase,rdpid,rdtscp,114,erms,fsrm,pcid,invpcid "
                 "nopti loglevel=5 printk.devkmsg=on panic=-1")
PROGRESS = re.compile(r"Guest boot progress: code 0x40 at ([0-9.]+) ms")


def build():
    subprocess.run([os.path.join(ROOT, "scripts/build-guest.sh")], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cargo", "build", "--workspace", "--release", "--locked", "-q"], check=True, cwd=ROOT)


def boot(cmdline, disk=None, memory="size=512M", extra=()):
    args = [VMM, "-v", "--kernel", GUEST, "--memory", memory, "--serial", "tty", "--cmdline", cmdline]
    if disk:
        args += ["--disk", f"path={disk}"]
    args += list(extra)
    t0 = time.monotonic()
    p = subprocess.run(args, capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - t0
    if p.returncode != 0:
        sys.exit(f"VMM failed ({p.returncode}): {p.stderr[-2000:]}")
    result = None
    for line in p.stdout.splitlines():
        if line.startswith("VIO-GUEST-RESULT "):
            result = json.loads(line[len("VIO-GUEST-RESULT "):])
    m = PROGRESS.search(p.stderr)
    cpl3_ms = float(m.group(1)) if m else None
    record.raw({"wall_s": wall, "cpl3_ms": cpl3_ms, "result": result}, shlex.join(args))
    return {"wall_s": wall, "cpl3_ms": cpl3_ms, "result": result, "cmd": shlex.join(args)}


def med(xs):
    return statistics.median(xs)


class Vdpu:
    """A vdpu process serving `disk` for the duration of a `with` block."""

    def __init__(self, disk, opts=""):
        self.sock = os.path.join(os.path.dirname(disk), f"vdpu-{os.getpid()}.sock")
        self.cmd = [os.path.join(ROOT, "target/release/vdpu"), "--socket", self.sock, "--blk", f"path={disk}{opts}"]

    def __enter__(self):
        self.p = subprocess.Popen(self.cmd, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock):
            if time.monotonic() > deadline:
                sys.exit("vdpu did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *a):
        self.p.terminate()
        self.p.wait()


def shown_with_vdpu(cmd, tmpfs, vdpu):
    """A VMM command line as documented: tmpfs paths as $TMPFS, with the vdpu it talks to."""
    cmd = cmd.replace(tmpfs, "$TMPFS").replace(os.path.basename(vdpu.sock), "vdpu.sock")
    return "(vdpu --socket $TMPFS/vdpu.sock --blk path=$TMPFS/disk.img) " + cmd


def api(sock, method, endpoint, body=""):
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.sendall(f"{method} /api/v1/{endpoint} HTTP/1.1\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    head, _, body = out.decode().partition("\r\n\r\n")
    parts = head.split(" ")
    if len(parts) < 2:
        # The VMM went away mid-request (the guest powered off).
        raise OSError("no response")
    return int(parts[1]), body


def wait_resident(sock, at_least, timeout=120):
    """Waits until the guest has made `at_least` bytes of its RAM resident."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            st, body = api(sock, "GET", "vm.counters")
            if st == 200 and json.loads(body)["memory"]["resident_bytes"] >= at_least:
                return
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(0.05)
    sys.exit("guest never filled its memory")


def logged_counters(stderr, dev):
    key = f"Device {dev} counters: "
    for line in reversed(stderr.splitlines()):
        if key in line:
            return json.loads(line.split(key, 1)[1])
    sys.exit(f"no counters for {dev}")


def vio_run(disk, args, cmd, during=None):
    """blk-verify with a vdpu device (`args`: its flag and value), an API socket, and `during`
    (called with the socket while the guest runs); returns the result, the device's counters,
    what `during` returned and the command line."""
    sock = os.path.join(os.path.dirname(disk), f"api-{os.getpid()}.sock")
    full = [VMM, "-v", "--kernel", GUEST, "--memory", "size=512M,shared=on,reclaim=on", "--serial", "tty",
            "--api-socket", sock] + args + ["--cmdline", cmd]
    p = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = []
    t = threading.Thread(target=lambda: err.append(p.stderr.read()))
    t.start()
    got = None
    if during:
        while not os.path.exists(sock) and p.poll() is None:
            time.sleep(0.01)
        got = during(sock, p)
    out = p.stdout.read()
    p.wait()
    t.join()
    if "VIO-GUEST-RESULT " not in out:
        sys.exit(f"no result: {out[-2000:]}\n{err[0][-2000:]}")
    res = json.loads(out.split("VIO-GUEST-RESULT ", 1)[1].splitlines()[0])
    assert res["mismatches"] == 0 and res["io_errors"] == 0, res
    res["steady_iops"] = steady_iops(out, res)
    counters = logged_counters(err[0], "dpu0")
    record.raw({"result": res, "counters": counters}, shlex.join(full))
    return res, counters, got, shlex.join(full)


def steady_iops(out, res, after_ns=2_000_000_000):
    """The rate from the first progress line at least `after_ns` into the run to its end: auto
    mode's steady state, after its dwell and switch."""
    for line in out.splitlines():
        if line.startswith("VIO-GUEST-PROGRESS "):
            p = json.loads(line[len("VIO-GUEST-PROGRESS "):])
            if p["elapsed_ns"] >= after_ns and res["elapsed_ns"] > p["elapsed_ns"]:
                return (res["ops"] - p["ops"]) * 1e9 / (res["elapsed_ns"] - p["elapsed_ns"])
    return res["iops"]


def fresh_memory_rate(size):
    """GiB/s at which this host hands out memory a process writes for the first time (a fresh
    memfd, filled 1 MiB at a time): the bound for any fault-in, which copies into fresh pages.
    On a nested host it moves with the host's own host, so fault-in is reported against it."""
    chunk = os.urandom(1 << 20)
    fd = os.memfd_create("bench-fresh")
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as m:
            t0 = time.perf_counter()
            for off in range(0, size, len(chunk)):
                m[off:off + len(chunk)] = chunk
            return size / (time.perf_counter() - t0) / (1 << 30)
    finally:
        os.close(fd)


def run_linux(args):
    p = subprocess.run(args, capture_output=True, text=True, timeout=900)
    if p.returncode != 0 or "VIO-GUEST-RESULT " not in p.stdout:
        sys.exit(f"Linux run failed ({p.returncode}): {p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    r = json.loads(p.stdout.split("VIO-GUEST-RESULT ", 1)[1].splitlines()[0])
    assert r["mismatches"] == 0 and r["io_errors"] == 0, r
    record.raw({"result": r}, shlex.join(args))
    return r


def machine():
    """What the numbers were measured on (every results file carries it)."""
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) << 10
    kvm = "pvm (kvm_pvm: nested, guest CPL0 emulated)" if os.path.isdir("/sys/module/kvm_pvm") else "kvm"
    return {"cores": os.cpu_count(), "memory_bytes": mem, "kernel": os.uname().release,
            "kvm": kvm, "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                                 capture_output=True, text=True).stdout.strip()}
