//! The C ABI exercised from C: the programs of `ffi-tests/` and `examples-c/` are compiled
//! with `-std=c99 -Wall -Wextra -Werror -pedantic` against `include/tpla.h`, linked with
//! the `libtpla.a` / `libtpla.so` that `cargo test` builds for this test (the library's
//! `staticlib` and `cdylib` crate types land in `target/<profile>/deps`, next to this test
//! executable), and run: natively, under valgrind memcheck, and built with
//! AddressSanitizer + UndefinedBehaviorSanitizer. A missing valgrind or sanitizer runtime
//! skips those runs with a reason printed in every run's output ("SKIPPED ..."). `CC`
//! and `CXX` choose the compilers.
//!
//! `happy.c` records every output it computes; the test runs the same flow through the
//! Rust API and requires the same bits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};
use tpla::attention::cpu::CpuBackend;
use tpla::attention::reference::rotated_latents;
use tpla::cache::{ExportPlan, RankCache, ShardSpec, ShardWriter};
use tpla::combine::all_reduce_in_process;
use tpla::convert::{FoldedLayer, MlaWeights};
use tpla::decode::{Outputs, Queries, RankContext, RankLayer};
use tpla::synthetic::SyntheticLayer;
use tpla::transform::Transform;
use tpla::weights_file::WeightsFileWriter;
use tpla::{DType, ModelDims, ShardPlan};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const C_FLAGS: [&str; 5] = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic"];

/// Where `cargo test` put this executable and the library's static and shared builds.
fn deps_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    exe.parent()
        .expect("the test lives in a directory")
        .to_path_buf()
}

fn static_lib() -> PathBuf {
    let lib = deps_dir().join("libtpla.a");
    assert!(
        lib.exists(),
        "{} is missing: cargo builds the staticlib crate type of the library for \
         integration tests; run these tests through `cargo test`",
        lib.display()
    );
    lib
}

/// A fresh directory for one test's files, under `target/<profile>/c-abi/`.
fn work_dir(name: &str) -> PathBuf {
    let dir = deps_dir().parent().unwrap().join("c-abi").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Build {
    /// Optimised, linked with libtpla.a.
    Plain,
    /// AddressSanitizer + UndefinedBehaviorSanitizer, linked with libtpla.a.
    Sanitized,
    /// Optimised, linked with libtpla.so (found through an rpath).
    Shared,
}

fn compiler(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_string())
}

fn show(output: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Compiles and links `source` (relative to the repository root) once per build kind.
fn build(source: &str, kind: Build) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<(String, Build), PathBuf>>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(exe) = built.get(&(source.to_string(), kind)) {
        return exe.clone();
    }
    let dir = deps_dir().parent().unwrap().join("c-abi").join("bin");
    std::fs::create_dir_all(&dir).unwrap();
    let stem = Path::new(source).file_stem().unwrap().to_str().unwrap();
    let exe = dir.join(format!("{stem}-{kind:?}").to_lowercase());
    let root = Path::new(ROOT);
    let cpp = source.ends_with(".cpp");
    let mut cmd = Command::new(if cpp {
        compiler("CXX", "c++")
    } else {
        compiler("CC", "cc")
    });
    if cpp {
        cmd.args(["-std=c++11", "-Wall", "-Wextra", "-Werror", "-pedantic"]);
    } else {
        cmd.args(C_FLAGS);
    }
    cmd.arg("-g")
        .arg("-I")
        .arg(root.join("include"))
        .arg("-I")
        .arg(root.join("ffi-tests"))
        .arg(root.join(source))
        .arg("-o")
        .arg(&exe);
    match kind {
        Build::Plain => {
            cmd.arg("-O2").arg(static_lib());
        }
        Build::Sanitized => {
            cmd.args([
                "-O1",
                "-fsanitize=address,undefined",
                "-fno-sanitize-recover=all",
                "-fno-omit-frame-pointer",
            ])
            .arg(static_lib());
        }
        Build::Shared => {
            static_lib(); // the same build produced the shared library next to it
            let deps = deps_dir();
            cmd.arg("-O2")
                .arg(format!("-L{}", deps.display()))
                .arg(format!("-Wl,-rpath,{}", deps.display()))
                .arg("-ltpla");
        }
    }
    // What rustc lists for a Rust static library on Linux (--print native-static-libs).
    cmd.args(["-lm", "-lpthread", "-ldl"]);
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run the compiler {cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "compiling {source} ({kind:?}) failed: {cmd:?}\n{}",
        show(&output)
    );
    built.insert((source.to_string(), kind), exe.clone());
    exe
}

