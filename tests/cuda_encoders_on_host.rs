//! The scalar encoders of the CUDA kernels (src/attention/cuda/common.cuh: the e4m3 code,
//! the FP8 block scale, the bf16 roundings of f64 and f32 values the device appends and
//! the bf16 projection use, and the f32 widening),
//! compiled for this host by the C++ compiler with stand-ins for the few CUDA intrinsics
//! they call, give the bits of the host encoders of src/dtype.rs (the `float8` and `half`
//! crates) on every probe: all e4m3 codes, the midpoints between them and their
//! neighbours, the subnormal range, saturation, infinities, NaNs of both signs and many
//! payloads, and random values over the whole range. They are integer operations on the
//! bits (and IEEE divisions, the same on both), so this checks the device's arithmetic
//! without a GPU; the GPU tests check the rows the kernels write from them. `CXX` chooses
//! the compiler (default `c++`).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use tpla::dtype::{e4m3_from_f64, fp8_block_scale, E4M3_TO_F32};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Reads `<kind> <hex bits>` lines and prints the encoder's result in hex: `e` e4m3 code
/// of an f64, `b` bf16 of an f64, `f` bf16 of an f32, `s` FP8 block scale (f32 bits) of a
/// block maximum, `w` f64 bits of an f32 widened as the host widens it.
const DRIVER: &str = r#"
#include <cmath>
#include <cstdio>
#include <cstring>
#define __device__
#define __forceinline__ inline
static inline long long __double_as_longlong(double x) { long long r; std::memcpy(&r, &x, 8); return r; }
static inline double __longlong_as_double(long long x) { double r; std::memcpy(&r, &x, 8); return r; }
static inline unsigned int __float_as_uint(float x) { unsigned int r; std::memcpy(&r, &x, 4); return r; }
static inline float __int_as_float(int x) { float r; std::memcpy(&r, &x, 4); return r; }
using std::isfinite;
// declared for the templates of common.cuh, which this program never instantiates
struct Dim { unsigned x; };
extern const Dim threadIdx, blockDim;
template <class T> T __shfl_xor_sync(unsigned, T, int);
#include "common.cuh"
int main() {
    char kind;
    unsigned long long b;
    while (std::scanf(" %c %llx", &kind, &b) == 2) {
        const double x = __longlong_as_double((long long)b);
        switch (kind) {
        case 'e': std::printf("%x\n", e4m3_from_f64(x)); break;
        case 'b': std::printf("%x\n", f64_to_bf16_host(x)); break;
        case 's': std::printf("%x\n", __float_as_uint(fp8_block_scale(x))); break;
        case 'f':
        case 'w': {
            float f;
            const unsigned int u = (unsigned int)b;
            std::memcpy(&f, &u, 4);
            if (kind == 'f')
                std::printf("%x\n", f32_to_bf16_host(f));
            else
                std::printf("%llx\n", (unsigned long long)__double_as_longlong(widen_as_host(f)));
            break;
        }
        default: return 1;
        }
    }
    return 0;
}
"#;

/// The driver, compiled once per test process.
fn driver() -> PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(compile_driver).clone()
}

fn compile_driver() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tpla-encoders-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("driver.cpp");
    std::fs::write(&src, DRIVER).unwrap();
    let exe = dir.join("driver");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = Command::new(&cxx)
        .args([
            "-std=c++17",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-DSLICE=256",
            "-I",
        ])
        .arg(PathBuf::from(ROOT).join("src/attention/cuda"))
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("running {cxx}: {e}"));
    assert!(
        out.status.success(),
        "{cxx} could not compile the encoders:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Runs the driver on `probes` (kind, bits) and returns its answers.
fn run(probes: &[(char, u64)]) -> Vec<u64> {
    let mut child = Command::new(driver())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = String::new();
    for (k, b) in probes {
        input.push_str(&format!("{k} {b:x}\n"));
    }
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success(), "the driver failed: {}", out.status);
    let answers: Vec<u64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| u64::from_str_radix(l, 16).unwrap())
        .collect();
    assert_eq!(answers.len(), probes.len());
    answers
}

/// Values around every finite e4m3 value and every midpoint between neighbours (one and
/// a few f64 ulps either side), times the powers of two that move them through the
/// subnormal range and past saturation, both signs; then specials and random values.
fn e4m3_probes(rng: &mut ChaCha8Rng) -> Vec<f64> {
    let mut finite: Vec<f64> = E4M3_TO_F32
        .iter()
        .map(|&v| v as f64)
        .filter(|v| v.is_finite() && *v >= 0.0)
        .collect();
    finite.sort_by(f64::total_cmp);
    finite.dedup();
    let mut points = finite.clone();
    points.extend(finite.windows(2).map(|p| (p[0] + p[1]) / 2.0));
    points.extend([464.0, 480.0, 2f64.powi(-10), 2f64.powi(-7)]);
    let mut probes = Vec::new();
    for &p in &points {
        for scale in [1.0, 0.5, 2.0, 2f64.powi(-3), 2f64.powi(3)] {
            let mut v = p * scale;
            probes.push(v);
            for _ in 0..3 {
                v = v.next_up();
                probes.push(v);
            }
            let mut v = p * scale;
            for _ in 0..3 {
                v = v.next_down();
                probes.push(v);
            }
        }
    }
    probes.extend([
        0.0,
        f64::MIN_POSITIVE,
        5e-324,
        1e-30,
        1e30,
        f64::MAX,
        f64::INFINITY,
        f64::NAN,
        f64::from_bits(0x7ff0_0000_0000_0001),
        f64::from_bits(0x7ff4_0000_dead_beef),
    ]);
    for _ in 0..50_000 {
        let e = rng.random_range(-14..12);
        probes.push(rng.random_range(1.0..2.0) * 2f64.powi(e));
    }
    let negatives: Vec<f64> = probes.iter().map(|v| -v).collect();
    probes.extend(negatives);
    probes
}

