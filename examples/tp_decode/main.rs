//! End-to-end tensor-parallel TPLA decode on several GPUs, one rank per GPU, with the
//! NCCL all-reduce of the ranks' partial head outputs (features `cuda,nccl`).
//!
//! ```text
//! tp_decode check --ranks 2 [--launch threads|processes]
//! tp_decode bench --ranks 2 --model deepseek-v3,kimi-k2 --context 32768 --batch 32,64
//! ```
//! `check`: every rank registers its latent group's shard file (exported from a small
//! synthetic prefill), uploads it to its GPU, decodes two layers, and the layers' partial
//! outputs are summed in one NCCL group call; each rank compares the sum with the f64
//! multi-rank reference. `bench`: per-step time of attention (+ `W'_UV` projection) and
//! all-reduce for TPLA (g = ranks, every head, a 1/g latent slice per rank) against
//! per-rank MLA (g = 1: the full 576-wide cache, heads split over the ranks), timed with
//! CUDA events on every rank.
//!
//! `--launch threads` drives the GPUs from one process (communicators from
//! `ncclCommInitAll`); `--launch processes` starts one process per GPU: rank 0 makes the
//! NCCL unique id and publishes it in a file the other ranks wait for.

mod case;

use case::{worst_rel_l2, TpCase};
use clap::{Parser, ValueEnum};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;
use tpla::attention::cuda::bench::measure_ceilings;
use tpla::attention::cuda::{CudaBackend, CudaDevice, DeviceBuffer, Event};
use tpla::cache::{RankCache, ShardSpec, TransformId};
use tpla::combine::nccl::{Communicator, UniqueId};
use tpla::device_rank::DeviceRank;
use tpla::{DType, Error, ErrorKind, ModelDims, Result, ShardPlan};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Check,
    Bench,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Launch {
    Threads,
    Processes,
}

#[derive(Parser, Debug, Clone)]
struct Args {
    mode: Mode,
    /// Ranks, one GPU each (GPUs 0..ranks).
    #[arg(long, default_value_t = 2)]
    ranks: usize,
    #[arg(long, value_enum, default_value = "threads")]
    launch: Launch,
    /// bench: model presets.
    #[arg(long, value_delimiter = ',', default_value = "deepseek-v3,kimi-k2")]
    model: Vec<String>,
    /// bench: cached tokens per sequence.
    #[arg(long, value_delimiter = ',', default_value = "32768")]
    context: Vec<usize>,
    /// bench: sequences per step.
    #[arg(long, value_delimiter = ',', default_value = "32,64")]
    batch: Vec<usize>,
    /// bench: timed steps (after 5 warm-up steps); medians are reported.
    #[arg(long, default_value_t = 30)]
    repeats: usize,
    /// bench: tensor-parallel degree the per-rank shapes are cut for (default: --ranks).
    /// Above --ranks, this process's GPUs time ranks 0.. of a larger group (one GPU can
    /// time one rank's attention); the all-reduces then span only the GPUs present.
    #[arg(long)]
    tp: Option<usize>,
    /// bench: hidden width whose post-W_O all-reduce is also timed (both schemes need it).
    #[arg(long, default_value_t = 7168)]
    hidden: usize,
    /// Seed of the synthetic layers, caches and queries.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// One JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
    /// Internal (process launch): this process's rank.
    #[arg(long, hide = true)]
    child_rank: Option<usize>,
    /// Internal (process launch): the shared directory (shard files, NCCL id).
    #[arg(long, hide = true)]
    work_dir: Option<PathBuf>,
}

/// The check case: DeepSeek-V2-Lite shapes (16 heads), two layers, lengths around page
/// and tile edges plus a long one.
const CHECK_LENS: [usize; 6] = [1, 63, 64, 65, 1000, 4096];
const CHECK_LAYERS: usize = 2;
const REPORT: &str = "REPORT ";

