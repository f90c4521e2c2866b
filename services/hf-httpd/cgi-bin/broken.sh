#!/bin/sh
# Not a CGI response: the server answers 502.
echo "this is not a header block"
