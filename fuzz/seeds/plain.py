#!/usr/bin/env python3
"""Writes the seeds of the http_api, vm_config, blk_engine and net_engine fuzz targets."""
import json
import os
import struct

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus")


def put(target, name, data):
    os.makedirs(os.path.join(CORPUS, target), exist_ok=True)
    with open(os.path.join(CORPUS, target, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


CONFIG = {
    "payload": {"kernel": "/bin/sh", "cmdline": "console=ttyS0", "initramfs": "/bin/sh"},
    "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
    "memory": {"size": 268435456, "shared": True, "reclaim": True},
    "disks": [{"path": "/bin/sh", "readonly": True, "num_queues": 2, "queue_size": 128, "id": "d0"}],
    "net": [{"tap": "vmtap0", "ip": "192.168.249.1", "mask": "255.255.255.0", "mac": "52:54:00:12:34:56",
             "num_queues": 2, "queue_size": 256, "id": "n0"}],
    "user_devices": [
        {"socket": "/tmp/vdpu.sock", "vio": {"mode": "elastic"}},
        {"socket": "/tmp/vdpu2.sock", "pri": True},
    ],
    "reclaim": {"store": "/tmp", "compression": "lz4"},
    "serial": {"mode": "Tty"},
    "console": {"mode": "Off"},
}


def request(method, path, body=b"", extra=""):
    return (f"{method} {path} HTTP/1.1\r\n{extra}Content-Length: {len(body)}\r\n\r\n").encode() + body


def main():
    put("vm_config", "full", json.dumps(CONFIG))
    put("vm_config", "minimal", json.dumps({"payload": {"kernel": "/bin/sh"}}))
    put("vm_config", "vio", json.dumps({
        "payload": {"kernel": "/bin/sh"}, "memory": {"size": 67108864, "shared": True},
        "user_devices": [{"socket": "/tmp/x.sock", "vio": {"mode": "snoop", "lockpage": True}}]}))

    put("http_api", "session", b"".join([
        request("GET", "/api/v1/vmm.ping"),
        request("PUT", "/api/v1/vm.create", json.dumps(CONFIG).encode()),
        request("PUT", "/api/v1/vm.boot"),
        request("PUT", "/api/v1/vm.reclaim", b'{"bytes":1048576,"dma_only":true}', "Expect: 100-continue\r\n"),
        request("PUT", "/api/v1/vm.send-migration", b'{"destination_url":"unix:/tmp/m.sock","local":true}'),
        request("GET", "/api/v1/vm.counters"),
        request("GET", "/api/v1/vm.info", extra="Connection: close\r\n"),
    ]))
    put("http_api", "errors", b"".join([
        request("DELETE", "/api/v1/vm.boot"),
        request("PUT", "/api/v1/vm.create", b"{oops"),
        b"GET /api/v1/vm.info HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    ]))

    # blk_engine: [size exponent, next avail lo, hi, budget, flags] + a 64 KiB image with a read
    # (header, 2 data descriptors, status), a write, a get-id and a flush.
    img = bytearray(0x4000)
    descs = []

    def chain(kind, sector, data):
        head = len(descs)
        hdr = 0x3000 + 0x10 * head
        struct.pack_into("<IIQ", img, hdr, kind, 0, sector)
        descs.append((hdr, 16, 1))
        for addr, length, writable in data:
            descs.append((addr, length, 1 | (2 if writable else 0)))
        descs.append((0x3800 + head, 1, 2))
        return head

    heads = [
        chain(0, 2, [(0x4000, 512, True), (0x4200, 512, True)]),
        chain(1, 5, [(0x4400, 1024, False)]),
        chain(8, 0, [(0x4800, 20, True)]),
        chain(4, 0, []),
    ]
    for i, (addr, length, flags) in enumerate(descs):
        nxt = i + 1 if flags & 1 else 0
        struct.pack_into("<QIHH", img, 16 * i, addr, length, flags, nxt)
    struct.pack_into("<HH", img, 0x1000, 0, len(heads))
    for i, h in enumerate(heads):
        struct.pack_into("<H", img, 0x1004 + 2 * i, h)
    put("blk_engine", "requests", bytes([4, 0, 0, 7, 0]) + bytes(img) + bytes(0x1000))
    put("blk_engine", "event_idx", bytes([3, 0, 0, 1, 1]) + bytes(img) + bytes(0x1000))

    # net_engine: [size exponent, next avail lo, hi, flags, frame length lo, hi] + a 64 KiB image
    # with eight receive buffers of 600 bytes (a 1514-byte frame takes three merged) and, as a
    # transmit chain, a header descriptor and a frame descriptor.
    img = bytearray(0x4000)
    for i in range(8):
        struct.pack_into("<QIHH", img, 16 * i, 0x3000 + 0x100 * i, 600, 2, 0)
    struct.pack_into("<QIHH", img, 16 * 8, 0x2800, 12, 1, 9)
    struct.pack_into("<QIHH", img, 16 * 9, 0x2900, 60, 0, 0)
    struct.pack_into("<HH", img, 0x1000, 0, 9)
    for i in range(8):
        struct.pack_into("<H", img, 0x1004 + 2 * i, i)
    struct.pack_into("<H", img, 0x1004 + 2 * 8, 8)
    frame = struct.pack("<H", 1514)
    put("net_engine", "merged", bytes([4, 0, 0, 2]) + frame + bytes(img) + bytes(0xc000))
    put("net_engine", "whole", bytes([4, 0, 0, 1]) + struct.pack("<H", 500) + bytes(img) + bytes(0xc000))


if __name__ == "__main__":
    main()
