#!/usr/bin/env python3
"""Prints libtpla's CUDA bench beside FlashMLA's, from the JSON lines of one device call:
summary.py TPLA_JSONL FLASHMLA_JSONL. The ratio is FlashMLA's time over libtpla's, for
the per-rank comparisons of the anchors README: a TPLA rank (g >= 2) of Kimi-K2 against
FlashMLA with 32 heads and of DeepSeek-V3 against 64 heads (MLA under TP=2); g = 1
against FlashMLA with the same heads."""
import json
import sys


def load(path):
    try:
        return [json.loads(l) for l in open(path) if l.startswith("{")]
    except FileNotFoundError:
        return []


tp, fm = load(sys.argv[1]), load(sys.argv[2])
fmt = {(r["H"], r["context"], r["batch"]): r for r in fm}
print(f"{'model':<12}{'g':>2}{'batch':>6} {'kernel':<12}{'us':>9}{'GB/s':>7}{'TF/s':>6}  {'FlashMLA':>14}{'us':>9}{'ratio':>7}")
for r in tp:
    h, g, ctx, b = r["heads"], r["groups"], r["context"], r["batch"]
    ref_h = h if g == 1 else (32 if r["model"] == "kimi-k2" else 64)
    f = fmt.get((ref_h, ctx, b))
    kernel = r["kernel"].split(" split-kv")[0].replace("cuda ", "")
    line = f"{r['model']:<12}{g:>2}{b:>6} {kernel:<12}{r['us_per_step']:>9.1f}{r['gbps']:>7.0f}{r['tflops']:>6.0f}"
    if f:
        line += f"  {'H=' + str(ref_h):>14}{f['us']:>9.1f}{f['us'] / r['us_per_step']:>7.2f}"
    print(line)
for r in fm:
    print(f"flashmla H={r['H']} ctx={r['context']} b={r['batch']}: {r['us']} us {r['GBps']} GB/s {r['TFLOPS']} TF/s err {r['relerr']}")
