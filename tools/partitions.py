#!/usr/bin/env python3
"""The ESP32 partition table a PeerGrid board needs, as the binary the
bootloader reads at 0x8000 (written by `make flash` after the MicroPython
image) and as a CSV for people.

Besides MicroPython's own partitions (nvs, phy_init, the app, and the `vfs`
filesystem with board.json, config.json and the counters) the firmware keeps
two raw data partitions: `energy` (the energy registers' rotating slots,
64 KB) and `spool` (the buffered readings, 1.5 MB).

Binary format (ESP-IDF): 32-byte entries (magic AA 50, type, subtype,
offset, size, 16-byte label, flags; little-endian), then an MD5 entry
(EB EB, 14 bytes FF, MD5 of the entries before it), padded with FF to 3 KB.
"""
from __future__ import annotations

import hashlib
import struct
import sys
from pathlib import Path

APP, DATA = 0x00, 0x01
FACTORY, NVS, PHY, FAT, RAW = 0x00, 0x02, 0x01, 0x81, 0x40     # RAW: a data subtype no one else claims


def layout(flash_mb: int = 4) -> list[tuple[str, int, int, int, int]]:
    """(label, type, subtype, offset, size) for a chip with flash_mb MB."""
    end = flash_mb * 0x100000
    spool, energy = 0x180000, 0x10000
    app = 0x1F0000                               # MicroPython's ESP32 app is about 1.6 MB
    vfs_start = 0x10000 + app
    vfs = end - vfs_start - energy - spool
    if vfs < 0x40000:
        raise ValueError(f"{flash_mb} MB of flash is too small for the app, a filesystem and the spool")
    return [("nvs", DATA, NVS, 0x9000, 0x6000), ("phy_init", DATA, PHY, 0xF000, 0x1000),
            ("factory", APP, FACTORY, 0x10000, app), ("vfs", DATA, FAT, vfs_start, vfs),
            ("energy", DATA, RAW, vfs_start + vfs, energy), ("spool", DATA, RAW, vfs_start + vfs + energy, spool)]


def binary(parts: list[tuple[str, int, int, int, int]]) -> bytes:
    out = b""
    for label, typ, sub, off, size in parts:
        out += struct.pack("<2sBBII16sI", b"\xaa\x50", typ, sub, off, size, label.encode().ljust(16, b"\0"), 0)
    out += b"\xeb\xeb" + b"\xff" * 14 + hashlib.md5(out).digest()
    return out.ljust(0xC00, b"\xff")


def parse(data: bytes) -> list[tuple[str, int, int, int, int]]:
    parts = []
    for i in range(0, len(data), 32):
        e = data[i:i + 32]
        if e[:2] == b"\xeb\xeb":
            if hashlib.md5(data[:i]).digest() != e[16:32]:
                raise ValueError("partition table MD5 does not match")
            return parts
        if e[:2] != b"\xaa\x50":
            break
        _, typ, sub, off, size, label, _ = struct.unpack("<2sBBII16sI", e)
        parts.append((label.rstrip(b"\0").decode(), typ, sub, off, size))
    raise ValueError("no MD5 entry")


def csv(parts: list[tuple[str, int, int, int, int]]) -> str:
    names = {(APP, FACTORY): ("app", "factory"), (DATA, NVS): ("data", "nvs"), (DATA, PHY): ("data", "phy"),
             (DATA, FAT): ("data", "fat"), (DATA, RAW): ("data", "0x40")}
    lines = ["# Name, Type, SubType, Offset, Size"]
    for label, typ, sub, off, size in parts:
        t, s = names[(typ, sub)]
        lines.append(f"{label}, {t}, {s}, 0x{off:x}, 0x{size:x}")
    return "\n".join(lines) + "\n"


def write(out_dir: Path, flash_mb: int = 4) -> None:
    parts = layout(flash_mb)
    (out_dir / "partitions.bin").write_bytes(binary(parts))
    (out_dir / "partitions.csv").write_text(csv(parts))


if __name__ == "__main__":
    write(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 4)
