#!/usr/bin/env python3
"""Writes a newc cpio initramfs: mkinitramfs.py OUT [ARCHIVE_PATH=HOST_FILE[:MODE]]...

Uncompressed on purpose: the guest kernel's code is emulated on this machine, and gunzip of a
few MiB there took over two minutes of boot. Directories and /dev/console (which init needs
for its output before devtmpfs is mounted) are created in the archive itself, so no root
privileges and no cpio tool are needed.
"""
import sys

ino = 0


def entry(out, name, mode, data=b"", rdev=(0, 0)):
    global ino
    ino += 1
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
    hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
    out.write(hdr + name.encode() + b"\0")
    out.write(b"\0" * (-(len(hdr) + len(name) + 1) % 4))
    out.write(data)
    out.write(b"\0" * (-len(data) % 4))


def main():
    out_path, files = sys.argv[1], sys.argv[2:]
    with open(out_path, "wb") as out:
        for d in ["bin", "dev", "proc", "sys", "tmp"]:
            entry(out, d, 0o040755)
        entry(out, "dev/console", 0o020600, rdev=(5, 1))
        for spec in files:
            name, host = spec.split("=", 1)
            mode = 0o100755
            if ":" in host:
                host, m = host.rsplit(":", 1)
                mode = 0o100000 | int(m, 8)
            with open(host, "rb") as f:
                entry(out, name.lstrip("/"), mode, f.read())
        entry(out, "TRAILER!!!", 0)


if __name__ == "__main__":
    main()
