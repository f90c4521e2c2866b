#!/usr/bin/env python3
"""A program with a side effect: appends its id to ledger.txt (in the CGI
directory), then streams SIZE bytes in PIECES pieces, DELAY_MS apart.

Query: id=ID&size=SIZE&pieces=PIECES&delay_ms=DELAY_MS[&wait_ms=WAIT_MS]
(WAIT_MS: a pause after the side effect, before any output). The body is a
function of ID and SIZE only (lines "ID:offset"), so a client can check it.
No Content-Length: the server frames it (chunked, or close for HTTP/1.0)."""
import os
import sys
import time
import urllib.parse

q = dict(urllib.parse.parse_qsl(os.environ.get("QUERY_STRING", "")))
ident = q.get("id", "0")
size = int(q.get("size", "1000"))
pieces = max(1, int(q.get("pieces", "1")))
delay = int(q.get("delay_ms", "0")) / 1000.0
wait = int(q.get("wait_ms", "0")) / 1000.0

fd = os.open("ledger.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, f"{ident}\n".encode())
os.close(fd)


def body(ident, size):
    out = bytearray()
    while len(out) < size:
        out += f"{ident}:{len(out):010d}\n".encode()
    return bytes(out[:size])


data = body(ident, size)
time.sleep(wait)
out = sys.stdout.buffer
out.write(b"Content-Type: text/plain\r\nX-Ledger-Id: " + ident.encode() + b"\r\n\r\n")
out.flush()
step = (size + pieces - 1) // pieces
for i in range(0, size, step):
    time.sleep(delay)
    out.write(data[i:i + step])
    out.flush()
