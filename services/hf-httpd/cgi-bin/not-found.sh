#!/bin/sh
# A program that answers with its own status.
printf 'Status: 404 Not Here\r\nContent-Type: text/plain\r\n\r\nno such thing\n'