#[test]
fn the_device_e4m3_code_is_the_hosts() {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    let values = e4m3_probes(&mut rng);
    let probes: Vec<(char, u64)> = values.iter().map(|v| ('e', v.to_bits())).collect();
    for (v, got) in values.iter().zip(run(&probes)) {
        assert_eq!(
            got as u8,
            e4m3_from_f64(*v),
            "{v:e} ({:#018x})",
            v.to_bits()
        );
    }
}

#[test]
fn the_device_block_scale_is_the_hosts() {
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    let f32_tiny = f32::from_bits(1) as f64;
    let mut values = vec![
        0.0,
        5e-324,
        f32_tiny * 448.0,
        f32_tiny * 224.0, // a half f32 subnormal after the division: ties to even
        f32_tiny * 224.0 * (1.0 + 1e-15),
        f32::MIN_POSITIVE as f64 * 448.0,
        f32::MAX as f64 * 448.0,
        f32::MAX as f64 * 448.0 * 1.000_000_1, // rounds past f32's largest: not finite
        3.3895313892515355e38,
        f64::MAX,
        f64::INFINITY,
    ];
    for _ in 0..20_000 {
        let e = rng.random_range(-160..140);
        values.push(rng.random_range(1.0..2.0) * 2f64.powi(e));
    }
    let probes: Vec<(char, u64)> = values.iter().map(|v| ('s', v.to_bits())).collect();
    for (v, got) in values.iter().zip(run(&probes)) {
        let want = fp8_block_scale(&[*v]);
        assert_eq!(
            got as u32,
            want.to_bits(),
            "amax {v:e}: host scale {want:e}"
        );
    }
}

/// f32 bits whose bf16 rounding differs between round-to-nearest-even of the f32 (the
/// f32 rounding, checked on them too) and the host's rounding of its f64 (which ignores
/// the f32's lowest three mantissa bits), then random f32 and f64 values of every
/// magnitude and the specials.
#[test]
fn the_device_bf16_roundings_and_widening_are_the_hosts() {
    let mut rng = ChaCha8Rng::seed_from_u64(16);
    let mut f32_bits: Vec<u32> = vec![
        0x3f80_8001, // round bit set, only the lowest bit below it: the host rounds down
        0x3f80_8007,
        0x3f81_8001,
        0x3f80_8000,
        0x3f80_7fff,
        0x0000_0001,
        0x0080_0000,
        0x7f7f_ffff,
        0x7f80_0000,
        0x7fc0_0000,
        0x7f80_0001, // signalling NaN: quietened, payload kept
        0x7fbf_ffff,
        0x7fd0_1234,
    ];
    for _ in 0..30_000 {
        f32_bits.push(rng.random());
    }
    let negatives: Vec<u32> = f32_bits.iter().map(|b| b ^ 0x8000_0000).collect();
    f32_bits.extend(negatives);
    let widened: Vec<(char, u64)> = f32_bits.iter().map(|&b| ('w', b as u64)).collect();
    for (&b, got) in f32_bits.iter().zip(run(&widened)) {
        let want = f32::from_bits(b) as f64;
        assert_eq!(got, want.to_bits(), "widening f32 {b:#010x}");
    }
    let rounded: Vec<(char, u64)> = f32_bits.iter().map(|&b| ('f', b as u64)).collect();
    for (&b, got) in f32_bits.iter().zip(run(&rounded)) {
        let want = half::bf16::from_f32(f32::from_bits(b)).to_bits();
        assert_eq!(got as u16, want, "rounding f32 {b:#010x} to bf16");
    }
    let mut values: Vec<f64> = f32_bits.iter().map(|&b| f32::from_bits(b) as f64).collect();
    for _ in 0..30_000 {
        values.push(f64::from_bits(rng.random()));
    }
    values.extend([
        3.3895313892515355e38,
        3.3895314e38,
        f64::MAX,
        1e-45,
        2f64.powi(-134),
        2f64.powi(-133) * 1.5,
    ]);
    let probes: Vec<(char, u64)> = values.iter().map(|v| ('b', v.to_bits())).collect();
    for (v, got) in values.iter().zip(run(&probes)) {
        let want = half::bf16::from_f64(*v).to_bits();
        assert_eq!(got as u16, want, "{v:e} ({:#018x})", v.to_bits());
    }
}
