//! Element types of a slice cache.
//!
//! bf16, f16 and f32 caches store every element of a row in that type. The FP8 cache
//! ([`DType::Fp8E4m3`]) stores a row as its latent slice in e4m3 with one f32 scale per
//! block of [`FP8_BLOCK`] latent values, then the RoPE key in bf16 (docs/DESIGN.md 7.1
//! has the byte layout); [`DType::row_bytes`], [`DType::encode_row`] and
//! [`DType::decode_row`] know both kinds of row.

use crate::error::{Error, Result};
use float8::F8E4M3;
use half::{bf16, f16};

/// Latent values per FP8 scale block (the last block of a slice may be shorter).
pub const FP8_BLOCK: usize = 128;
/// Largest finite e4m3 magnitude (code 0x7e): a block's largest value maps to it.
pub const E4M3_MAX: f64 = 448.0;

/// Every e4m3 code (the "fn" variant: bias 7, no infinities, 0x7f and 0xff NaN) as f32.
pub static E4M3_TO_F32: [f32; 256] = {
    let mut t = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = F8E4M3::from_bits(i as u8).to_f32();
        i += 1;
    }
    t
};

/// The e4m3 code nearest to `x` (ties to even), saturating to +-448 beyond it; NaN
/// gives 0x7f. NVIDIA's conversion (`__nv_cvt_double_to_fp8`, `__NV_SATFINITE`) through
/// the `float8` crate.
pub fn e4m3_from_f64(x: f64) -> u8 {
    F8E4M3::from_f64(x).to_bits()
}

/// The scale of one FP8 block: its largest magnitude over 448, as f32, so that the
/// largest value becomes +-448 (1.0 for an all-zero block, whose codes are all 0).
pub fn fp8_block_scale(block: &[f64]) -> f32 {
    let amax = block.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let s = (amax / E4M3_MAX) as f32;
    if s > 0.0 && s.is_finite() {
        s
    } else {
        1.0
    }
}

/// Quantises one latent slice: codes `[w]` and scales `[ceil(w / FP8_BLOCK)]`.
pub fn fp8_quantize(latent: &[f64], codes: &mut [u8], scales: &mut [f32]) {
    assert_eq!(codes.len(), latent.len());
    assert_eq!(scales.len(), latent.len().div_ceil(FP8_BLOCK));
    for ((blk, cb), s) in latent
        .chunks(FP8_BLOCK)
        .zip(codes.chunks_mut(FP8_BLOCK))
        .zip(scales.iter_mut())
    {
        *s = fp8_block_scale(blk);
        let inv = *s as f64;
        for (v, c) in blk.iter().zip(cb.iter_mut()) {
            *c = e4m3_from_f64(v / inv);
        }
    }
}

/// Element type of cached rows. bf16 is the default: it is what MLA checkpoints and
/// serving engines store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DType {
    #[default]
    Bf16,
    F16,
    F32,
    /// FP8 e4m3 latent slice with f32 block scales, bf16 RoPE key (module docs).
    Fp8E4m3,
}

