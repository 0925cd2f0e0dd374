"""The paper's evaluation on this testbed: overhead, I/O page faults, memory given back, and the
walker. Each suite takes (runs, quick, peer) and returns (rows, series): rows for the table,
series for the plots. Configurations are interleaved (A B C A B C ...) so that a machine that
drifts during a run drifts for all of them alike."""
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time

from benchlib import record
from benchlib.common import GUEST, ROOT, VMM, Vdpu, api, logged_counters, med, steady_iops

TICK = os.sysconf("SC_CLK_TCK")


def tmpfs_dir():
    return tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)


def disk_in(d, mib=256):
    disk = os.path.join(d, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(mib << 20)
    return disk


def thread_cpu(pid):
    """{tid: (name, CPU seconds)} of every live thread of `pid`."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                s = f.read()
        except OSError:
            continue
        name = s[s.index("(") + 1:s.rindex(")")]
        fields = s[s.rindex(")") + 2:].split()
        out[tid] = (name, (int(fields[11]) + int(fields[12])) / TICK)
    return out


class Sampler:
    """Samples the per-thread CPU times of some processes every 100 ms, and the guest's progress
    lines as they arrive, so that CPU per request is measured over the same window of host time
    in the steady state."""

    def __init__(self, pids):
        self.pids = pids
        self.samples = []
        self.progress = []
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.stop.is_set():
            self.samples.append((time.monotonic(), {p: thread_cpu(p) for p in self.pids}))
            self.stop.wait(0.1)

    def line(self, line):
        if line.startswith("VIO-GUEST-PROGRESS "):
            p = json.loads(line[len("VIO-GUEST-PROGRESS "):])
            self.progress.append((time.monotonic(), p["ops"], p["elapsed_ns"]))

    def finish(self):
        self.stop.set()
        self.t.join()

    def cpu_per_request(self, pid, after_ns, skip=lambda name: False):
        """CPU seconds of `pid`'s threads (but those `skip` names) per request, from the first
        progress line `after_ns` into the run to the last (the same window as the IOPS)."""
        steady = [x for x in self.progress if x[2] >= after_ns]
        if len(steady) < 2:
            return None
        (t0, ops0, _), (t1, ops1, _) = steady[0], steady[-1]

        def at(t):
            s = min(self.samples, key=lambda x: abs(x[0] - t))[1].get(pid, {})
            return {tid: c for tid, (name, c) in s.items() if not skip(name)}
        a, b = at(t0), at(t1)
        spent = sum(c - a.get(tid, 0.0) for tid, c in b.items())
        return spent / max(ops1 - ops0, 1)


def run_blk(vmm, args, cmd, vdpu=None, during=None, dev="dpu0", steady_after_s=1):
    """blk-verify in a VM (`args` add the device), with the CPU per request of the VMM's
    threads other than the vCPU (which spins polling) and of vdpu's. Returns (result, counters
    or None, numbers, command line, what `during` returned). The numbers are this repetition's
    record itself: what a suite adds to them afterwards lands in the same repetition."""
    with tempfile.TemporaryDirectory() as d:
        sock = os.path.join(d, "api.sock")
        full = [vmm, "-v", "--kernel", GUEST, "--serial", "tty", "--api-socket", sock] + args + ["--cmdline", cmd]
        p = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        pids = [p.pid] + ([vdpu.p.pid] if vdpu else [])
        s = Sampler(pids)
        err, out = [], []

        def read_out():
            for line in p.stdout:
                s.line(line)
                out.append(line)
        threads = [threading.Thread(target=lambda: err.append(p.stderr.read())), threading.Thread(target=read_out)]
        for t in threads:
            t.start()
        got = during(sock, p) if during else None
        for t in threads:
            t.join()
        p.wait()
        s.finish()
        out = "".join(out)
        after = int(steady_after_s * 1e9)
        vmm_cpu = s.cpu_per_request(p.pid, after, skip=lambda n: n.startswith("vcpu"))
        vdpu_cpu = s.cpu_per_request(vdpu.p.pid, after) if vdpu else None
    if "VIO-GUEST-RESULT " not in out:
        sys.exit(f"no result from {shlex.join(full)}: {out[-2000:]}\n{err[0][-2000:]}")
    res = json.loads(out.split("VIO-GUEST-RESULT ", 1)[1].splitlines()[0])
    assert res["mismatches"] == 0 and res["io_errors"] == 0, res
    counters = None
    if dev and f"Device {dev} counters: " in err[0]:
        counters = logged_counters(err[0], dev)
    nums = {"iops": steady_iops(out, res, int(steady_after_s * 1e9)), "lat_p50_us": res["lat_p50_ns"] / 1000,
            "lat_p99_us": res["lat_p99_ns"] / 1000, "ops": res["ops"],
            "vmm_cpu_us_per_req": None if vmm_cpu is None else vmm_cpu * 1e6,
            "vdpu_cpu_us_per_req": None if vdpu_cpu is None else vdpu_cpu * 1e6}
    if counters:
        nums["iopf"] = counters.get("iopf", 0)
    if "Device memory counters: " in err[0]:
        # Guest pages the vCPU had to fault back: a device-fault experiment must keep these low.
        nums["cpu_refaults"] = logged_counters(err[0], "memory").get("cpu_refaults", 0)
    record.raw(nums, shlex.join(full))
    return res, counters, nums, shlex.join(full), got


def overhead(runs, quick, peer):
    """blk-verify IOPS, p50/p99 and CPU per request at several queue depths and device
    latencies, for every way of giving the guest a disk."""
    qds = (1, 32) if quick else (1, 4, 16, 32)
    lats = (0,) if quick else (0, 20)
    secs = 3 if quick else 5
    # The steady state: from 2 s on, auto mode is past its dwell (1 s) and switch.
    steady = 1 if quick else 2
    mem = "size=512M,shared=on,reclaim=on"
    plain = "size=512M,shared=on"
    configs = [
        ("emulated virtio-blk", VMM, lambda disk, v: ["--memory", plain, "--disk", f"path={disk}"], False),
        ("vdpu passthrough", VMM, lambda disk, v: ["--memory", mem, "--user-device", f"socket={v.sock},id=dpu0"], True),
        ("vio snoop", VMM, lambda disk, v: ["--memory", mem, "--vio", f"socket={v.sock},id=dpu0"], True),
        ("vio auto", VMM, lambda disk, v: ["--memory", mem, "--vio", f"socket={v.sock},id=dpu0,mode=auto"], True),
    ]
    if peer:
        configs += [
            ("peer emulated virtio-blk", peer, lambda disk, v: ["--memory", plain, "--disk", f"path={disk}"], False),
            ("peer vdpu passthrough", peer, lambda disk, v: ["--memory", plain, "--user-device", f"socket={v.sock},id=dpu0"], True),
        ]
    points = [(lat, qd) for lat in lats for qd in qds]
    # The emulated disk has no latency model: it runs at latency 0 only.
    runs_planned = sum(1 for lat, _ in points for c in configs if c[3] or lat == lats[0]) * runs
    record.plan(runs_planned)
    got = {}
    cmds = {}
    with tmpfs_dir() as d:
        disk = disk_in(d)
        for lat, qd in points:
            cmd = f"vio.workload=blk-verify vio.ops=100000000 vio.phases=0:{secs}s vio.qd={qd} vio.seed=1"
            for rep in range(runs):
                for name, vmm, args, with_vdpu in configs:
                    if not with_vdpu and lat != lats[0]:
                        continue
                    record.begin(f"{name}, latency_us={lat if with_vdpu else 0}, qd={qd}", rep, runs)
                    if with_vdpu:
                        with Vdpu(disk, f",latency_us={lat}") as v:
                            _, c, nums, full, _ = run_blk(vmm, args(disk, v), cmd, v, steady_after_s=steady)
                        assert nums.get("iopf", 0) == 0, nums
                    else:
                        _, _, nums, full, _ = run_blk(vmm, args(disk, None), cmd, None, steady_after_s=steady)
                    key = (name, lat if with_vdpu else 0, qd)
                    got.setdefault(key, []).append(nums)
                    cmds[key] = full.replace(d, "$TMPFS").replace(ROOT + "/", "")
    rows, series = [], {}
    for lat, qd in points:
        base = got.get(("vdpu passthrough", lat, qd))
        base_iops = med([n["iops"] for n in base]) if base else None
        for name, _, _, with_vdpu in configs:
            key = (name, lat if with_vdpu else 0, qd)
            if key not in got or (not with_vdpu and lat != lats[0]):
                continue
            ns = got[key]
            iops = med([n["iops"] for n in ns])
            cpu = [n["vmm_cpu_us_per_req"] for n in ns if n["vmm_cpu_us_per_req"] is not None]
            dcpu = [n["vdpu_cpu_us_per_req"] for n in ns if n["vdpu_cpu_us_per_req"] is not None]
            ratio = f" ({iops / base_iops:.2f}x)" if base_iops else ""
            cpu_s = f"; CPU per request: VMM {med(cpu):.2f} us" if cpu else ""
            cpu_s += f", vdpu {med(dcpu):.2f} us" if dcpu else ""
            rows.append((f"latency_us={key[1]} qd={qd}, {name}",
                         f"{iops:,.0f} IOPS{ratio}, p50 {med([n['lat_p50_us'] for n in ns]):.1f} us, "
                         f"p99 {med([n['lat_p99_us'] for n in ns]):.1f} us{cpu_s}", cmds[key]))
            series.setdefault(f"latency_us={key[1]}", {}).setdefault(name, []).append((qd, iops))
    return rows, {"kind": "iops_vs_qd", "data": series}


def resident_watch(sock, p, period=0.25):
    """The VM's resident guest RAM (the memfd's allocated blocks) every `period` until it exits:
    [(seconds since the first sample, bytes)]."""
    t0 = None
    out = []
    while p.poll() is None:
        try:
            st, body = api(sock, "GET", "vm.counters")
            if st == 200:
                now = time.monotonic()
                t0 = t0 or now
                out.append((now - t0, json.loads(body)["memory"]["resident_bytes"]))
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(period)
    return out


def memory(runs, quick, peer):
    """Resident guest RAM over time under a reclaim policy, for a VM that wrote most of its
    memory and then idles, and for a busy one: passthrough (pinned: nothing can go), VIO, VIO
    with Lockpage. The headline is the share of guest RAM given back."""
    ram = 512 << 20
    secs = 6 if quick else 15
    policy = ["--reclaim", "interval_ms=250,idle_ms=500,target_pct=90"]
    mem = "size=512M,shared=on,reclaim=on"
    workloads = [
        ("idle", f"vio.workload=mem-verify vio.mem_mb=384 vio.rounds=1 vio.idle_ms={secs * 1000}"),
        ("busy", f"vio.workload=blk-verify vio.ops=100000000 vio.phases=2000:{secs}s vio.qd=4 "
                 f"vio.pool_pages=16384 vio.seed=1"),
    ]
    configs = [("passthrough", "--user-device", ""), ("vio", "--vio", ""), ("vio + lockpage", "--vio", ",lockpage=on")]
    record.plan(len(workloads) * len(configs) * runs)
    got, cmds = {}, {}
    with tmpfs_dir() as d:
        disk = disk_in(d)
        for wl, cmd in workloads:
            for rep in range(runs):
                for name, flag, extra in configs:
                    record.begin(f"{wl} VM, {name}", rep, runs)
                    with Vdpu(disk) as v:
                        args = ["--memory", mem] + policy + [flag, f"socket={v.sock},id=dpu0{extra}"]
                        _, c, nums, full, trace = run_blk(VMM, args, cmd, v, during=resident_watch)
                    assert c is None or c.get("iopf", 0) == 0, c
                    tail = [b for t, b in trace if t >= trace[-1][0] * 0.75] if trace else [0]
                    nums.update(resident_end=med(tail), resident_max=max(b for _, b in trace) if trace else 0,
                                trace=[[round(t, 2), b] for t, b in trace])
                    got.setdefault((wl, name), []).append(nums)
                    cmds[(wl, name)] = full.replace(d, "$TMPFS").replace(ROOT + "/", "")
    rows, series = [], {}
    for wl, _ in workloads:
        for name, _, _ in configs:
            ns = got[(wl, name)]
            end = med([n["resident_end"] for n in ns])
            top = med([n["resident_max"] for n in ns])
            busy = f", {med([n['iops'] for n in ns]):,.0f} IOPS" if wl == "busy" else ""
            rows.append((f"{wl} VM, {name}",
                         f"resident at the end {end / (1 << 20):.0f} MiB of {ram >> 20} (max {top / (1 << 20):.0f} MiB): "
                         f"{(1 - end / max(top, 1)) * 100:.0f}% of what it held given back{busy}",
                         cmds[(wl, name)]))
            series.setdefault(f"{wl} VM", {})[name] = ns[len(ns) // 2]["trace"]
    return rows, {"kind": "resident_over_time", "data": series}


def walker(runs, quick, peer):
    """The chain walker's ns per chain (criterion)."""
    warm, meas = ("0.5", "1") if quick else ("1", "3")
    record.plan(1)
    record.begin("criterion walk", 0, 1)
    cmd = ["cargo", "bench", "-q", "-p", "vio", "--bench", "walker", "--", "--warm-up-time", warm,
           "--measurement-time", meas]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"walker bench failed: {p.stderr[-2000:]}")
    rows, name = [], None
    units = {"ns": 1, "µs": 1e3, "us": 1e3, "ms": 1e6}
    nums = {}
    for line in p.stdout.splitlines():
        if line.startswith("walk/"):
            name = line.split()[0]
        if "time:" in line and name:
            v = line.split("[", 1)[1].split("]")[0].split()
            per_iter = float(v[2]) * units[v[3]]
            nums[name] = per_iter / 16
            rows.append((f"{name} (16 chains per iteration)", f"{per_iter / 16:.0f} ns per chain", shlex.join(cmd)))
            name = None
    if not rows:
        sys.exit(f"no criterion results in: {p.stdout[-2000:]}")
    record.raw(nums, shlex.join(cmd))
    return rows, None


