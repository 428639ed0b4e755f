"""Brotli-11 time and size of an artifact's payload for several chunk sizes (threads = cores).

usage: python benchmarks/brotli_bench.py ARTIFACT [--single]   (--single adds one stream)
"""

import argparse
import time

from lmcore import quant


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--single", action="store_true", help="also one single Brotli stream (slow)")
    args = ap.parse_args()
    blob = open(args.artifact, "rb").read()
    payload = quant.decompress(blob, args.artifact)
    print(f"payload {len(payload):,} bytes, artifact {len(blob):,} bytes, {quant._cpu_threads()} threads")
    print("| chunk MiB | streams | bytes | s |")
    print("|---|---|---|---|")
    sizes = [1 << 19, 1 << 20, 2 << 20, -(-len(payload) // quant._cpu_threads())]
    for cs in sizes:
        t = time.perf_counter()
        b = quant.compress(payload, 11, chunk_size=cs)
        print(f"| {cs / 2**20:.2f} | {-(-len(payload) // cs)} | {len(b):,} | {time.perf_counter() - t:.2f} |", flush=True)
    if args.single:
        import brotli

        t = time.perf_counter()
        b = brotli.compress(payload, quality=11)
        print(f"| single | 1 | {len(b):,} | {time.perf_counter() - t:.2f} |")


if __name__ == "__main__":
    main()
