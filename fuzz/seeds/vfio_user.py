#!/usr/bin/env python3
"""Records the seeds of the two vfio-user fuzz targets from a real session with vdpu.

Drives a vdpu (`--blk` over a scratch disk) as the VMM's client does when it sets up a
passthrough function (version, device info, regions and BARs, the MSI-X capability walk,
interrupts, doorbell io-fds, counters), then brings a virtio-blk queue up and reads a sector
through DMA-mapped memory. Writes:
  corpus/vfio_user_server/session: the client's messages (the server target's input);
  corpus/vfio_user_client/session: vdpu's replies, as [flags, length, payload] records.
Usage: fuzz/seeds/vfio_user.py path/to/vdpu
"""
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "corpus")


class Session:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.msg_id = 0
        self.sent = b""
        self.replies = b""

    def request(self, cmd, payload=b"", fds=()):
        h = struct.pack("<HHIII", self.msg_id, cmd, 16 + len(payload), 0, 0)
        self.msg_id += 1
        msg = h + payload
        self.sent += msg
        if fds:
            self.sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
        else:
            self.sock.sendall(msg)
        head = self._read(16)
        _, _, size, flags, _ = struct.unpack("<HHIII", head)
        body = self._read(size - 16)
        self.replies += struct.pack("<BH", 4 if flags & 0x20 else 0, len(body)) + body
        return body

    def _read(self, n):
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise SystemExit("vdpu closed the connection")
            out += chunk
        return out

    def cfg(self, reg):
        return struct.unpack("<I", self.region_read(7, reg * 4, 4))[0]

    def region_read(self, region, offset, count):
        return self.request(9, struct.pack("<QII", offset, region, count))[16:]

    def region_write(self, region, offset, data):
        self.request(10, struct.pack("<QII", offset, region, len(data)) + data)


def main():
    vdpu = sys.argv[1]
    tmp = tempfile.mkdtemp()
    disk = os.path.join(tmp, "disk.img")
    with open(disk, "wb") as f:
        f.write(bytes(range(256)) * 128)
    path = os.path.join(tmp, "vdpu.sock")
    proc = subprocess.Popen([vdpu, "--socket", path, "--blk", f"path={disk},num_queues=1,queue_size=16"])
    try:
        for _ in range(100):
            if os.path.exists(path):
                break
            time.sleep(0.05)
        s = Session(path)
        caps = json.dumps({"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20}}).encode() + b"\0"
        s.request(1, struct.pack("<HH", 0, 1) + caps)
        s.request(4, struct.pack("<IIII", 16, 0, 0, 0))
        i = 0
        while i < 6:
            info = s.request(5, struct.pack("<IIIIQQ", 32, 0, i, 0, 0, 0))
            size = struct.unpack_from("<Q", info, 16)[0]
            if size == 0:
                i += 1
                continue
            raw = s.cfg(4 + i)
            i += 2 if (raw >> 1) & 3 == 2 else 1
        if (s.cfg(1) >> 16) & 0x10:
            ptr = s.cfg(13) & 0xFC
            while ptr >= 0x40:
                head = s.cfg(ptr // 4)
                if head & 0xFF == 0x11:
                    n = ((head >> 16) & 0x7FF) + 1
                    s.cfg(ptr // 4 + 1)
                    s.cfg(ptr // 4 + 2)
                    break
                ptr = (head >> 8) & 0xFC
        irqs = [os.eventfd(0) for _ in range(2)]
        s.request(8, struct.pack("<IIIII", 20, 4 | 32, 2, 0, 2), irqs)
        s.request(6, struct.pack("<IIII", 16 + 40 * 64, 0, 0, 0))
        s.request(5, struct.pack("<IIIIQQ", 32, 0, 9, 0, 0, 0))
        s.region_read(9, 0, 4096)
        # Guest memory, then one read request on queue 0 (rings at 0x1000/0x2000/0x3000).
        mem = os.memfd_create("guest")
        os.ftruncate(mem, 1 << 20)
        s.request(2, struct.pack("<IIQQQ", 32, 3, 0, 0, 1 << 20), [mem])
        hdr, data, status = 0x10000, 0x11000, 0x12000
        os.pwrite(mem, struct.pack("<IIQ", 0, 0, 1), hdr)
        os.pwrite(mem, struct.pack("<QIHH", hdr, 16, 1, 1) + struct.pack("<QIHH", data, 512, 3, 2)
                  + struct.pack("<QIHH", status, 1, 2, 0), 0x1000)
        os.pwrite(mem, struct.pack("<HHH", 0, 1, 0), 0x2000)
        s.region_write(0, 0x14, bytes([3]))
        s.region_write(0, 0x08, struct.pack("<I", 1))
        s.region_write(0, 0x0C, struct.pack("<I", 1))
        s.region_write(0, 0x14, bytes([11]))
        s.region_write(0, 0x16, struct.pack("<H", 0))
        s.region_write(0, 0x18, struct.pack("<H", 16))
        for off, addr in ((0x20, 0x1000), (0x28, 0x2000), (0x30, 0x3000)):
            s.region_write(0, off, struct.pack("<Q", addr))
        s.region_write(0, 0x1A, struct.pack("<H", 1))
        s.region_write(0, 0x1C, struct.pack("<H", 1))
        s.region_write(0, 0x14, bytes([15]))
        s.region_write(0, 0x6000, struct.pack("<H", 0))
        time.sleep(0.2)
        s.request(3, struct.pack("<IIQQ", 24, 0, 0, 1 << 20))
        s.request(13)
        for target, data in (("vfio_user_server", bytes([0]) + s.sent), ("vfio_user_client", s.replies)):
            os.makedirs(os.path.join(CORPUS, target), exist_ok=True)
            with open(os.path.join(CORPUS, target, "session"), "wb") as f:
                f.write(data)
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()