def iopf(runs, quick, peer):
    """Throughput as the rate of I/O page faults grows, each fault costing 5 ms (a reclaim store
    with that service time): pages the device has mapped are reclaimed at the matching rate
    while blk-verify runs, under VIO (faults resolved before the device sees the request) and
    under the PRI baseline (the device stops on the missing page and asks for it); the achieved
    fault rate is reported next to the target, with the time a fault costs."""
    rates = (0, 10, 100) if quick else (0, 1, 10, 100, 1000)
    secs = 4 if quick else 8
    mem = "size=512M,shared=on,reclaim=on"
    # (name, vdpu options, device flag, the counter of device faults, of their cost in ns)
    configs = [
        ("vio snoop", "", "--vio", "faultins", "q0_faultin_ns_p50"),
        ("PRI", ",pri=on", "--user-device", "pri_requests", "pri_resolve_ns_p50"),
    ]
    record.plan(len(rates) * len(configs) * runs)
    got, cmds = {}, {}
    with tmpfs_dir() as d:
        disk = disk_in(d)
        cmd = (f"vio.workload=blk-verify vio.ops=100000000 vio.phases=0:{secs}s vio.qd=16 "
               f"vio.pool_pages=4096 vio.seed=1")
        for rep in range(runs):
            for rate in rates:
                for name, opts, flag, faults, cost in configs:
                    record.begin(f"{name}, {rate} faults/s of 5 ms", rep, runs)

                    def churn(sock, p, rate=rate):
                        # Reclaim what should come back as `rate` device faults a second: every
                        # 100 ms a tenth of it, or one page every 1/rate s below 10/s, taking
                        # only pages the device has mapped and is not using (`dma_only`). A page
                        # the guest does not touch soon does not fault, so the achieved rate is
                        # measured, not assumed.
                        tick = max(0.1, 1 / rate) if rate else 0
                        n = 0
                        while p.poll() is None and rate:
                            try:
                                api(sock, "PUT", "vm.reclaim", json.dumps({"bytes": max(1, round(rate * tick)) * 4096,
                                                                           "dma_only": True}))
                                n += 1
                            except OSError:
                                pass
                            time.sleep(tick)
                        return n
                    with Vdpu(disk, opts) as v:
                        args = ["--memory", mem, "--reclaim", "fault_latency_us=5000", flag,
                                f"socket={v.sock},id=dpu0" + (",pri=on" if opts else "")]
                        res, c, nums, full, _ = run_blk(VMM, args, cmd, v, during=churn)
                    if not opts:
                        assert c["iopf"] == 0, c
                    nums["faults_per_s"] = c[faults] * 1e9 / res["elapsed_ns"]
                    nums["fault_ns_p50"] = c.get(cost, 0)
                    nums["cpu_refaults_per_s"] = nums.get("cpu_refaults", 0) * 1e9 / res["elapsed_ns"]
                    got.setdefault((name, rate), []).append(nums)
                    cmds[(name, rate)] = full.replace(d, "$TMPFS").replace(ROOT + "/", "")
    rows, series = [], {}
    for name, _, _, _, _ in configs:
        base = med([n["iops"] for n in got[(name, rates[0])]])
        pts = series.setdefault(name, [])
        for rate in rates:
            ns = got[(name, rate)]
            iops = med([n["iops"] for n in ns])
            fr = med([n["faults_per_s"] for n in ns])
            cost = med([n["fault_ns_p50"] for n in ns]) / 1000
            rows.append((f"{name}, target {rate} faults/s of 5 ms",
                         f"{iops:,.0f} IOPS ({iops / base:.2f}x of no faults), {fr:,.1f} device faults/s achieved, "
                         f"p99 {med([n['lat_p99_us'] for n in ns]):,.0f} us, fault p50 {cost:,.0f} us, "
                         f"{med([n['cpu_refaults_per_s'] for n in ns]):,.1f} vCPU refaults/s",
                         cmds[(name, rate)] + (f" ; meanwhile PUT vm.reclaim of {max(1, round(rate * max(0.1, 1 / rate)))} "
                                               f"page(s) every {max(0.1, 1 / rate) * 1000:.0f} ms" if rate else "")))
            pts.append((fr, iops))
    return rows, {"kind": "iops_vs_faults", "data": series}