/// Runs `exe` with `args` and requires success.
fn run(exe: &Path, args: &[&Path], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(exe);
    // cargo's LD_LIBRARY_PATH lists target/<profile>, where an older libtpla.so from
    // `cargo build` may lie; programs find this build's library through their rpath.
    cmd.args(args)
        .envs(envs.iter().copied())
        .env_remove("LD_LIBRARY_PATH");
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(output.status.success(), "{cmd:?} failed\n{}", show(&output));
    output
}

fn tool_missing(name: &str, probe: &mut Command) -> Option<String> {
    match probe.output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!("{name} does not work here:\n{}", show(&o))),
        Err(e) => Some(format!("{name} is not installed ({e})")),
    }
}

/// Reports a check that could not run. The harness captures `println!` and shows it
/// only for failing tests, which would hide the skip; a write to the process's stderr
/// handle is not captured, so the reason shows in every `cargo test` run.
fn skip(test: &str, reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}

fn valgrind_missing() -> Option<String> {
    tool_missing("valgrind", Command::new("valgrind").arg("--version"))
}

/// Whether the C compiler can build and run a sanitized program here.
fn sanitizers_missing() -> Option<String> {
    let dir = work_dir("sanitizer-probe");
    let src = dir.join("probe.c");
    std::fs::write(&src, "int main(void) { return 0; }\n").unwrap();
    let exe = dir.join("probe");
    let mut cc = Command::new(compiler("CC", "cc"));
    cc.args(["-fsanitize=address,undefined", "-o"])
        .arg(&exe)
        .arg(&src);
    tool_missing("the C compiler's address/undefined sanitizers", &mut cc)
        .or_else(|| tool_missing("a sanitized program", &mut Command::new(&exe)))
}

const SANITIZER_ENV: [(&str, &str); 2] = [
    // allocator_may_return_null: hardening.c asks for a pool too large to allocate, which
    // libtpla must refuse with a status, as it does under the system allocator
    (
        "ASAN_OPTIONS",
        "detect_leaks=1:abort_on_error=0:exitcode=97:allocator_may_return_null=1",
    ),
    (
        "UBSAN_OPTIONS",
        "print_stacktrace=1:halt_on_error=1:exitcode=98",
    ),
];

/// Runs `exe` under valgrind memcheck; any memory error or leak fails.
fn memcheck(exe: &Path, args: &[&Path], dir: &Path) {
    let log = dir.join(format!(
        "{}.valgrind.log",
        exe.file_name().unwrap().to_str().unwrap()
    ));
    let mut cmd = Command::new("valgrind");
    cmd.args([
        "--error-exitcode=99",
        "--leak-check=full",
        // "Possibly lost" blocks are Rust's thread handles, reached through interior
        // pointers, and the stacks of pool threads still exiting; a leaked handle or
        // buffer is "definitely" or "indirectly" lost.
        "--show-leak-kinds=definite,indirect",
        "--errors-for-leak-kinds=definite,indirect",
        "--quiet",
    ])
    .arg(format!("--log-file={}", log.display()))
    .arg(exe)
    .args(args)
    .env_remove("LD_LIBRARY_PATH");
    let output = cmd.output().expect("valgrind runs");
    let report = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        output.status.success() && report.trim().is_empty(),
        "memcheck of {} failed\n{}\n--- valgrind\n{report}",
        exe.display(),
        show(&output)
    );
}

fn read_f32s(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn assert_same_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: number of recorded values");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!(
            "{what}: value {i} is {} from C, {} from Rust",
            got[i], want[i]
        );
    }
}

// ---- the Rust twin of ffi-tests/happy.c --------------------------------------------------