impl DType {
    /// Bytes of one element; for [`DType::Fp8E4m3`] one latent code (1), though its rows
    /// also hold scales and a bf16 RoPE key: size rows with [`DType::row_bytes`].
    pub fn size(self) -> usize {
        match self {
            DType::Fp8E4m3 => 1,
            DType::Bf16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }

    /// Whether rows are not `width * size()` bytes of one type (FP8).
    pub fn is_blocked(self) -> bool {
        self == DType::Fp8E4m3
    }

    /// Scale blocks of an FP8 latent slice of width `w`.
    pub fn scale_blocks(w: usize) -> usize {
        w.div_ceil(FP8_BLOCK)
    }

    /// Bytes of one cached row of latent width `w` and RoPE width `d_r`: `(w + d_r) *
    /// size()`, or for FP8 `w` codes, `4 * ceil(w / 128)` scale bytes and `2 * d_r`.
    pub fn row_bytes(self, w: usize, d_r: usize) -> usize {
        match self {
            DType::Fp8E4m3 => w + 4 * Self::scale_blocks(w) + 2 * d_r,
            _ => (w + d_r) * self.size(),
        }
    }

    /// Byte offset of the RoPE key in a row of latent width `w`.
    pub fn rope_offset(self, w: usize) -> usize {
        match self {
            DType::Fp8E4m3 => w + 4 * Self::scale_blocks(w),
            _ => w * self.size(),
        }
    }

    /// The element type of the RoPE key.
    pub fn rope_dtype(self) -> DType {
        match self {
            DType::Fp8E4m3 => DType::Bf16,
            d => d,
        }
    }

    /// Writes one row (`row[..w]` the latent slice, the rest the RoPE key) into `out`
    /// (`row_bytes(w, row.len() - w)` bytes), rounding to nearest even; FP8 slices are
    /// quantised per block with their scales.
    pub fn encode_row(self, row: &[f64], w: usize, out: &mut [u8]) {
        let d_r = row.len() - w;
        assert_eq!(out.len(), self.row_bytes(w, d_r));
        let (lat, rope) = row.split_at(w);
        let (lat_out, rope_out) = out.split_at_mut(self.rope_offset(w));
        match self {
            DType::Fp8E4m3 => {
                let (codes, scale_bytes) = lat_out.split_at_mut(w);
                let mut scales = vec![0.0f32; Self::scale_blocks(w)];
                fp8_quantize(lat, codes, &mut scales);
                for (s, o) in scales.iter().zip(scale_bytes.chunks_exact_mut(4)) {
                    o.copy_from_slice(&s.to_le_bytes());
                }
            }
            _ => self.encode(lat, lat_out),
        }
        self.rope_dtype().encode(rope, rope_out);
    }

    /// Reads one row of latent width `w` (`out.len() - w` RoPE values) from `bytes`
    /// (`row_bytes` of it); an FP8 value is `code * scale` rounded to f32, as the kernels
    /// compute it.
    pub fn decode_row(self, bytes: &[u8], w: usize, out: &mut [f64]) {
        let d_r = out.len() - w;
        assert_eq!(bytes.len(), self.row_bytes(w, d_r));
        let (lat, rope) = out.split_at_mut(w);
        let (lat_in, rope_in) = bytes.split_at(self.rope_offset(w));
        match self {
            DType::Fp8E4m3 => {
                let (codes, scale_bytes) = lat_in.split_at(w);
                for ((cb, ob), sb) in codes
                    .chunks(FP8_BLOCK)
                    .zip(lat.chunks_mut(FP8_BLOCK))
                    .zip(scale_bytes.chunks_exact(4))
                {
                    let s = f32::from_le_bytes([sb[0], sb[1], sb[2], sb[3]]);
                    for (c, o) in cb.iter().zip(ob.iter_mut()) {
                        *o = (E4M3_TO_F32[*c as usize] * s) as f64;
                    }
                }
            }
            _ => self.decode(lat_in, lat),
        }
        self.rope_dtype().decode(rope_in, rope);
    }

    /// Stable numeric code used in files and the C ABI.
    pub fn code(self) -> u32 {
        match self {
            DType::Bf16 => 1,
            DType::F16 => 2,
            DType::F32 => 3,
            DType::Fp8E4m3 => 4,
        }
    }

    pub fn from_code(code: u32) -> Result<Self> {
        match code {
            1 => Ok(DType::Bf16),
            2 => Ok(DType::F16),
            3 => Ok(DType::F32),
            4 => Ok(DType::Fp8E4m3),
            _ => Err(Error::invalid(format!(
                "unknown element type code {code} (1 = bf16, 2 = f16, 3 = f32, 4 = fp8_e4m3)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
            DType::F32 => "f32",
            DType::Fp8E4m3 => "fp8_e4m3",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "bf16" => Ok(DType::Bf16),
            "f16" => Ok(DType::F16),
            "f32" => Ok(DType::F32),
            "fp8_e4m3" | "fp8" => Ok(DType::Fp8E4m3),
            _ => Err(Error::invalid(format!(
                "unknown element type '{name}' (bf16, f16, f32, fp8_e4m3)"
            ))),
        }
    }

    /// Writes `values` into `out` (little-endian, `values.len() * size()` bytes),
    /// rounding to nearest even. FP8 writes bare e4m3 codes (scale 1, saturating): rows
    /// of an FP8 cache go through [`DType::encode_row`].
    pub fn encode(self, values: &[f64], out: &mut [u8]) {
        assert_eq!(out.len(), values.len() * self.size());
        match self {
            DType::Bf16 => {
                for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
                    o.copy_from_slice(&bf16::from_f64(*v).to_le_bytes());
                }
            }
            DType::F16 => {
                for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
                    o.copy_from_slice(&f16::from_f64(*v).to_le_bytes());
                }
            }
            DType::F32 => {
                for (v, o) in values.iter().zip(out.chunks_exact_mut(4)) {
                    o.copy_from_slice(&(*v as f32).to_le_bytes());
                }
            }
            DType::Fp8E4m3 => {
                for (v, o) in values.iter().zip(out.iter_mut()) {
                    *o = e4m3_from_f64(*v);
                }
            }
        }
    }

    /// Reads `out.len()` values from `bytes` (FP8: bare codes, scale 1).
    pub fn decode(self, bytes: &[u8], out: &mut [f64]) {
        assert_eq!(bytes.len(), out.len() * self.size());
        match self {
            DType::Bf16 => {
                for (b, o) in bytes.chunks_exact(2).zip(out.iter_mut()) {
                    *o = bf16::from_le_bytes([b[0], b[1]]).to_f64();
                }
            }
            DType::F16 => {
                for (b, o) in bytes.chunks_exact(2).zip(out.iter_mut()) {
                    *o = f16::from_le_bytes([b[0], b[1]]).to_f64();
                }
            }
            DType::F32 => {
                for (b, o) in bytes.chunks_exact(4).zip(out.iter_mut()) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64;
                }
            }
            DType::Fp8E4m3 => {
                for (b, o) in bytes.iter().zip(out.iter_mut()) {
                    *o = E4M3_TO_F32[*b as usize] as f64;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_codes() {
        let v = [1.0, -2.5, 0.333_333_333, 1e-3, 65504.0];
        for dt in [DType::Bf16, DType::F16, DType::F32] {
            let mut bytes = vec![0u8; v.len() * dt.size()];
            dt.encode(&v, &mut bytes);
            let mut back = [0.0; 5];
            dt.decode(&bytes, &mut back);
            let tol = match dt {
                DType::Bf16 => 4e-3,
                DType::F16 => 1e-3,
                DType::F32 | DType::Fp8E4m3 => 1e-7,
            };
            for (a, b) in v.iter().zip(back) {
                assert!((a - b).abs() <= tol * a.abs(), "{dt:?} {a} {b}");
            }
            assert_eq!(DType::from_code(dt.code()).unwrap(), dt);
            assert_eq!(DType::parse(dt.name()).unwrap(), dt);
        }
        assert!(DType::from_code(0).is_err());
        assert!(DType::parse("fp4").is_err());
        assert_eq!(DType::from_code(4).unwrap(), DType::Fp8E4m3);
        assert_eq!(DType::parse("fp8_e4m3").unwrap(), DType::Fp8E4m3);
        assert!(DType::from_code(5).is_err());
    }

    /// e4m3 by its definition (bias 7, 3 mantissa bits, subnormals at exponent 0, only
    /// S.1111.111 NaN), independent of the float8 crate.
    fn e4m3_by_definition(code: u8) -> f64 {
        let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
        let (e, m) = ((code >> 3) & 0xf, code & 0x7);
        if e == 0xf && m == 0x7 {
            return f64::NAN;
        }
        let mag = if e == 0 {
            m as f64 / 8.0 * 2f64.powi(-6)
        } else {
            (1.0 + m as f64 / 8.0) * 2f64.powi(e as i32 - 7)
        };
        sign * mag
    }

    #[test]
    fn e4m3_decodes_every_code() {
        for code in 0..=255u8 {
            let want = e4m3_by_definition(code);
            let got = E4M3_TO_F32[code as usize] as f64;
            if want.is_nan() {
                assert!(got.is_nan(), "code {code:#04x}");
                assert_eq!(code & 0x7f, 0x7f);
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "code {code:#04x}");
            }
        }
        assert_eq!(E4M3_TO_F32[0x7e], 448.0);
        assert_eq!(E4M3_TO_F32[0xfe], -448.0);
        assert_eq!(E4M3_TO_F32[0x01], 2f32.powi(-9));
        assert_eq!(E4M3_TO_F32[0x08], 2f32.powi(-6));
    }

    /// Round to nearest, ties to the even code, saturating: the nearest finite code by
    /// exhaustive search.
    fn e4m3_by_search(x: f64) -> u8 {
        if x.is_nan() {
            return 0x7f;
        }
        if x.abs() >= 448.0 {
            // saturation: everything at or beyond the largest finite value
            return if x > 0.0 { 0x7e } else { 0xfe };
        }
        let mut best = 0u8;
        let mut best_err = f64::INFINITY;
        for code in 0..=255u8 {
            let v = e4m3_by_definition(code);
            if v.is_nan() || v.is_sign_negative() != x.is_sign_negative() {
                continue;
            }
            let err = (v - x).abs();
            let even = code & 1 == 0;
            if err < best_err || (err == best_err && even) {
                (best, best_err) = (code, err);
            }
        }
        best
    }

    #[test]
    fn e4m3_encodes_to_nearest_even_with_saturation() {
        // every code, every midpoint between neighbours and points just beside them
        let mut finite: Vec<f64> = (0..=255u8)
            .map(e4m3_by_definition)
            .filter(|v| !v.is_nan())
            .collect();
        finite.sort_by(f64::total_cmp);
        let mut probes = finite.clone();
        for pair in finite.windows(2) {
            let mid = (pair[0] + pair[1]) / 2.0;
            probes.extend([mid, mid.next_up(), mid.next_down()]);
        }
        probes.extend([448.0, 449.0, 463.999, 464.0, 464.001, 480.0, 1e9, f64::MAX]);
        probes.extend([
            f64::INFINITY,
            2f64.powi(-10),
            2f64.powi(-10) * 1.0001,
            1e-30,
        ]);
        let negatives: Vec<f64> = probes.iter().map(|v| -v).collect();
        probes.extend(negatives);
        for x in probes {
            let got = e4m3_from_f64(x);
            assert_eq!(got, e4m3_by_search(x), "{x:e}");
            assert!(!E4M3_TO_F32[got as usize].is_nan(), "{x:e}");
        }
        assert_eq!(e4m3_from_f64(1e9), 0x7e);
        assert_eq!(e4m3_from_f64(-1e9), 0xfe);
        assert_eq!(e4m3_from_f64(f64::INFINITY), 0x7e);
        assert_eq!(e4m3_from_f64(f64::NAN) & 0x7f, 0x7f);
        // the smallest subnormal's half rounds to zero (even), a hair above to 0x01
        assert_eq!(e4m3_from_f64(2f64.powi(-10)), 0x00);
        assert_eq!(e4m3_from_f64(2f64.powi(-10).next_up()), 0x01);
    }

    #[test]
    fn fp8_rows_round_trip_within_block_precision() {
        let (w, d_r) = (320, 8);
        let dt = DType::Fp8E4m3;
        assert_eq!(dt.row_bytes(256, 64), 392);
        assert_eq!(dt.row_bytes(512, 64), 656);
        let row: Vec<f64> = (0..w + d_r)
            .map(|i| ((i * 7919 % 1000) as f64 / 500.0 - 1.0) * if i < 128 { 1.0 } else { 1e-3 })
            .collect();
        let mut bytes = vec![0u8; dt.row_bytes(w, d_r)];
        dt.encode_row(&row, w, &mut bytes);
        let mut back = vec![0.0; w + d_r];
        dt.decode_row(&bytes, w, &mut back);
        for blk in 0..DType::scale_blocks(w) {
            let r = blk * FP8_BLOCK..((blk + 1) * FP8_BLOCK).min(w);
            let amax = row[r.clone()].iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for i in r {
                // half an e4m3 ulp (2^-4 relative) or the subnormal step of the block
                let tol = (row[i].abs() / 16.0).max(amax / 448.0 * 2f64.powi(-10));
                assert!(
                    (row[i] - back[i]).abs() <= tol * 1.0001,
                    "{i} {} {}",
                    row[i],
                    back[i]
                );
            }
        }
        for i in w..w + d_r {
            assert!((row[i] - back[i]).abs() <= row[i].abs() / 256.0);
        }
        // zero row: scale 1, codes 0
        let zeros = vec![0.0; w + d_r];
        dt.encode_row(&zeros, w, &mut bytes);
        dt.decode_row(&bytes, w, &mut back);
        assert!(back.iter().all(|&v| v == 0.0));
    }
}
