"""virtio-net: echo latency and stream throughput for the emulated device, vdpu's network function
passed through, and under VIO; and the paper's experiment, stream throughput under VIO as the
rate of 5 ms device faults grows. Every TAP lives in a network namespace of its own (`unshare
-n`), with vio-netpeer on its host side."""
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time

from benchlib import record
from benchlib.common import GUEST, ROOT, VMM, Vdpu, api, logged_counters, med

NETPEER = os.path.join(ROOT, "target/release/vio-netpeer")
VDPU = os.path.join(ROOT, "target/release/vdpu")
TAP = "vionet0"


class NetVdpu(Vdpu):
    """vdpu's network function on TAP, in a network namespace of its own."""

    def __init__(self, d):
        self.sock = os.path.join(d, "vdpu.sock")
        self.cmd = ["unshare", "-n", VDPU, "--socket", self.sock, "--net", f"tap={TAP}"]


def run_net(args, cmd, d, tap_owner=None, during=None, dev="net0"):
    """A net workload in a VM (`args` add the device); the peer attaches to the TAP of
    `tap_owner` (a pid; None: the VMM, which then runs in its own network namespace). Returns
    (result, device counters, what `during` returned, the command line)."""
    sock = os.path.join(d, "api.sock")
    full = [VMM, "-v", "--kernel", GUEST, "--serial", "tty", "--api-socket", sock] + args + ["--cmdline", cmd]
    if tap_owner is None:
        full = ["unshare", "-n"] + full
    p = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    owner = tap_owner or p.pid
    # `unshare -n` makes the namespace after it starts: attach once it has.
    deadline = time.monotonic() + 10
    while os.readlink(f"/proc/{owner}/ns/net") == os.readlink("/proc/self/ns/net"):
        if time.monotonic() > deadline:
            sys.exit(f"{owner} never entered a network namespace of its own")
        time.sleep(0.005)
    peer = subprocess.Popen([NETPEER, "--netns-pid", str(owner), "--iface", TAP],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    err, out = [], []
    threads = [threading.Thread(target=lambda: err.append(p.stderr.read())),
               threading.Thread(target=lambda: out.append(p.stdout.read()))]
    for t in threads:
        t.start()
    got = during(sock, p) if during else None
    for t in threads:
        t.join()
    p.wait()
    peer.terminate()
    peer.wait()
    out = out[0]
    if "VIO-GUEST-RESULT " not in out:
        sys.exit(f"no result from {shlex.join(full)}: {out[-2000:]}\n{err[0][-2000:]}")
    res = json.loads(out.split("VIO-GUEST-RESULT ", 1)[1].splitlines()[0])
    assert res["mismatches"] == 0 and res["lost"] == 0, res
    counters = logged_counters(err[0], dev)
    if "Device memory counters: " in err[0]:
        # Guest pages the vCPU had to fault back (a device-fault experiment takes some of those).
        res["cpu_refaults"] = logged_counters(err[0], "memory").get("cpu_refaults", 0)
    record.raw({"result": res, "counters": counters}, shlex.join(full))
    return res, counters, got, shlex.join(full)


CONFIGS = [
    ("emulated virtio-net", lambda v: ["--memory", "size=512M", "--net", f"tap={TAP},id=net0"], False, "net0"),
    ("vdpu passthrough", lambda v: ["--memory", "size=512M,shared=on", "--user-device", f"socket={v.sock},id=dpu0"],
     True, "dpu0"),
    ("vio snoop", lambda v: ["--memory", "size=512M,shared=on,reclaim=on", "--vio", f"socket={v.sock},id=dpu0"],
     True, "dpu0"),
]


def shown(cmd, d, with_vdpu):
    cmd = cmd.replace(d, "$TMPFS").replace(ROOT + "/", "")
    return (f"(unshare -n vdpu --socket $TMPFS/vdpu.sock --net tap={TAP}; vio-netpeer --iface {TAP}) " if with_vdpu
            else f"(vio-netpeer --iface {TAP}) ") + cmd


def net(runs, quick, peer):
    """QD-1 echo latency and bulk stream throughput for each way of giving the guest a network
    device (ratios against passthrough), then stream throughput under VIO with 5 ms device faults
    injected at a growing rate."""
    echo_ops = 5000 if quick else 20000
    frames = 50000 if quick else 200000
    rates = (0, 10, 100) if quick else (0, 1, 10, 100, 1000)
    secs = 3 if quick else 6
    workloads = [("echo", f"vio.workload=net-echo vio.ops={echo_ops} vio.len=64"),
                 ("stream", f"vio.workload=net-stream vio.ops={frames} vio.pool_pages=4096")]
    # Each direction for `secs`: at a high fault rate the stream slows to a crawl.
    timed = f"vio.workload=net-stream vio.ops=1000000000 vio.secs={secs} vio.pool_pages=4096"
    record.plan((len(workloads) * len(CONFIGS) + len(rates)) * runs)
    got, cmds = {}, {}
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        for rep in range(runs):
            for wl, cmd in workloads:
                for name, args, with_vdpu, dev in CONFIGS:
                    record.begin(f"{wl}, {name}", rep, runs)
                    if with_vdpu:
                        with NetVdpu(d) as v:
                            res, c, _, full = run_net(args(v), cmd, d, v.p.pid, dev=dev)
                        assert c["iopf"] == 0, c
                    else:
                        res, c, _, full = run_net(args(None), cmd, d, dev=dev)
                    got.setdefault((wl, name), []).append(res)
                    cmds[(wl, name)] = shown(full, d, with_vdpu)
            for rate in rates:
                record.begin(f"stream under VIO, {rate} faults/s of 5 ms", rep, runs)

                def churn(sock, p, rate=rate):
                    # As the iopf suite: pages the device has mapped and is not using, a tenth of
                    # the rate every 100 ms (or a page every 1/rate s); the achieved device fault
                    # rate is measured.
                    tick = max(0.1, 1 / rate) if rate else 0
                    while p.poll() is None and rate:
                        try:
                            api(sock, "PUT", "vm.reclaim",
                                json.dumps({"bytes": max(1, round(rate * tick)) * 4096, "dma_only": True}))
                        except OSError:
                            pass
                        time.sleep(tick)
                with NetVdpu(d) as v:
                    args = ["--memory", "size=512M,shared=on,reclaim=on", "--reclaim", "fault_latency_us=5000",
                            "--vio", f"socket={v.sock},id=dpu0"]
                    res, c, _, full = run_net(args, timed, d, v.p.pid, during=churn, dev="dpu0")
                assert c["iopf"] == 0, c
                res["faults_per_s"] = c["faultins"] * 1e9 / res["elapsed_ns"]
                res["cpu_refaults_per_s"] = res.get("cpu_refaults", 0) * 1e9 / res["elapsed_ns"]
                got.setdefault(("faults", rate), []).append(res)
                cmds[("faults", rate)] = shown(full, d, True) + (
                    f" ; meanwhile PUT vm.reclaim (dma_only) of {max(1, round(rate * max(0.1, 1 / rate)))} page(s) "
                    f"every {max(0.1, 1 / rate) * 1000:.0f} ms" if rate else "")
    rows, series = [], {}
    base = {wl: got[(wl, "vdpu passthrough")] for wl, _ in workloads}
    for name, _, _, _ in CONFIGS:
        rs = got[("echo", name)]
        p50 = med([r["lat_p50_ns"] for r in rs]) / 1000
        b50 = med([r["lat_p50_ns"] for r in base["echo"]]) / 1000
        rows.append((f"net-echo QD 1 ({echo_ops} x 64 B), {name}",
                     f"p50 {p50:.1f} us ({p50 / b50:.2f}x), p99 {med([r['lat_p99_ns'] for r in rs]) / 1000:.1f} us",
                     cmds[("echo", name)]))
    for name, _, _, _ in CONFIGS:
        rs = got[("stream", name)]
        tx, rx = med([r["tx_mbps"] for r in rs]), med([r["rx_mbps"] for r in rs])
        btx, brx = med([r["tx_mbps"] for r in base["stream"]]), med([r["rx_mbps"] for r in base["stream"]])
        rows.append((f"net-stream ({frames} frames of 1514 B each way), {name}",
                     f"guest TX {tx:,.0f} Mbit/s ({tx / btx:.2f}x), guest RX {rx:,.0f} Mbit/s ({rx / brx:.2f}x)",
                     cmds[("stream", name)]))
    zero = got[("faults", rates[0])]
    ztx, zrx = med([r["tx_mbps"] for r in zero]), med([r["rx_mbps"] for r in zero])
    for rate in rates:
        rs = got[("faults", rate)]
        tx, rx = med([r["tx_mbps"] for r in rs]), med([r["rx_mbps"] for r in rs])
        fr = med([r["faults_per_s"] for r in rs])
        rows.append((f"net-stream under VIO ({secs} s each way), target {rate} faults/s of 5 ms",
                     f"TX {tx:,.0f} Mbit/s ({tx / ztx:.2f}x of no faults), RX {rx:,.0f} Mbit/s ({rx / zrx:.2f}x), "
                     f"{fr:,.1f} device faults/s achieved, "
                     f"{med([r['cpu_refaults_per_s'] for r in rs]):,.1f} vCPU refaults/s", cmds[("faults", rate)]))
        # Against the target: past ~100/s the achieved rate falls as the stream stalls.
        series.setdefault("guest RX", []).append((rate, rx))
        series.setdefault("guest TX", []).append((rate, tx))
    return rows, {"kind": "mbps_vs_faults", "data": series}