const LAYERS: usize = 2;
const RANKS: usize = 2;
const STEPS: usize = 3;
const SEQ_IDS: [u32; 2] = [3, 8];
const SEQ_LENS: [usize; 2] = [40, 70];

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// What C holds of one sequence in one layer: every value rounded to f32.
struct SeqData {
    latents: Vec<f32>,
    k_rope: Vec<f32>,
    q_nope: Vec<f32>,
    q_rope: Vec<f32>,
}

/// happy.c's model: per layer its transform, MLA weights and sequences.
struct Happy {
    d: ModelDims,
    transforms: Vec<Transform>,
    mla: Vec<MlaWeights>,
    data: Vec<Vec<SeqData>>,
}

fn happy_inputs() -> Happy {
    let d = ModelDims::new(4, 64, 16, 32, 24, 0.15).unwrap();
    let mut transforms = Vec::new();
    let mut mla = Vec::new();
    let mut data: Vec<Vec<SeqData>> = Vec::new();
    for l in 0..LAYERS {
        let syn = SyntheticLayer::generate(&d, 11 + l as u64).unwrap();
        transforms.push(if l == 0 {
            Transform::hadamard(d.d_c, 5).unwrap()
        } else {
            Transform::identity(d.d_c).unwrap()
        });
        let w = &syn.weights;
        let round = |v: &[f64]| f64s(&f32s(v));
        mla.push(MlaWeights::new(d, round(&w.w_uk), round(&w.w_uv), round(&w.gamma)).unwrap());
        data.push(
            SEQ_IDS
                .iter()
                .zip(SEQ_LENS)
                .map(|(&id, len)| {
                    let seq = syn.sequence(len, 100 + id as u64);
                    let (mut q_nope, mut q_rope) = (Vec::new(), Vec::new());
                    for t in 0..len {
                        let q = syn.query_at(&seq, t);
                        q_nope.extend(f32s(&q.q_nope));
                        q_rope.extend(f32s(&q.q_rope));
                    }
                    SeqData {
                        latents: f32s(&seq.tokens.latents),
                        k_rope: f32s(&seq.tokens.k_rope),
                        q_nope,
                        q_rope,
                    }
                })
                .collect(),
        );
    }
    Happy {
        d,
        transforms,
        mla,
        data,
    }
}

impl Happy {
    /// Rank `r`'s layer `l`, as tpla_fold_layer hands it to C (f32) and
    /// tpla_context_set_layer installs it.
    fn rank_layer(&self, l: usize, r: usize) -> RankLayer {
        let plan = ShardPlan::with_head_split(&self.d, RANKS, RANKS, r).unwrap();
        let folded = FoldedLayer::new(&self.mla[l], &self.transforms[l])
            .unwrap()
            .rank(&plan, 1.0)
            .unwrap();
        let mu = 1.0 + 0.25 * r as f64;
        let t = self.transforms[l].clone();
        RankLayer::from_f32(f32s(&folded.w_uk), f32s(&folded.w_uv), mu, t, 0.5).unwrap()
    }

    /// The converted weights files happy.c loads: `dir/rank{r}.weights`.
    fn write_weights_files(&self, dir: &Path) {
        for r in 0..RANKS {
            let plan = ShardPlan::with_head_split(&self.d, RANKS, RANKS, r).unwrap();
            let path = dir.join(format!("rank{r}.weights"));
            let mut w = WeightsFileWriter::create(path, self.d, plan, LAYERS).unwrap();
            for l in 0..LAYERS {
                w.write_layer(&self.rank_layer(l, r)).unwrap();
            }
            w.finish().unwrap();
        }
    }
}

