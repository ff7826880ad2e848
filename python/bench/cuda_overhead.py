"""Python call path of the GPU decode against the raw kernel time (a benchmark, not a test).

Times one layer's decode step of a rank (kimi-k2 dims: 64 heads, d_c 512, d_r 64; G
latent groups) on a pool of bf16 pages, batch B, every sequence L tokens long, with CUDA
events:

* kernel:   a CUDA graph of 10 back-to-back decodes, replayed; the GPU time per decode
            with no Python in between (what the Rust bench measures);
* python:   N back-to-back `tpla.decode(...)` calls from Python on torch's current stream
            (caller-owned outputs), timed by events around the loop: the GPU time per
            call when Python issues it. Also `engine.decode(..., stream=<int>)` and with
            outputs allocated per call;
* host:     wall time per call to issue a short burst (before synchronising): the
            Python + binding + launch cost on the CPU, also at batch 1 / 64 tokens.

The target (issue 13): python within 2% of kernel at batch 64, 32K context.

    python python/bench/cuda_overhead.py [--groups 2] [--batch 64] [--context 32768]
"""

import argparse
import json
import time

import numpy as np
import torch

import tpla

PAGE = 64


def setup(groups, batch, context, layers=1):
    dims = tpla.ModelDims.preset("kimi-k2")
    plan = tpla.ShardPlan(dims, groups, 0)
    ctx = tpla.RankContext(dims, plan, layers, threads=1)
    rng = np.random.default_rng(0)
    w = plan.slice_width
    for layer in range(layers):
        ctx.install_layer(layer,
                          (0.1 * rng.standard_normal((dims.heads, w, dims.d_n))).astype(np.float32),
                          (0.1 * rng.standard_normal((dims.heads, w, dims.d_v))).astype(np.float32),
                          tpla.Transform.identity(dims.d_c))
    engine = tpla.DeviceEngine(ctx, torch.cuda.current_device())
    rw = engine.row_width
    per_seq = -(-context // PAGE)
    pages = batch * per_seq
    kv = torch.randn(pages, PAGE, 1, rw, device="cuda").to(torch.bfloat16)
    table = torch.randperm(pages, device="cuda").to(torch.int32).view(batch, per_seq).contiguous()
    seqlens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = (0.05 * torch.randn(batch, 1, dims.heads, rw, device="cuda")).contiguous()
    out = torch.empty(batch, 1, dims.heads, w, device="cuda")
    lse = torch.empty(batch, dims.heads, 1, device="cuda")
    p = tpla.decode_plan(seqlens, engine, block_table_width=per_seq)
    return engine, dict(q=q, kv=kv, table=table, seqlens=seqlens, plan=p, out=out, lse=lse)


def gpu_us(fn, calls, repeats=5):
    """Median over `repeats` of the GPU time per call of `calls` back-to-back fn()."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return float(np.median(times))


def host_us(fn, calls, repeats=20):
    """Median wall time per call to issue `calls` calls (the queue never fills)."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) * 1e6 / calls)
    torch.cuda.synchronize()
    return float(np.median(times))


def measure(groups, batch, context, calls):
    engine, a = setup(groups, batch, context)
    q, kv, table, seqlens, p, out, lse = (a[k] for k in
                                          ("q", "kv", "table", "seqlens", "plan", "out", "lse"))

    def module_call():
        tpla.decode(q, kv, table, seqlens, p, out=out, lse=lse)

    stream = torch.cuda.current_stream().cuda_stream

    def method_call():
        engine.decode(q, kv, table, seqlens, p, out=out, lse=lse, stream=stream)

    def allocating_call():
        tpla.decode(q, kv, table, seqlens, p)

    for _ in range(5):
        module_call()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        module_call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    inner = 10
    with torch.cuda.graph(graph):
        for _ in range(inner):
            module_call()
    kernel = gpu_us(graph.replay, max(1, calls // inner)) / inner
    python = gpu_us(module_call, calls)
    method = gpu_us(method_call, calls)
    alloc = gpu_us(allocating_call, calls)
    host = host_us(module_call, 20)
    host_method = host_us(method_call, 20)
    return {
        "device": torch.cuda.get_device_name(), "groups": groups, "batch": batch,
        "context": context, "slice_width": engine.slice_width, "heads": engine.heads,
        "kernel_us": round(kernel, 2), "python_us": round(python, 2),
        "python_overhead_pct": round(100 * (python / kernel - 1), 2),
        "method_stream_int_us": round(method, 2),
        "allocating_us": round(alloc, 2),
        "host_us_per_call": round(host, 2),
        "host_us_per_call_stream_int": round(host_method, 2),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--calls", type=int, default=200)
    a = ap.parse_args()
    big = measure(a.groups, a.batch, a.context, a.calls)
    print(json.dumps(big))
    small = measure(a.groups, 1, 64, 2000)
    print(json.dumps(small))
    ok = big["python_overhead_pct"] <= 2.0
    print(f"batch {a.batch}, {a.context} tokens: python {big['python_us']} us vs kernel "
          f"{big['kernel_us']} us per decode ({big['python_overhead_pct']:+.2f}%, target "
          f"<= 2%: {'met' if ok else 'NOT met'}); host cost per call "
          f"{big['host_us_per_call']} us (stream=int: {big['host_us_per_call_stream_int']} us); "
          f"batch 1 / 64 tokens: host {small['host_us_per_call']} us, "
          f"kernel {small['kernel_us']} us")


if __name__ == "__main__":
    main()
