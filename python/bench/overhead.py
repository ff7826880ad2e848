"""Python overhead per tpla.decode call on the CPU path (a benchmark, not a test).

Times the same paged decode step from Python (tpla.decode on NumPy arrays, caller-owned
outputs, and with outputs allocated) and with the call's work made negligible (one
token per sequence, one head), so that the time is dominated by argument parsing, array
checks and the GIL release. Reports the median per call in microseconds.

    python python/bench/overhead.py [cpu|reference]

With backend "reference" the attention of one token is negligible, so the time is the
binding plus libtpla's call path; with "cpu" it adds the CPU backend's fixed cost per call
(its thread pool).
"""

import time

import numpy as np

import tpla


def median_us(fn, n=20000):
    for _ in range(1000):
        fn()
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        for _ in range(n // 20):
            fn()
        times.append((time.perf_counter() - t0) / (n // 20))
    return 1e6 * sorted(times)[len(times) // 2]


def main():
    dims = tpla.ModelDims(1, 64, 16, 16, 8, 0.2)
    plan = tpla.ShardPlan(dims, 1, 0)
    import sys
    backend = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    ctx = tpla.RankContext(dims, plan, 1, threads=1, backend=backend)
    rng = np.random.default_rng(0)
    ctx.install_layer(0, rng.standard_normal((1, 64, 16)), rng.standard_normal((1, 64, 8)),
                      tpla.Transform.identity(64))
    kv = rng.standard_normal((4, 16, 1, 80)).astype(np.float32)
    table = np.array([[0]], np.int32)
    lens = np.array([1], np.int32)
    q = rng.standard_normal((1, 1, 1, 80)).astype(np.float32)
    out = np.empty((1, 1, 1, 64), np.float32)
    lse = np.empty((1, 1, 1), np.float32)
    p = tpla.decode_plan(lens, ctx)
    ctx.reserve(1)
    noop = median_us(lambda: None)
    with_out = median_us(lambda: tpla.decode(q, kv, table, lens, p, out=out, lse=lse))
    alloc = median_us(lambda: tpla.decode(q, kv, table, lens, p))
    planning = median_us(lambda: tpla.decode_plan(lens, ctx))
    print(f"empty lambda call:                 {noop:6.2f} us")
    print(f"tpla.decode, caller-owned outputs: {with_out:6.2f} us per call (batch 1, 1 token)")
    print(f"tpla.decode, outputs allocated:    {alloc:6.2f} us per call")
    print(f"tpla.decode_plan:                  {planning:6.2f} us per call")


if __name__ == "__main__":
    main()
