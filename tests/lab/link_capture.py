"""Capture a lab link and look for the guest's memory in it (tests/lab/test_encrypted_migration.py).

Run inside a host's namespace: ``ip netns exec NS python tests/lab/link_capture.py IFACE OUT``. An
AF_PACKET socket takes every frame of IFACE (both directions) and appends it to OUT until SIGTERM;
the capture prints one line of JSON with what it kept and dropped (the kernel's own counter).

:func:`memtest_words` counts places in a capture where the lab guest's memtest pattern shows
(src/vmshift/lab/guest/memtest.c): word j of every memtest page is ``seed ^ (j * K)``, so two
neighbouring words XOR to ``(j * K) ^ ((j + 1) * K)`` whatever the page's seed. A plain migration
carries thousands of such pairs; a TLS stream carries none (a random match is ~2^-55 per offset).
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import sys
from pathlib import Path

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
SO_RCVBUFFORCE = 33
MEMTEST_K = 0x9E3779B97F4A7C15
MASK64 = (1 << 64) - 1
#: a few word indexes of a memtest page (2..510): neighbour XORs that mark its pages
MARK_WORDS = (2, 3, 100, 255, 400, 509)
CHUNK = 16 << 20


def memtest_marks() -> list[int]:
    return [((j * MEMTEST_K) & MASK64) ^ (((j + 1) * MEMTEST_K) & MASK64) for j in MARK_WORDS]


def memtest_words(path: Path) -> int:
    """How many memtest word pairs (of :data:`MARK_WORDS`) the capture holds, at any byte offset."""
    import numpy as np

    marks = np.array(memtest_marks(), dtype="<u8")
    hits = 0
    with path.open("rb") as f:
        tail = b""
        while chunk := f.read(CHUNK):
            data = tail + chunk
            for offset in range(8):
                words = np.frombuffer(data, dtype="<u8", offset=offset,
                                      count=(len(data) - offset) // 8)
                pairs = words[:-1] ^ words[1:]
                hits += int(np.isin(pairs, marks).sum())
            tail = data[-15:]  # a pair that straddles two chunks (counted at most twice: fine)
    return hits


def tls_records(path: Path) -> int:
    """TLS 1.2/1.3 application-data record headers (17 03 03) in the capture: a rough count."""
    count = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            count += chunk.count(b"\x17\x03\x03")
    return count


def capture(iface: str, out: Path) -> dict[str, int]:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 256 << 20)
    sock.bind((iface, 0))
    sock.settimeout(0.2)
    stop = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    buf = bytearray(1 << 18)
    frames = kept = 0
    print(json.dumps({"listening": iface}), flush=True)
    with out.open("wb", buffering=8 << 20) as f:
        while not stop:
            try:
                n = sock.recv_into(buf)
            except TimeoutError:
                continue
            except InterruptedError:
                continue
            f.write(memoryview(buf)[:n])
            frames += 1
            kept += n
    _packets, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    return {"frames": frames, "bytes": kept, "dropped": drops}


if __name__ == "__main__":
    print(json.dumps(capture(sys.argv[1], Path(sys.argv[2]))), flush=True)
