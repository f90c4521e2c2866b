#!/usr/bin/env python3
"""Prints the CGI meta-variables it was given, one NAME=value per line."""
import os
import sys

out = sys.stdout.buffer
out.write(b"Content-Type: text/plain\r\n\r\n")
for name in sorted(os.environ):
    out.write(f"{name}={os.environ[name]}\n".encode())
