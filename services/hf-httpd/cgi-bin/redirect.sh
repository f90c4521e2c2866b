#!/bin/sh
# A redirect: a Location and nothing else.
printf 'Location: /index.html\r\n\r\n'
