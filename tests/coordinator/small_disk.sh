#!/bin/sh
# Runs a command with TMPDIR on a small tmpfs of its own, mounted in a private user and mount
# namespace (no privileges needed), so a test can fill that disk to the last byte without touching
# the machine's. Usage: small_disk.sh SIZE COMMAND [ARGS...]   (SIZE as tmpfs takes it: 64m)
set -eu
size=$1
shift
exec unshare --user --map-root-user --mount sh -c '
  dir=$(mktemp -d) && mount -t tmpfs -o size="$0" flexfed-small-disk "$dir" &&
  TMPDIR="$dir" FLEXFED_SMALL_DISK="$dir" exec "$@"' "$size" "$@"