/// The outputs happy.c records, computed through the Rust API from the same inputs and
/// with the same f32 roundings the C side applies.
fn happy_record_from_rust(happy: &Happy) -> Vec<f32> {
    let (d, transforms, data) = (happy.d, &happy.transforms, &happy.data);
    let prefill: Vec<usize> = SEQ_LENS.iter().map(|n| n - STEPS).collect();

    // The prefill export, into buffers (happy.c checks its files hold the same bytes).
    let ids = transforms
        .iter()
        .map(|t| tpla::cache::TransformId {
            code: t.kind().code(),
            fingerprint: t.fingerprint(),
        })
        .collect();
    let seqs: Vec<(u32, usize)> = SEQ_IDS.iter().copied().zip(prefill.clone()).collect();
    let plan = ExportPlan::new(d, RANKS, DType::Bf16, 16, ids, &seqs).unwrap();
    let mut images = vec![vec![0u8; plan.image_len()]; RANKS];
    {
        let views = images.iter_mut().map(|b| b.as_mut_slice()).collect();
        let mut writer = ShardWriter::to_buffers(&plan, views).unwrap();
        while let Some((l, id)) = writer.next_block() {
            let s = SEQ_IDS.iter().position(|&x| x == id).unwrap();
            let n = prefill[s];
            let rotated = rotated_latents(&f64s(&data[l][s].latents[..n * d.d_c]), &transforms[l]);
            writer
                .push(&rotated, &f64s(&data[l][s].k_rope[..n * d.d_r]))
                .unwrap();
        }
        writer.finish().unwrap();
    }

    struct Rank {
        ctx: RankContext,
        cache: RankCache,
        w_uk: Vec<Vec<f32>>,
    }
    let mut ranks: Vec<Rank> = (0..RANKS)
        .map(|r| {
            let plan = ShardPlan::with_head_split(&d, RANKS, RANKS, r).unwrap();
            let backend = Box::new(CpuBackend::new(2).unwrap());
            let mut ctx = RankContext::new(d, plan, LAYERS, backend).unwrap();
            let mut w_uk = Vec::new();
            for l in 0..LAYERS {
                let layer = happy.rank_layer(l, r);
                w_uk.push(layer.w_uk.clone());
                ctx.install(l, layer).unwrap();
            }
            let spec =
                ShardSpec::new(d, &plan, DType::Bf16, 16, ctx.transform_ids().unwrap()).unwrap();
            let mut cache = RankCache::new(spec, 64).unwrap();
            cache.register_buffer(images[r].clone()).unwrap();
            Rank { ctx, cache, w_uk }
        })
        .collect();

    let (h, w) = (d.heads, d.d_c / RANKS);
    let mut record = Vec::new();
    for step in 0..STEPS {
        for rank in ranks.iter_mut() {
            for (s, &id) in SEQ_IDS.iter().enumerate() {
                for (l, layer_data) in data.iter().enumerate() {
                    let t = prefill[s] + step;
                    let sd = &layer_data[s];
                    rank.ctx
                        .append_token(
                            &mut rank.cache,
                            id,
                            l,
                            &sd.latents[t * d.d_c..(t + 1) * d.d_c],
                            &sd.k_rope[t * d.d_r..(t + 1) * d.d_r],
                            l == 0,
                        )
                        .unwrap();
                }
            }
        }
        for (l, layer_data) in data.iter().enumerate() {
            let (mut q_nope, mut q_rope) = (Vec::new(), Vec::new());
            for (s, sd) in layer_data.iter().enumerate() {
                let t = prefill[s] + step;
                q_nope.extend_from_slice(&sd.q_nope[t * h * d.d_n..(t + 1) * h * d.d_n]);
                q_rope.extend_from_slice(&sd.q_rope[t * h * d.d_r..(t + 1) * h * d.d_r]);
            }
            let nope = Queries::Nope {
                q_nope: &q_nope,
                q_rope: &q_rope,
            };
            if l == 0 {
                let mut heads: Vec<Vec<f32>> = ranks
                    .iter_mut()
                    .map(|rank| {
                        let mut out = vec![f32::NAN; 2 * h * d.d_v];
                        rank.ctx
                            .decode(&rank.cache, 0, &SEQ_IDS, nope, Outputs::Heads(&mut out))
                            .unwrap();
                        out
                    })
                    .collect();
                // happy.c's absorbed latent queries, same arithmetic in the same order
                let wk = &ranks[1].w_uk[0];
                let mut q_lat = vec![0.0f32; 2 * h * w];
                for s in 0..2 {
                    for hh in 0..h {
                        for j in 0..w {
                            let mut acc = 0.0f64;
                            for k in 0..d.d_n {
                                acc += wk[(hh * w + j) * d.d_n + k] as f64
                                    * q_nope[(s * h + hh) * d.d_n + k] as f64;
                            }
                            q_lat[(s * h + hh) * w + j] = acc as f32;
                        }
                    }
                }
                let mut latent_heads = vec![f32::NAN; 2 * h * d.d_v];
                let rank = &mut ranks[1];
                let latent = Queries::Latent {
                    q_lat: &q_lat,
                    q_rope: &q_rope,
                };
                rank.ctx
                    .decode(
                        &rank.cache,
                        0,
                        &SEQ_IDS,
                        latent,
                        Outputs::Heads(&mut latent_heads),
                    )
                    .unwrap();
                record.extend(latent_heads);
                let mut views: Vec<&mut [f32]> =
                    heads.iter_mut().map(|v| v.as_mut_slice()).collect();
                all_reduce_in_process(&mut views).unwrap();
                record.extend_from_slice(&heads[0]);
            } else {
                for rank in ranks.iter_mut() {
                    let mut out = vec![f32::NAN; 2 * h * w];
                    let mut lse = vec![f32::NAN; 2 * h];
                    rank.ctx
                        .decode(
                            &rank.cache,
                            1,
                            &SEQ_IDS,
                            nope,
                            Outputs::Latent {
                                out: &mut out,
                                lse: &mut lse,
                            },
                        )
                        .unwrap();
                    record.extend(out);
                    record.extend(lse);
                }
            }
        }
    }
    record
}

