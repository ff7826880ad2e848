//! Element types of a slice cache.

use crate::error::{Error, Result};
use half::{bf16, f16};

/// Element type of cached rows. bf16 is the default: it is what MLA checkpoints and
/// serving engines store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DType {
    #[default]
    Bf16,
    F16,
    F32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::Bf16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }

    /// Stable numeric code used in files and the C ABI.
    pub fn code(self) -> u32 {
        match self {
            DType::Bf16 => 1,
            DType::F16 => 2,
            DType::F32 => 3,
        }
    }

    pub fn from_code(code: u32) -> Result<Self> {
        match code {
            1 => Ok(DType::Bf16),
            2 => Ok(DType::F16),
            3 => Ok(DType::F32),
            _ => Err(Error::invalid(format!(
                "unknown element type code {code} (1 = bf16, 2 = f16, 3 = f32)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
            DType::F32 => "f32",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "bf16" => Ok(DType::Bf16),
            "f16" => Ok(DType::F16),
            "f32" => Ok(DType::F32),
            _ => Err(Error::invalid(format!(
                "unknown element type '{name}' (bf16, f16, f32)"
            ))),
        }
    }

    /// Writes `values` into `out` (little-endian, `values.len() * size()` bytes),
    /// rounding to nearest even.
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
        }
    }

    /// Reads `out.len()` values from `bytes`.
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
                DType::F32 => 1e-7,
            };
            for (a, b) in v.iter().zip(back) {
                assert!((a - b).abs() <= tol * a.abs(), "{dt:?} {a} {b}");
            }
            assert_eq!(DType::from_code(dt.code()).unwrap(), dt);
            assert_eq!(DType::parse(dt.name()).unwrap(), dt);
        }
        assert!(DType::from_code(0).is_err());
        assert!(DType::parse("fp8").is_err());
    }
}
