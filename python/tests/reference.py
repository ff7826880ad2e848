"""NumPy float64 reference of libtpla's paged decode and append, and engine-style pools."""

from __future__ import annotations

import numpy as np

RMS_EPS = 1e-6


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even), as uint16."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


FP8_BLOCK = 128


def e4m3_to_f32(codes: np.ndarray) -> np.ndarray:
    """e4m3 ("fn": bias 7, no infinities, 0x7f and 0xff NaN) codes -> float32."""
    c = codes.astype(np.int32)
    e, m = (c >> 3) & 0xF, (c & 7).astype(np.float64)
    v = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0 ** (e - 7))
    v = np.where(c & 0x80, -v, v)
    return np.where((c & 0x7F) == 0x7F, np.nan, v).astype(np.float32)


def fp8_row_bytes(w: int, d_r: int) -> int:
    return w + 4 * -(-w // FP8_BLOCK) + 2 * d_r


def decode_fp8_rows(raw: np.ndarray, w: int, d_r: int) -> np.ndarray:
    """FP8 rows [n, row_bytes] (w codes, one f32 scale per 128 of them, d_r bf16 key) ->
    float64 [n, w + d_r]: code * scale rounded to float32, as the kernels compute it."""
    blocks = -(-w // FP8_BLOCK)
    raw = np.ascontiguousarray(raw)
    scales = raw[:, w : w + 4 * blocks].copy().view("<f4")
    lat = e4m3_to_f32(raw[:, :w]) * np.repeat(scales, FP8_BLOCK, axis=1)[:, :w]
    rope = from_bf16_bits(raw[:, w + 4 * blocks :].copy().view("<u2"))
    return np.concatenate([lat.astype(np.float32), rope], axis=1).astype(np.float64)


def decode_rows(kv: np.ndarray, kv_dtype: str, w: int = 0, d_r: int = 0) -> np.ndarray:
    """The cache's values as float64, whatever it stores (fp8_e4m3: latent width `w`,
    RoPE width `d_r`)."""
    if kv_dtype == "bfloat16":
        return from_bf16_bits(kv).astype(np.float64)
    if kv_dtype == "fp8_e4m3":
        return decode_fp8_rows(kv, w, d_r)
    return kv.astype(np.float64)


class Pool:
    """An engine's paged cache of one layer: shuffled pages, sequences of mixed lengths,
    rows of `row_width` values of `dtype` ("float32", "float16" or "bfloat16" as uint16
    bits; "fp8_e4m3" as uint8 bytes, rows of a latent of `row_width - d_r` values, filled
    by appends only), optionally padded pages (page stride larger than a page)."""

    def __init__(self, rng, row_width, page_size, pages, dtype, pad_rows=0, d_r=0):
        self.rng, self.rw, self.ps, self.dtype = rng, row_width, page_size, dtype
        self.d_r = d_r
        store = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16,
                 "fp8_e4m3": np.uint8}[dtype]
        last = fp8_row_bytes(row_width - d_r, d_r) if dtype == "fp8_e4m3" else row_width
        self.backing = np.zeros((pages, page_size + pad_rows, 1, last), dtype=store)
        # the view the engine passes: pages at a stride of page_size + pad_rows rows
        self.kv = self.backing[:, :page_size]
        self.free = list(rng.permutation(pages))
        self.pages_of: dict[int, list[int]] = {}

    def add(self, seq: int, length: int) -> None:
        n = -(-length // self.ps)
        self.pages_of[seq] = [self.free.pop() for _ in range(n)]
        if self.dtype == "fp8_e4m3":
            return  # rows come from appends
        values = self.rng.standard_normal((max(n, 1) * self.ps, self.rw)).astype(np.float32)
        for k, p in enumerate(self.pages_of[seq]):
            rows = values[k * self.ps : (k + 1) * self.ps]
            if self.dtype == "bfloat16":
                self.kv[p, :, 0] = to_bf16_bits(rows)
            else:
                self.kv[p, :, 0] = rows.astype(self.kv.dtype)

    def rows(self, seq: int, length: int) -> np.ndarray:
        """The first `length` rows of `seq` as float64."""
        pages = self.pages_of[seq]
        if not pages:
            return np.zeros((0, self.rw))
        r = np.concatenate([self.kv[p, :, 0] for p in pages])[:length]
        return decode_rows(r, self.dtype, self.rw - self.d_r, self.d_r)

    def table(self, seqs: list[int], width: int) -> np.ndarray:
        t = np.full((len(seqs), width), 10**8, dtype=np.int32)  # never read: past the pages
        for b, s in enumerate(seqs):
            t[b, : len(self.pages_of[s])] = self.pages_of[s]
        return t

    def slot(self, seq: int, t: int) -> int:
        return self.pages_of[seq][t // self.ps] * self.ps + t % self.ps


def attend(rows: np.ndarray, q: np.ndarray, w: int, scale: float, mu: float):
    """Latent attention of one head: (out [w], lse)."""
    if len(rows) == 0:
        return np.zeros(w), -np.inf
    qs = q.astype(np.float64).copy()
    qs[:w] *= scale * mu
    qs[w:] *= scale
    s = rows @ qs
    m = s.max()
    p = np.exp(s - m)
    return (p / p.sum()) @ rows[:, :w], m + np.log(p.sum())


def decode_ref(pool, seqs, lens, q, w, scale, mu):
    """q [batch, 1, heads, row_width] -> out [batch, 1, heads, w], lse [batch, heads, 1]."""
    batch, _, heads, _ = q.shape
    out = np.zeros((batch, 1, heads, w))
    lse = np.zeros((batch, heads, 1))
    for b, (s, n) in enumerate(zip(seqs, lens)):
        rows = pool.rows(s, n)
        for h in range(heads):
            out[b, 0, h], lse[b, h, 0] = attend(rows, q[b, 0, h], w, scale, mu)
    return out, lse


def normalise(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return a / np.sqrt((a * a).mean(axis=-1, keepdims=True) + RMS_EPS)


def append_rows(latents, k_rope, u, start, w):
    """Cache rows of appended tokens: slice of the rotated normalised latent, RoPE key."""
    y = normalise(latents) @ u
    return np.concatenate([y[:, start : start + w], k_rope.astype(np.float64)], axis=1)


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))
