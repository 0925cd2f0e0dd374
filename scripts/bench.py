#!/usr/bin/env python3
"""Bench harness: runs each configuration several times in one go and reports medians.

    scripts/bench.sh [--quick] [--runs N] [SUITE...]    (this script, built first)

Every number in docs/performance.md comes from here, with the command that produced it.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import net, paper, record  # noqa: E402
from benchlib.common import *  # noqa: E402,F401,F403


def foundation(runs):
    rows = []
    boots = [boot("vio.workload=mem-verify vio.mem_mb=1 vio.rounds=1 vio.idle_ms=0") for _ in range(runs)]
    rows.append(("boot: VMM start to first CPL3 instruction", f"{med([b['cpl3_ms'] for b in boots]):.1f} ms", boots[0]["cmd"]))
    rows.append(("boot: VMM start to exit (1 MiB mem-verify, RESULT, power-off)", f"{med([b['wall_s'] for b in boots]) * 1000:.1f} ms", boots[0]["cmd"]))
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        disk = os.path.join(d, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(256 << 20)
        for qd in (1, 16):
            cmd = f"vio.workload=blk-verify vio.ops=200000 vio.qd={qd} vio.seed=1"
            rs = [boot(cmd, disk) for _ in range(runs)]
            for r in rs:
                assert r["result"]["mismatches"] == 0 and r["result"]["io_errors"] == 0, r["result"]
            iops = med([r["result"]["iops"] for r in rs])
            p50 = med([r["result"]["lat_p50_ns"] for r in rs]) / 1000
            p99 = med([r["result"]["lat_p99_ns"] for r in rs]) / 1000
            rows.append((f"blk-verify qd={qd}, emulated virtio-blk, tmpfs", f"{iops:,.0f} IOPS (p50 {p50:.1f} us, p99 {p99:.1f} us)", rs[0]["cmd"]))
    return rows


def vdpu_suite(runs):
    rows = []
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        disk = os.path.join(d, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(256 << 20)
        configs = [
            ("emulated virtio-blk (VMM thread)", lambda: None, lambda v: ["--memory", "size=512M,shared=on"], True),
            ("vdpu passthrough (doorbell ioeventfd -> vdpu)", lambda: Vdpu(disk), lambda v: ["--user-device", f"socket={v.sock}"], False),
            ("vdpu, base protocol (doorbell -> VMM -> socket)", lambda: Vdpu(disk), lambda v: ["--user-device", f"socket={v.sock},io_fds=off"], False),
        ]
        for qd in (1, 16):
            cmd = f"vio.workload=blk-verify vio.ops=100000 vio.qd={qd} vio.seed=1"
            for name, make, extra, emulated in configs:
                rs = []
                for _ in range(runs):
                    dev = make()
                    v = dev
                    if dev:
                        with dev as v:
                            rs.append(boot(cmd, None, "size=512M,shared=on", extra(v)))
                    else:
                        rs.append(boot(cmd, disk, "size=512M,shared=on"))
                for r in rs:
                    assert r["result"]["mismatches"] == 0 and r["result"]["io_errors"] == 0, r["result"]
                iops = med([r["result"]["iops"] for r in rs])
                p50 = med([r["result"]["lat_p50_ns"] for r in rs]) / 1000
                p99 = med([r["result"]["lat_p99_ns"] for r in rs]) / 1000
                shown = rs[0]["cmd"].replace(d + "/", "$TMPFS/")
                if not emulated:
                    shown = shown_with_vdpu(shown, d, v)
                rows.append((f"qd={qd}, {name}", f"{iops:,.0f} IOPS (p50 {p50:.1f} us, p99 {p99:.1f} us)", shown))
    return rows


def reclaim_suite(runs):
    rows = []
    tput, p50s, p99s = [], [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as d:
            sock = os.path.join(d, "api.sock")
            args = [VMM, "-v", "--kernel", GUEST, "--memory", "size=1G,shared=on,reclaim=on", "--serial", "tty",
                    "--api-socket", sock, "--cmdline", "vio.workload=mem-verify vio.mem_mb=768 vio.rounds=1 vio.idle_ms=6000"]
            p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_resident(sock, 760 << 20)
            t0 = time.monotonic()
            st, body = api(sock, "PUT", "vm.reclaim", json.dumps({"bytes": 768 << 20}))
            dt = time.monotonic() - t0
            rep = json.loads(body)
            tput.append(rep["reclaimed_bytes"] / dt / (1 << 30))
            out, err = p.communicate(timeout=300)
            res = json.loads(out.split("VIO-GUEST-RESULT ", 1)[1].splitlines()[0])
            assert res["mismatches"] == 0, res
            m = logged_counters(err, "memory")
            p50s.append(m["restore_ns_p50"] / 1000)
            p99s.append(m["restore_ns_p99"] / 1000)
            shown = shlex.join(args).replace(d, "$TMP")
    rows.append(("reclaim throughput (vm.reclaim of 768 MiB, lz4 store in /tmp)", f"{med(tput):.2f} GiB/s", shown + " ; then PUT vm.reclaim {\"bytes\": 805306368}"))
    rows.append(("restore latency (guest re-reads every reclaimed page)", f"p50 {med(p50s):.1f} us, p99 {med(p99s):.1f} us", shown))
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        disk = os.path.join(d, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(256 << 20)
        cmd = "vio.workload=blk-verify vio.ops=200000 vio.qd=16 vio.pool_pages=4096 vio.seed=1"
        off = [boot(cmd, disk, "size=512M,shared=on") for _ in range(runs)]
        on = [boot(cmd, disk, "size=512M,shared=on,reclaim=on", ["--reclaim", "interval_ms=100,idle_ms=200,target_pct=0"]) for _ in range(runs)]
        i_off = med([r["result"]["iops"] for r in off])
        i_on = med([r["result"]["iops"] for r in on])
        rows.append(("cold-detection overhead: blk-verify qd16 IOPS, sampling every 200 ms vs none", f"{i_on:,.0f} vs {i_off:,.0f} IOPS ({i_on / i_off:.2f}x)", on[0]["cmd"].replace(d + "/", "$TMPFS/")))
    return rows


def vio_churn(disk, vdpu, cmd):
    """blk-verify under --vio with vm.reclaim of half of RAM every 100 ms; returns the result and
    the device's counters."""
    sock = os.path.join(os.path.dirname(disk), f"api-{os.getpid()}.sock")
    args = [VMM, "-v", "--kernel", GUEST, "--memory", "size=512M,shared=on,reclaim=on", "--serial", "tty",
            "--vio", f"socket={vdpu.sock},id=dpu0", "--api-socket", sock, "--cmdline", cmd]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = []
    t = threading.Thread(target=lambda: err.append(p.stderr.read()))
    t.start()
    passes = 0
    while p.poll() is None:
        try:
            st, _ = api(sock, "PUT", "vm.reclaim", json.dumps({"bytes": 256 << 20}))
            passes += st == 200
        except OSError:
            pass
        time.sleep(0.1)
    out = p.stdout.read()
    t.join()
    res = json.loads(out.split("VIO-GUEST-RESULT ", 1)[1].splitlines()[0])
    return res, logged_counters(err[0], "dpu0"), passes, shlex.join(args)