fn check_case(args: &Args) -> Result<TpCase> {
    TpCase::new(
        ModelDims::preset("deepseek-v2-lite")?,
        CHECK_LAYERS,
        &CHECK_LENS,
        args.seed,
    )
}

fn main() -> ExitCode {
    // NVLink multicast (NVLS) can take shared GPUs out of service: keep it off unless the
    // caller decided otherwise.
    if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
        std::env::set_var("NCCL_NVLS_ENABLE", "0");
    }
    let args = Args::parse();
    let result = match args.child_rank {
        Some(rank) => child(&args, rank),
        None => launch(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tp_decode: {e}");
            ExitCode::FAILURE
        }
    }
}

fn launch(args: &Args) -> Result<()> {
    if args.ranks == 0 || args.repeats == 0 {
        return Err(Error::invalid("--ranks and --repeats must be positive"));
    }
    let dir = tempfile::tempdir()?;
    let case = match args.mode {
        Mode::Check => {
            let case = check_case(args)?;
            case.export(args.ranks, dir.path())?;
            Some(case)
        }
        Mode::Bench => None,
    };
    let reports: Vec<Value> =
        match args.launch {
            Launch::Threads => {
                let devices = (0..args.ranks)
                    .map(CudaDevice::open)
                    .collect::<Result<Vec<_>>>()?;
                let comms = Communicator::init_all(&devices)?;
                std::thread::scope(|s| {
                    let handles: Vec<_> = comms
                        .into_iter()
                        .map(|comm| {
                            let case = case.as_ref();
                            let dir = dir.path();
                            s.spawn(move || run_rank(args, comm, case, dir))
                        })
                        .collect();
                    let mut all = Vec::new();
                    for h in handles {
                        all.extend(h.join().map_err(|_| {
                            Error::new(ErrorKind::Backend, "a rank thread panicked")
                        })??);
                    }
                    Ok::<_, Error>(all)
                })?
            }
            Launch::Processes => {
                let exe = std::env::current_exe()?;
                let children = (0..args.ranks)
                    .map(|r| {
                        Command::new(&exe)
                            .args(std::env::args_os().skip(1))
                            .arg("--child-rank")
                            .arg(r.to_string())
                            .arg("--work-dir")
                            .arg(dir.path())
                            .stdout(Stdio::piped())
                            .spawn()
                            .map_err(Error::from)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let mut all = Vec::new();
                let mut failed = Vec::new();
                for (r, c) in children.into_iter().enumerate() {
                    let out = c.wait_with_output()?;
                    if !out.status.success() {
                        failed.push(r);
                    }
                    for line in String::from_utf8_lossy(&out.stdout).lines() {
                        if let Some(j) = line.strip_prefix(REPORT) {
                            all.push(serde_json::from_str(j).map_err(|e| {
                                Error::invalid(format!("rank {r} sent a bad report: {e}"))
                            })?);
                        }
                    }
                }
                if !failed.is_empty() {
                    return Err(Error::new(
                        ErrorKind::Backend,
                        format!("rank process(es) {failed:?} failed"),
                    ));
                }
                all
            }
        };
    match args.mode {
        Mode::Check => print_check(args, &reports),
        Mode::Bench => print_bench(args, &reports),
    }
}

/// One rank of a process launch: joins the communicator through the id file.
fn child(args: &Args, rank: usize) -> Result<()> {
    let dir = args
        .work_dir
        .as_deref()
        .ok_or_else(|| Error::invalid("--child-rank needs --work-dir"))?;
    let id_path = dir.join("nccl.id");
    let id = if rank == 0 {
        let id = UniqueId::new()?;
        id.publish(&id_path)?;
        id
    } else {
        UniqueId::wait_for(&id_path, Duration::from_secs(120))?
    };
    let device = CudaDevice::open(rank)?;
    let comm = Communicator::init_rank(&id, args.ranks, rank, &device)?;
    let case = match args.mode {
        Mode::Check => Some(check_case(args)?),
        Mode::Bench => None,
    };
    for r in run_rank(args, comm, case.as_ref(), dir)? {
        println!("{REPORT}{r}");
    }
    Ok(())
}

fn run_rank(
    args: &Args,
    comm: Communicator,
    case: Option<&TpCase>,
    dir: &Path,
) -> Result<Vec<Value>> {
    let rank = comm.rank();
    let r = match (args.mode, case) {
        (Mode::Check, Some(case)) => check_rank(&comm, case, dir),
        _ => bench_rank(args, &comm),
    };
    r.map_err(|e| e.context(format!("rank {rank}")))
}

fn check_rank(comm: &Communicator, case: &TpCase, dir: &Path) -> Result<Vec<Value>> {
    let (rank, ranks) = (comm.rank(), comm.ranks());
    let plan = ShardPlan::new(&case.dims, ranks, rank)?;
    let weights = case.weights(&plan)?;
    let transforms = weights
        .iter()
        .map(|w| TransformId {
            code: w.transform_code,
            fingerprint: w.transform_fingerprint,
        })
        .collect();
    let spec = ShardSpec::new(case.dims, &plan, DType::Bf16, 16, transforms)?;
    let mut cache = RankCache::new(spec, 1)?;
    cache.register_file(TpCase::shard_path(dir, ranks, rank))?;
    let ids = case.ids();
    let mut dev = DeviceRank::upload(
        CudaBackend::new(comm.device().ordinal())?,
        &weights,
        &cache,
        &ids,
        ids.len(),
    )?;
    let layers: Vec<usize> = (0..dev.layer_count()).collect();
    for &l in &layers {
        dev.partial_mut(l)?.fill_bytes(0xff)?; // NaN poison
        dev.decode(l, &ids, &case.queries(&plan, l)?)?;
    }
    dev.all_reduce(comm, &layers, ids.len())?;
    let per = case.dims.heads * case.dims.d_v;
    let mut reports = Vec::new();
    for &l in &layers {
        let mut out = vec![0.0f32; dev.partial_len(ids.len())];
        dev.download_partial(l, &mut out)?;
        let err = worst_rel_l2(&out, &case.reference(ranks, l)?, per);
        reports.push(json!({
            "mode": "check", "rank": rank, "ranks": ranks, "layer": l,
            "sequences": CHECK_LENS, "worst_rel_l2": err,
        }));
    }
    Ok(reports)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times `steps` of `step` on `stream` with events around each: median microseconds.
fn bench_rank(args: &Args, comm: &Communicator) -> Result<Vec<Value>> {
    let rank = comm.rank();
    let ranks = args.tp.unwrap_or(comm.ranks());
    if ranks < comm.ranks() {
        return Err(Error::invalid(format!(
            "--tp {ranks} is below the {} ranks launched",
            comm.ranks()
        )));
    }
    let ordinal = comm.device().ordinal();
    let mut reports = Vec::new();
    if rank == 0 {
        let c = measure_ceilings(&CudaBackend::new(ordinal)?)?;
        reports.push(json!({
            "mode": "ceilings", "rank": rank, "device": comm.device().name(),
            "read_gbps": c.read_gbps, "bf16_tflops": c.bf16_tflops,
        }));
    }
    for model in &args.model {
        let dims = ModelDims::preset(model)?;
        for &context in &args.context {
            for &batch in &args.batch {
                for scheme in ["tpla", "mla"] {
                    let plan = match scheme {
                        "tpla" => ShardPlan::new(&dims, ranks, rank)?,
                        _ => ShardPlan::with_head_split(&dims, ranks, 1, rank)?,
                    };
                    let m = time_scheme(args, comm, dims, plan, context, batch)?;
                    let rw = plan.slice_width + dims.d_r;
                    let tokens = (batch * context) as f64;
                    let bytes = tokens * (rw * 2) as f64;
                    let flops = tokens * 2.0 * (plan.heads * (rw + plan.slice_width)) as f64;
                    reports.push(json!({
                        "mode": "bench", "model": model, "scheme": scheme, "rank": rank,
                        "ranks": ranks, "gpus": comm.ranks(), "groups": plan.groups, "heads": plan.heads,
                        "slice_width": plan.slice_width, "context": context, "batch": batch,
                        "attention_us": m.attention_us, "allreduce_us": m.allreduce_us,
                        "step_us": m.step_us, "wo_allreduce_us": m.wo_allreduce_us,
                        "allreduce_bytes": m.allreduce_bytes,
                        "cache_bytes": bytes, "flops": flops,
                        "gbps": bytes / m.attention_us / 1e3,
                        "tflops": flops / m.attention_us / 1e6,
                    }));
                }
            }
        }
    }
    Ok(reports)
}

struct Timing {
    attention_us: f64,
    allreduce_us: f64,
    step_us: f64,
    wo_allreduce_us: f64,
    allreduce_bytes: usize,
}

fn time_scheme(
    args: &Args,
    comm: &Communicator,
    dims: ModelDims,
    plan: ShardPlan,
    context: usize,
    batch: usize,
) -> Result<Timing> {
    let backend = CudaBackend::new(comm.device().ordinal())?;
    let mut rank = DeviceRank::synthetic(backend, dims, plan, 1, batch, context, args.seed)?;
    let dev = rank.backend().device().clone();
    let stream = rank.stream();
    let slots: Vec<i32> = (0..batch as i32).collect();
    let slots = DeviceBuffer::from_host(&dev, &slots)?;
    // scores of standard deviation ~1 against rows ~ U(-1, 1)
    let qw = rank.query_width();
    let sigma = (3.0 / qw as f64).sqrt() as f32;
    let q: Vec<f32> = (0..batch * plan.heads * qw)
        .map(|i| sigma * (((i * 2654435761usize) % 2001) as f32 / 1000.0 - 1.0))
        .collect();
    let q = DeviceBuffer::from_host(&dev, &q)?;
    // TPLA sums every rank's partial outputs; under MLA each rank owns its heads' outputs
    // (a one-GPU communicator has nothing to sum: its all-reduces are not timed)
    let reduce = plan.groups > 1 && comm.ranks() > 1;
    let mut wo = DeviceBuffer::<f32>::new(&dev, batch * args.hidden)?;
    wo.fill_bytes(0)?;
    let events = [Event::new(&dev)?, Event::new(&dev)?, Event::new(&dev)?];
    let (mut attention, mut allreduce, mut step, mut wo_times) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let out = rank.partial(0)?.ptr();
    for i in 0..args.repeats + 5 {
        // SAFETY: the rank's own stream and partial outputs; slots and queries are sized
        // for the batch and outlive the synchronising elapsed_ms calls below.
        unsafe {
            events[0].record(stream)?;
            rank.enqueue(0, batch, slots.ptr(), q.ptr(), out, stream)?;
            events[1].record(stream)?;
        }
        if reduce {
            rank.all_reduce(comm, &[0], batch)?;
        }
        // SAFETY: as above.
        unsafe { events[2].record(stream)? };
        let a = events[0].elapsed_ms(&events[1])? as f64 * 1e3;
        let r = events[1].elapsed_ms(&events[2])? as f64 * 1e3;
        // the post-W_O all-reduce both schemes need (B x hidden f32)
        if comm.ranks() > 1 {
            // SAFETY: `wo` lives on this device until the synchronising elapsed_ms.
            unsafe {
                events[0].record(stream)?;
                comm.all_reduce_raw(&[(wo.ptr(), wo.len())], stream)?;
                events[1].record(stream)?;
            }
        }
        let w = if comm.ranks() > 1 {
            events[0].elapsed_ms(&events[1])? as f64 * 1e3
        } else {
            f64::NAN
        };
        if i >= 5 {
            attention.push(a);
            allreduce.push(r);
            step.push(a + r);
            wo_times.push(w);
        }
    }
    Ok(Timing {
        attention_us: median(attention),
        allreduce_us: if reduce {
            median(allreduce)
        } else if plan.groups > 1 {
            f64::NAN
        } else {
            0.0
        },
        step_us: median(step),
        wo_allreduce_us: median(wo_times),
        allreduce_bytes: if reduce {
            rank.partial_len(batch) * 4
        } else {
            0
        },
    })
}

fn print_check(args: &Args, reports: &[Value]) -> Result<()> {
    let mut worst: f64 = 0.0;
    for r in reports {
        if args.json {
            println!("{r}");
        } else {
            println!(
                "rank {} of {}, layer {}: worst relative L2 error against the f64 reference {:.2e}",
                r["rank"],
                r["ranks"],
                r["layer"],
                r["worst_rel_l2"].as_f64().unwrap_or(f64::NAN)
            );
        }
        let e = r["worst_rel_l2"].as_f64().unwrap_or(f64::INFINITY);
        worst = if e.is_nan() {
            f64::INFINITY
        } else {
            worst.max(e)
        };
    }
    if reports.len() != args.ranks * CHECK_LAYERS {
        return Err(Error::new(
            ErrorKind::Backend,
            format!(
                "expected {} reports, got {}",
                args.ranks * CHECK_LAYERS,
                reports.len()
            ),
        ));
    }
    if worst >= 2e-2 {
        return Err(Error::new(
            ErrorKind::Backend,
            format!("TP decode differs from the reference: worst relative L2 {worst:.2e}"),
        ));
    }
    println!(
        "check passed ({:?} launch, {} ranks): worst relative L2 {worst:.2e}",
        args.launch, args.ranks
    );
    Ok(())
}

/// Per configuration, the slowest rank's medians.
fn print_bench(args: &Args, reports: &[Value]) -> Result<()> {
    for r in reports.iter().filter(|r| r["mode"] == "ceilings") {
        println!("{}ceilings {r}", if args.json { "" } else { "# " });
    }
    let bench: Vec<&Value> = reports.iter().filter(|r| r["mode"] == "bench").collect();
    if !args.json {
        println!(
            "| model | scheme | ranks | heads/rank | slice | ctx | batch | attention us | all-reduce us | step us | W_O all-reduce us | GB/s per rank | TFLOP/s per rank |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    }
    let f = |r: &Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    for r0 in bench.iter().filter(|r| r["rank"] == 0) {
        let same: Vec<&&Value> = bench
            .iter()
            .filter(|r| {
                ["model", "scheme", "context", "batch"]
                    .iter()
                    .all(|k| r[*k] == r0[*k])
            })
            .collect();
        let max = |k: &str| same.iter().map(|r| f(r, k)).fold(f64::NAN, f64::max);
        let agg = json!({
            "model": r0["model"], "scheme": r0["scheme"], "ranks": r0["ranks"], "gpus": r0["gpus"],
            "heads": r0["heads"], "slice_width": r0["slice_width"], "context": r0["context"],
            "batch": r0["batch"], "attention_us": max("attention_us"),
            "allreduce_us": max("allreduce_us"), "step_us": max("step_us"),
            "wo_allreduce_us": max("wo_allreduce_us"),
            "allreduce_bytes": r0["allreduce_bytes"],
            "gbps_per_rank": f(r0, "cache_bytes") / max("attention_us") / 1e3,
            "tflops_per_rank": f(r0, "flops") / max("attention_us") / 1e6,
        });
        if args.json {
            println!("{agg}");
        } else {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} |",
                agg["model"].as_str().unwrap_or("?"),
                agg["scheme"].as_str().unwrap_or("?"),
                agg["ranks"],
                agg["heads"],
                agg["slice_width"],
                agg["context"],
                agg["batch"],
                f(&agg, "attention_us"),
                f(&agg, "allreduce_us"),
                f(&agg, "step_us"),
                f(&agg, "wo_allreduce_us"),
                f(&agg, "gbps_per_rank"),
                f(&agg, "tflops_per_rank"),
            );
        }
    }
    Ok(())
}
