#!/bin/sh
# ptxas stand-in that build_fa3.sh puts before nvcc's own when FA3_PTXAS names another
# ptxas (upstream FA3 builds with ptxas 12.8, which it finds fastest). nvcc 13 writes PTX
# ISA 9.0, which ptxas 12.8 does not read, so the header is lowered to 8.7. Should the
# PTX use anything newer, ptxas 12.8 stops with an error rather than miscompiling; at the
# pinned commits it assembles every kernel. FA3_REAL_PTXAS is the ptxas to run.
for a in "$@"; do
  case $a in
    *.ptx) sed -i 's/^\.version 9\.[0-9]*$/.version 8.7/' "$a" ;;
  esac
done
exec "${FA3_REAL_PTXAS:?FA3_REAL_PTXAS is not set}" "$@"
