"""Table of the proxy1 comparison from the original's log (proxy1_original.sh) and lmcore's
summary.json (proxy1_lmcore.sh), both fetched from the device calls' $OUT.

usage: python benchmarks/proxy1_report.py ORIG_LOG LMCORE_SUMMARY_JSON
"""

import json
import re
import sys


def main(orig_log: str, summary: str) -> None:
    log = open(orig_log).read()
    s = json.load(open(summary))
    raw = re.findall(r"step:1000/1000 val_loss:([\d.]+) val_bpb:([\d.]+) train_time:(\d+)ms step_avg:([\d.]+)ms", log)
    ema = re.findall(r"DIAGNOSTIC post_ema val_loss:([\d.]+) val_bpb:([\d.]+)", log)
    nan = float("nan")
    o_raw, o_ms = (float(raw[-1][1]), float(raw[-1][3])) if raw else (nan, nan)
    o_ema = float(ema[-1][1]) if ema else nan
    print(f"card: {s['card']}, torch {s['torch_version']}; original: SDPA flash (FA2); lmcore: {s['attention_backend']}")
    print(f"{'proxy1, 1,000 steps, seed 1337':34s} {'original':>9s} {'lmcore':>9s} {'lm - orig':>10s}")
    print(f"{'val_bpb, raw weights':34s} {o_raw:9.4f} {s['val_bpb_raw']:9.4f} {s['val_bpb_raw'] - o_raw:+10.4f}")
    print(f"{'val_bpb, EMA from init (original)':34s} {o_ema:9.4f} {s['val_bpb_ema']:9.4f} {s['val_bpb_ema'] - o_ema:+10.4f}")
    if s.get("val_bpb_ema_alt") is not None:
        print(f"{'val_bpb, EMA ' + s['ema_alt']:34s} {'':9s} {s['val_bpb_ema_alt']:9.4f}")
    print(f"{'mean step ms (196,608 tokens)':34s} {o_ms:9.1f} {s['mean_step_ms']:9.1f} {'x%.3f faster' % (o_ms / s['mean_step_ms']):>10s}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