// ---- tests ---------------------------------------------------------------------------------

#[test]
fn happy_path_is_bit_equal_to_the_rust_api() {
    let dir = work_dir("happy");
    let happy = happy_inputs();
    happy.write_weights_files(&dir);
    let record = dir.join("record.f32");
    run(
        &build("ffi-tests/happy.c", Build::Plain),
        &[&record, &dir],
        &[],
    );
    let from_c = read_f32s(&record);
    assert!(from_c.iter().all(|v| v.is_finite()), "non-finite outputs");
    let from_rust = happy_record_from_rust(&happy);
    assert_same_bits(&from_c, &from_rust, "happy.c against the Rust API");
}

#[test]
fn every_error_path_returns_its_status_and_sentence() {
    let dir = work_dir("errors");
    let out = run(&build("ffi-tests/errors.c", Build::Plain), &[&dir], &[]);
    print!("{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn hostile_use_found_by_issue_17_is_survived_and_named() {
    let dir = work_dir("hardening");
    let out = run(&build("ffi-tests/hardening.c", Build::Plain), &[&dir], &[]);
    print!("{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn engine_paged_memory_decodes_bit_equal_to_the_owned_cache() {
    let out = run(&build("ffi-tests/paged.c", Build::Plain), &[], &[]);
    print!("{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn sequence_shards_merge_to_exact_decode_through_the_c_abi() {
    let dir = work_dir("sequence");
    let out = run(&build("ffi-tests/sequence.c", Build::Plain), &[&dir], &[]);
    print!("{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn separate_contexts_run_concurrently_from_several_threads() {
    let out = run(&build("ffi-tests/threads.c", Build::Plain), &[], &[]);
    print!("{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn memcheck_finds_no_memory_error_or_leak() {
    if let Some(reason) = valgrind_missing() {
        return skip("memcheck_finds_no_memory_error_or_leak", &reason);
    }
    let dir = work_dir("valgrind");
    happy_inputs().write_weights_files(&dir);
    let record = dir.join("record.f32");
    memcheck(
        &build("ffi-tests/happy.c", Build::Plain),
        &[&record, &dir],
        &dir,
    );
    memcheck(&build("ffi-tests/errors.c", Build::Plain), &[&dir], &dir);
    memcheck(&build("ffi-tests/hardening.c", Build::Plain), &[&dir], &dir);
    memcheck(&build("ffi-tests/threads.c", Build::Plain), &[], &dir);
    memcheck(&build("ffi-tests/paged.c", Build::Plain), &[], &dir);
    memcheck(&build("ffi-tests/sequence.c", Build::Plain), &[&dir], &dir);
}

#[test]
fn address_and_undefined_behaviour_sanitizers_are_clean() {
    if let Some(reason) = sanitizers_missing() {
        return skip(
            "address_and_undefined_behaviour_sanitizers_are_clean",
            &reason,
        );
    }
    let dir = work_dir("sanitizers");
    let happy = happy_inputs();
    happy.write_weights_files(&dir);
    let record = dir.join("record.f32");
    let exe = build("ffi-tests/happy.c", Build::Sanitized);
    run(&exe, &[&record, &dir], &SANITIZER_ENV);
    assert_same_bits(
        &read_f32s(&record),
        &happy_record_from_rust(&happy),
        "sanitized happy.c against the Rust API",
    );
    run(
        &build("ffi-tests/errors.c", Build::Sanitized),
        &[&dir],
        &SANITIZER_ENV,
    );
    run(
        &build("ffi-tests/threads.c", Build::Sanitized),
        &[],
        &SANITIZER_ENV,
    );
    run(
        &build("ffi-tests/hardening.c", Build::Sanitized),
        &[&dir],
        &SANITIZER_ENV,
    );
    run(
        &build("ffi-tests/paged.c", Build::Sanitized),
        &[],
        &SANITIZER_ENV,
    );
    run(
        &build("ffi-tests/sequence.c", Build::Sanitized),
        &[&dir],
        &SANITIZER_ENV,
    );
}

#[test]
fn cuda_backend_agrees_with_the_cpu_backend_or_says_unsupported() {
    // Without the `cuda` feature or a GPU the program checks the UNSUPPORTED status.
    let out = run(&build("ffi-tests/cuda.c", Build::Plain), &[], &[]);
    print!("{}", String::from_utf8_lossy(&out.stdout));
}

/// Names of what `dir` holds.
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn example_runs_against_the_static_and_the_shared_library() {
    for kind in [Build::Plain, Build::Shared] {
        let dir = work_dir(&format!("example-{kind:?}").to_lowercase());
        let out = run(&build("examples-c/tpla_example.c", kind), &[&dir], &[]);
        assert_eq!(
            entries(&dir),
            Vec::<String>::new(),
            "the example left files behind"
        );
        let text = String::from_utf8_lossy(&out.stdout);
        print!("{text}");
        // g = 2 with a contiguous PCA split on this layer: about 0.1 (tpla demo agrees)
        let errors: Vec<f64> = text
            .lines()
            .filter(|l| l.contains("|TPLA - MLA| / |MLA| ="))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(errors.len(), 4, "{text}");
        assert!(errors.iter().all(|e| *e < 0.2), "{errors:?}");
    }
    // Without a directory it makes a temporary one and removes it: neither the current
    // directory nor $TMPDIR keeps anything.
    let cwd = work_dir("example-cwd");
    let tmp = work_dir("example-tmp");
    let out = Command::new(build("examples-c/tpla_example.c", Build::Plain))
        .current_dir(&cwd)
        .env("TMPDIR", &tmp)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(entries(&cwd), Vec::<String>::new());
    assert_eq!(entries(&tmp), Vec::<String>::new());
}

#[test]
fn engine_example_decodes_on_its_own_pages_and_cleans_up() {
    for kind in [Build::Plain, Build::Shared] {
        let dir = work_dir(&format!("engine-example-{kind:?}").to_lowercase());
        let exe = build("examples-c/tpla_engine_example.c", kind);
        let out = run(&exe, &[&dir], &[]);
        let text = String::from_utf8_lossy(&out.stdout);
        print!("{text}");
        let errors: Vec<f64> = text
            .lines()
            .filter(|l| l.contains("|TPLA - MLA| / |MLA| ="))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        // 3 steps x 2 sequences; g = 2 with contiguous PCA: about 0.1, as tpla_example
        assert_eq!(errors.len(), 6, "{text}");
        assert!(errors.iter().all(|e| *e < 0.2), "{errors:?}");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(left.is_empty(), "the example left {left:?} behind");
    }
}

#[test]
fn header_is_usable_from_cpp() {
    let out = run(&build("ffi-tests/cpp_include.cpp", Build::Plain), &[], &[]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("cpp: libtpla "));
}

#[test]
fn a_skipped_check_is_visible_without_nocapture() {
    // the memcheck test, run by the harness as `cargo test` runs it, with no valgrind
    // on its PATH
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "memcheck_finds_no_memory_error_or_leak"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        shown.contains("SKIPPED memcheck_finds_no_memory_error_or_leak: valgrind is not installed"),
        "{shown}"
    );
}