def vio_suite(runs):
    rows = []
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        disk = os.path.join(d, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(256 << 20)

        for qd in (1, 16):
            cmd = f"vio.workload=blk-verify vio.ops=100000 vio.qd={qd} vio.seed=1"
            got = {}
            for name, flag in (("passthrough", "--user-device"), ("vio (snoop)", "--vio")):
                rs = []
                for _ in range(runs):
                    with Vdpu(disk) as v:
                        rs.append(boot(cmd, None, "size=512M,shared=on", [flag, f"socket={v.sock}"]))
                for r in rs:
                    assert r["result"]["mismatches"] == 0 and r["result"]["io_errors"] == 0, r["result"]
                iops = med([r["result"]["iops"] for r in rs])
                p50 = med([r["result"]["lat_p50_ns"] for r in rs]) / 1000
                got[name] = iops
                rows.append((f"qd={qd}, vdpu {name}", f"{iops:,.0f} IOPS (p50 {p50:.1f} us)", shown_with_vdpu(rs[0]["cmd"], d, v)))
            rows.append((f"qd={qd}, vio / passthrough", f"{got['vio (snoop)'] / got['passthrough']:.2f}x", ""))
        cmd = "vio.workload=blk-verify vio.ops=200000 vio.qd=16 vio.pool_pages=16384 vio.seed=1"
        rs = []
        for _ in range(runs):
            with Vdpu(disk) as v:
                rs.append(vio_churn(disk, v, cmd))
        for res, c, _, _ in rs:
            assert res["mismatches"] == 0 and res["io_errors"] == 0 and c["iopf"] == 0, (res, c)
        iops = med([r[0]["iops"] for r in rs])
        fi = med([r[1]["faultins"] for r in rs])
        p50 = med([r[1]["q0_faultin_ns_p50"] for r in rs]) / 1000
        p99 = med([r[1]["q0_faultin_ns_p99"] for r in rs]) / 1000
        passes = med([r[2] for r in rs])
        rows.append(("qd=16, vio under reclaim churn (256 MiB vm.reclaim every 100 ms, 64 MiB of buffers)",
                     f"{iops:,.0f} IOPS, {fi:,.0f} fault-ins (p50 {p50:.0f} us, p99 {p99:.0f} us), {passes:.0f} reclaim passes, 0 IOPF",
                     shown_with_vdpu(rs[0][3], d, v) + " ; meanwhile PUT vm.reclaim {\"bytes\": 268435456} every 100 ms"))
    return rows


def elastic_suite(runs):
    """Elastic passthrough: IOPS of passthrough, snoop and auto side by side (interleaved), the
    snoop thread's CPU per request, the switch pause per direction, and fault-in/map rates."""
    rows = []
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        disk = os.path.join(d, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(256 << 20)
        configs = [("passthrough", "--user-device", ""), ("snoop", "--vio", ""), ("auto", "--vio", ",mode=auto")]
        for lat in (0, 20):
            for qd in (1, 32):
                # 6 s at least, so that the rate after the first 2 s is a steady state.
                cmd = f"vio.workload=blk-verify vio.ops=100000000 vio.phases=0:6s vio.qd={qd} vio.seed=1"
                got = {name: [] for name, _, _ in configs}
                shown = {}
                for rep in range(runs):
                    for name, flag, extra in configs:
                        print(f"elastic: latency_us={lat} qd={qd} {name} run {rep + 1}/{runs}", file=sys.stderr, flush=True)
                        with Vdpu(disk, f",latency_us={lat}") as v:
                            res, c, _, full = vio_run(disk, [flag, f"socket={v.sock},id=dpu0{extra}"], cmd)
                        assert c["iopf"] == 0, c
                        got[name].append((res, c))
                        shown[name] = full
                base = med([r["steady_iops"] for r, _ in got["passthrough"]])
                for name, _, _ in configs:
                    iops = med([r["steady_iops"] for r, _ in got[name]])
                    p50 = med([r["lat_p50_ns"] for r, _ in got[name]]) / 1000
                    extra = ""
                    if name == "snoop":
                        cpu = med([c["snoop_cpu_ns"] / max(1, c["chains"]) for _, c in got[name]]) / 1000
                        extra = f", snoop thread {cpu:.2f} us CPU per snooped request"
                    rows.append((f"latency_us={lat} qd={qd}, {name}", f"{iops:,.0f} IOPS ({iops / base:.2f}x), p50 {p50:.1f} us (whole run){extra}",
                                 shown_with_vdpu(shown[name].replace(d + "/", "$TMPFS/"), d, v)))

    rows += switch_suite(runs)
    return rows


def switch_suite(runs, quick=False):
    """Elastic switches: the pause of each direction under qd 32 load, and the fault-in and map
    throughput of entering passthrough with most of guest RAM reclaimed."""
    rows = []
    record.plan(2 * runs)
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        disk = os.path.join(d, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(256 << 20)
        def switching(sock, p):
            reps = []
            time.sleep(0.5)
            while p.poll() is None and len(reps) < 200:
                for mode in ("passthrough", "snoop"):
                    try:
                        st, body = api(sock, "PUT", "vm.vio-mode", json.dumps({"id": "dpu0", "mode": mode}))
                    except OSError:
                        return reps
                    if st != 200:
                        return reps
                    reps.append(json.loads(body)["switch"])
                    time.sleep(0.05)
            return reps
        reps = []
        ops = 600_000 if quick else 3_000_000
        for rep in range(runs):
            record.begin("forced switches every 50 ms under qd 32", rep, runs)
            with Vdpu(disk) as v:
                _, c, r, full = vio_run(disk, ["--vio", f"socket={v.sock},id=dpu0"],
                                        f"vio.workload=blk-verify vio.ops={ops} vio.qd=32 vio.seed=1", switching)
                assert c["iopf"] == 0, c
                reps += r
        for direction in ("passthrough", "snoop"):
            ps = sorted(x["pause_us"] for x in reps if x["to"] == direction)
            db = med([x["doorbells_us"] for x in reps if x["to"] == direction])
            dev = med([x["device_us"] for x in reps if x["to"] == direction])
            rows.append((f"switch to {direction} under qd=32 load, pause", f"p50 {med(ps):.0f} us, max {max(ps)} us ({len(ps)} switches); of it p50 {db:.0f} us moving doorbells, {dev:.0f} us in device control writes",
                         shown_with_vdpu(full.replace(d + "/", "$TMPFS/"), d, v) + " ; meanwhile PUT vm.vio-mode every 50 ms"))

        def faultin(sock, p):
            wait_resident(sock, 380 << 20)
            api(sock, "PUT", "vm.reclaim", json.dumps({"bytes": 512 << 20}))
            st, body = api(sock, "PUT", "vm.vio-mode", json.dumps({"id": "dpu0", "mode": "passthrough"}))
            api(sock, "PUT", "vmm.shutdown")
            return json.loads(body)["switch"]
        fr, mr, host = [], [], []
        for rep in range(runs):
            record.begin("fault-in of 384 MiB reclaimed", rep, runs)
            host.append(fresh_memory_rate(384 << 20))
            with Vdpu(disk) as v:
                # A guest that has written 384 MiB and idles; all of it reclaimed, then passed through.
                # The store on tmpfs: the VMM's fault-in, not the host disk's writeback of the
                # store file (with the store in /tmp on this machine's disk the same run gave
                # anything from 0.3 to 1.9 GiB/s, old and new builds alike).
                cmd = "vio.workload=mem-verify vio.mem_mb=384 vio.rounds=1 vio.idle_ms=30000"
                full = [VMM, "-v", "--kernel", GUEST, "--memory", "size=512M,shared=on,reclaim=on", "--serial", "tty",
                        "--reclaim", f"store={d}",
                        "--api-socket", os.path.join(d, "api.sock"), "--vio", f"socket={v.sock},id=dpu0", "--cmdline", cmd]
                p = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                sock = os.path.join(d, "api.sock")
                while not os.path.exists(sock):
                    time.sleep(0.01)
                r = faultin(sock, p)
                p.wait()
                record.raw({"switch": r, "host_fresh_gib_s": host[-1]}, shlex.join(full))
                fr.append(r["faultin_bytes"] / (r["took_us"] / 1e6) / (1 << 30))
                mr.append(r["mapped_bytes"] / (r["took_us"] / 1e6) / (1 << 30))
                shown = shlex.join(full).replace(d, "$TMPFS")
        rows.append(("snoop -> passthrough with 384 MiB of guest RAM reclaimed: fault-in (and map) throughput",
                     f"{med(fr):.2f} GiB/s faulted in ({med([f / h for f, h in zip(fr, host)]):.2f}x of the host's "
                     f"{med(host):.2f} GiB/s for writing fresh memory, measured just before each), {med(mr):.2f} GiB/s mapped",
                     shown + " ; once 380 MiB are resident: PUT vm.reclaim 512M, PUT vm.vio-mode passthrough"))
    return rows


def churn_and_watch(sock, p):
    """vm.reclaim of 256 MiB every 100 ms while the guest runs; samples the VM's resident memory
    and the device's locked bytes after each pass."""
    passes, resident, locked = 0, [], [0]
    while p.poll() is None:
        try:
            st, _ = api(sock, "PUT", "vm.reclaim", json.dumps({"bytes": 256 << 20}))
            passes += st == 200
            st, body = api(sock, "GET", "vm.counters")
            if st == 200:
                c = json.loads(body)
                resident.append(c["memory"]["resident_bytes"])
                locked.append(c["dpu0"].get("locked_bytes", 0))
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(0.1)
    return passes, resident, max(locked)


def lockpage_suite(runs):
    """Lockpage off and on (interleaved) under reclaim churn: IOPS, snoop fault-ins per 1,000
    ops, the lock rate reached, and the VM's resident memory under churn."""
    rows = []
    ram = 512 << 20
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        disk = os.path.join(d, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(256 << 20)
        # About 10 s of I/O each, so that a run sees tens of churn passes.
        for pool, ops, what in ((256, 1_500_000, "1 MiB reused pool"),
                                (16384, 150_000, "64 MiB pool, past the 51 MiB budget")):
            cmd = f"vio.workload=blk-verify vio.ops={ops} vio.qd=16 vio.pool_pages={pool} vio.seed=1"
            got = {"off": [], "on": []}
            for _ in range(runs):
                for name, extra in (("off", ""), ("on", ",lockpage=on")):
                    with Vdpu(disk) as v:
                        res, c, (passes, resident, locked), full = vio_run(
                            disk, ["--vio", f"socket={v.sock},id=dpu0{extra}"], cmd, churn_and_watch)
                    assert c["iopf"] == 0 and c["acquire_errors"] == 0, c
                    got[name].append((res["iops"], c["faultins"] * 1000 / res["ops"], locked / ram,
                                      med(resident) if resident else 0, max(resident, default=0), passes,
                                      shown_with_vdpu(full, d, v)))
            for name in ("off", "on"):
                rs = got[name]
                iops, fpk, rate, resid, top, passes = (med([r[i] for r in rs]) for i in range(6))
                rows.append((f"{what}, qd 16, lockpage {name}",
                             f"{iops:,.0f} IOPS, {fpk:.1f} fault-ins per 1,000 ops, lock rate {rate * 100:.2f}%, "
                             f"resident under churn median {resid / (1 << 20):.0f} MiB, max {top / (1 << 20):.0f} MiB, "
                             f"{passes:.0f} reclaim passes",
                             rs[0][6] + " ; meanwhile PUT vm.reclaim {\"bytes\": 268435456} every 100 ms"))
            on, off = got["on"], got["off"]
            rows.append((f"{what}: on / off", f"IOPS {med([r[0] for r in on]) / med([r[0] for r in off]):.2f}x, "
                         f"fault-ins {med([r[1] for r in on]) / max(med([r[1] for r in off]), 1e-9):.3f}x", ""))
    return rows


def linux_suite(runs):
    """Linux's own virtio-blk driver (linux-verify, O_DIRECT, one thread per slot) on the emulated
    disk, on vdpu passed through and on vdpu under VIO; configurations interleaved."""
    if not os.path.exists(LINUX):
        sys.exit(f"no Linux kernel at {LINUX} (set VIO_LINUX_KERNEL)")
    subprocess.run([os.path.join(ROOT, "scripts/build-initramfs.sh")], check=True, stdout=subprocess.DEVNULL)
    rows = []
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        disk = os.path.join(d, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(64 << 20)
        configs = [("emulated virtio-blk", None), ("vdpu passthrough", "--user-device"), ("vdpu under vio (snoop)", "--vio")]
        for qd in (1, 16):
            cmdline = f"{LINUX_CMDLINE} vio.workload=blk-verify vio.ops={300 if qd == 1 else 200} vio.qd={qd} vio.seed=1 vio.stall_s=120"
            got = {name: [] for name, _ in configs}
            shown = {}
            for rep in range(runs):
                for name, flag in configs:
                    print(f"linux: qd={qd} {name} run {rep + 1}/{runs}", file=sys.stderr, flush=True)
                    args = [VMM, "-v", "--kernel", LINUX, "--initramfs", INITRAMFS, "--memory", "size=256M,shared=on",
                            "--serial", "tty", "--console", "off", "--cmdline", cmdline]
                    if flag is None:
                        args += ["--disk", f"path={disk}"]
                        r = run_linux(args)
                        shown[name] = shlex.join(args).replace(d + "/", "$TMPFS/")
                    else:
                        with Vdpu(disk) as v:
                            args += [flag, f"socket={v.sock}"]
                            r = run_linux(args)
                            shown[name] = shown_with_vdpu(shlex.join(args), d, v)
                    got[name].append(r)
            base = med([r["ops"] * 1e9 / r["elapsed_ns"] for r in got["vdpu passthrough"]])
            for name, _ in configs:
                iops = med([r["ops"] * 1e9 / r["elapsed_ns"] for r in got[name]])
                p50 = med([r["lat_p50_ns"] for r in got[name]]) / 1e6
                rows.append((f"Linux qd={qd}, {name}", f"{iops:.1f} IOPS (p50 {p50:.0f} ms), {iops / base:.2f}x of passthrough",
                             shown[name].replace(ROOT + "/", "")))
    return rows


def upgrade_chain(d, v, memory, n, cmd):
    """Boots a VM with vdpu passed through (`--user-device`), then live-upgrades it `n` times in
    a row into fresh VMMs (A -> B -> C ...) while blk-verify runs. Returns the senders'
    reports and the guest's result (from the last VMM)."""
    def vmm(args, name):
        sock = os.path.join(d, f"{name}.sock")
        p = subprocess.Popen([VMM, "-v", "--api-socket", sock] + args, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                api(sock, "GET", "vmm.ping")
                return p, sock
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("a VMM did not start")
                time.sleep(0.01)
    full = ["--kernel", GUEST, "--memory", memory, "--serial", "tty", "--user-device",
            f"socket={v.sock},id=dpu0", "--cmdline", cmd]
    p, sock = vmm(full, "up0")
    time.sleep(1.0)
    reports = []
    for i in range(1, n + 1):
        q, qsock = vmm([], f"up{i}")
        mig = os.path.join(d, f"mig{i}.sock")
        recv = threading.Thread(target=api, args=(qsock, "PUT", "vm.receive-migration",
                                                  json.dumps({"receiver_url": f"unix:{mig}"})))
        recv.start()
        deadline = time.monotonic() + 10
        while not os.path.exists(mig):
            if time.monotonic() > deadline:
                sys.exit("the receiver did not listen")
            time.sleep(0.001)
        st, body = api(sock, "PUT", "vm.send-migration",
                       json.dumps({"destination_url": f"unix:{mig}", "local": True}))
        recv.join()
        assert st == 200, body
        reports.append(json.loads(body))
        p.communicate(timeout=60)
        p, sock = q, qsock
        time.sleep(0.2)
    out, _ = p.communicate(timeout=600)
    result = next(json.loads(l[len("VIO-GUEST-RESULT "):]) for l in out.splitlines()
                  if l.startswith("VIO-GUEST-RESULT "))
    return reports, result, shlex.join([VMM] + full)


def upgrade_suite(runs, quick=False):
    """Live upgrade: the downtime (vCPUs stopped, from the sender's freeze to the receiver's
    "running") over chains of upgrades of a VM with vdpu passed through and busy, for guest RAM
    sizes from 256 MiB to 4 GiB (nothing is copied, so it should not grow)."""
    rows = []
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        disk = os.path.join(d, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(64 << 20)
        mems = ("256M",) if quick else ("256M", "1G", "4G")
        chain, secs = (3, 5) if quick else (10, 12)
        record.plan(len(mems) * runs)
        for mem in mems:
            reports, ops = [], 0
            for rep in range(runs):
                record.begin(f"{mem} VM, {chain} upgrades in a row", rep, runs)
                with Vdpu(disk) as v:
                    r, res, full = upgrade_chain(d, v, f"size={mem},shared=on", chain,
                                                 "vio.workload=blk-verify vio.ops=1000000000 vio.qd=16 "
                                                 f"vio.seed=1 vio.phases=0:{secs}s vio.stall_s=5")
                    assert res["mismatches"] == 0 and res["io_errors"] == 0, res
                    record.raw({"upgrades": r, "result": res}, full)
                    ops += res["ops"]
                    reports += r
            down = sorted(x["downtime_us"] for x in reports)
            save = med([x["save_us"] for x in reports])
            restore = med([x["restore_us"] for x in reports])
            rows.append((f"live upgrade, {mem} VM, vdpu passed through, blk-verify qd 16 running",
                         f"downtime p50 {med(down) / 1000:.1f} ms, max {down[-1] / 1000:.1f} ms "
                         f"({len(down)} upgrades); of it p50 {save / 1000:.1f} ms freeze+save, "
                         f"{restore / 1000:.1f} ms the receiver's rebuild; {ops} ops verified",
                         shown_with_vdpu(full.replace(d + "/", "$TMPFS/"), d, v)
                         + f" --api-socket $TMPFS/up0.sock ; then {chain} x (vio-hypervisor --api-socket NEW &"
                         " receive-migration; send-migration --local)"))
    return rows


def legacy(f):
    """A per-feature suite from before the paper's set: (runs) -> rows."""
    return lambda runs, quick, peer: f(runs)


# The paper's evaluation (the default set), then the per-feature suites kept for their docs.
SUITES = {"overhead": paper.overhead, "iopf": paper.iopf, "memory": paper.memory,
          "switch": lambda runs, quick, peer: switch_suite(runs, quick),
          "upgrade": lambda runs, quick, peer: upgrade_suite(runs, quick), "walker": paper.walker,
          "foundation": legacy(foundation), "vdpu": legacy(vdpu_suite), "reclaim": legacy(reclaim_suite),
          "vio": legacy(vio_suite), "elastic": legacy(elastic_suite), "lockpage": legacy(lockpage_suite),
          "linux": legacy(linux_suite), "net": net.net}
DEFAULT = ["overhead", "iopf", "memory", "switch", "upgrade", "walker", "net"]


def write_docs(name, table):
    """Replaces the text between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in
    docs/performance.md with `table`; a suite without markers there is left out."""
    path = os.path.join(ROOT, "docs/performance.md")
    with open(path) as f:
        doc = f.read()
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    if start not in doc or end not in doc:
        print(f"docs/performance.md has no {start} section; not written", file=sys.stderr)
        return
    a, b = doc.index(start) + len(start), doc.index(end)
    with open(path, "w") as f:
        f.write(doc[:a] + "\n" + table + "\n" + doc[b:])


def main():
    ap = argparse.ArgumentParser(description="Runs bench suites; each writes a table to stdout "
                                 "and bench/results/<suite>-<timestamp>.json (and a .png)")
    ap.add_argument("suites", nargs="*", metavar="SUITE",
                    help=f"any of {', '.join(SUITES)} (default: {' '.join(DEFAULT)})")
    ap.add_argument("--runs", type=int, default=None, help="repetitions per configuration (default 3; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="every suite small: one repetition, fewer points, short runs")
    ap.add_argument("--peer-vmm", metavar="PATH", help="another Cloud-Hypervisor-compatible VMM binary: its "
                    "emulated virtio-blk and its --user-device join the overhead suite")
    ap.add_argument("--out", metavar="DIR", default=os.path.join(ROOT, "bench/results"), help="where results go")
    ap.add_argument("--docs", action="store_true", help="also write each table into docs/performance.md "
                    "(between <!-- bench:SUITE --> markers)")
    a = ap.parse_args()
    unknown = [x for x in a.suites if x not in SUITES]
    if unknown:
        ap.error(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    if a.peer_vmm and not os.access(a.peer_vmm, os.X_OK):
        ap.error(f"--peer-vmm {a.peer_vmm}: not an executable")
    suites = a.suites or DEFAULT
    runs = a.runs or (1 if a.quick else 3)
    build()
    facts = machine()
    os.makedirs(a.out, exist_ok=True)
    started = time.monotonic()
    for i, name in enumerate(suites):
        done = time.monotonic() - started
        eta = f", about {done / i * (len(suites) - i) / 60:.0f} min left" if i else ""
        print(f"[{i + 1}/{len(suites)}] {name}: {runs} run(s){eta}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        record.start_suite(name)
        got = SUITES[name](runs, a.quick, a.peer_vmm)
        rows, series = got if isinstance(got, tuple) else (got, None)
        took = time.monotonic() - t0
        table = [f"Median of {runs} run(s), {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, "
                 f"`scripts/bench.sh{' --quick' if a.quick else ''} --runs {runs} {name}`\n",
                 "| what | result |", "|---|---|"]
        table += [f"| {what} | {val} |" for what, val, _ in rows]
        table += ["", "Commands:", ""]
        table += [f"- {what}: `{cmd.replace(ROOT + '/', '')}`" for what, _, cmd in rows if cmd]
        table = "\n".join(table)
        print(f"## {name}\n\n{table}\n", flush=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = os.path.join(a.out, f"{name}-{stamp}.json")
        with open(out, "w") as f:
            json.dump({"suite": name, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": runs,
                       "quick": a.quick, "seconds": round(took, 1), "machine": facts,
                       "command": shlex.join(sys.argv),
                       "rows": [{"what": w, "result": v, "command": (c or "").replace(ROOT + "/", "")}
                                for w, v, c in rows],
                       "series": series, "repetitions": record.repetitions()}, f, indent=1)
        png = None
        if series:
            from benchlib.plot import plot
            png = os.path.join(a.out, f"{name}-{stamp}.png")
            plot(name, series, png)
        if a.docs and not a.quick:
            write_docs(name, table)
            if png:
                shutil.copyfile(png, os.path.join(ROOT, "docs/img", f"{name}.png"))
        print(f"[{i + 1}/{len(suites)}] {name}: {took:.0f} s, {out.replace(ROOT + '/', '')}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
