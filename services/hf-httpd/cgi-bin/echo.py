#!/usr/bin/env python3
"""Answers with the request body it read from standard input."""
import hashlib
import os
import sys

n = int(os.environ.get("CONTENT_LENGTH") or 0)
body = sys.stdin.buffer.read(n)
out = sys.stdout.buffer
out.write(b"Status: 200 OK\r\nContent-Type: application/octet-stream\r\n")
out.write(f"X-Body-Sha256: {hashlib.sha256(body).hexdigest()}\r\n".encode())
out.write(f"Content-Length: {len(body)}\r\n\r\n".encode())
out.write(body)
