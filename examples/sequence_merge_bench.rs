//! Merge (a) against merge (b) of sequence shards on the CPU (`combine::sequence`), at
//! batch 64 with the heads of Kimi-K2 and DeepSeek-V3: the in-process merge over every
//! rank of a (g, s) deployment, each rank's own share of the work (rescale for (a); pack
//! and unpack for (b)), and the bytes each rank puts through its collectives per step.
//! Medians of `--repeats` runs (default 31).
//!
//! `cargo run --release --example sequence_merge_bench -- [--repeats N] [--batch B]`

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;
use tpla::combine::sequence::{
    merge_by_lse_in_process, merge_packed_in_process, pack_against_bound, packed_row_len,
    rescale_by_gathered_lse, unpack_merged,
};
use tpla::ModelDims;

fn median_us(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Times `body` after `prepare` (not timed) `repeats` times; the median in microseconds.
fn time<S>(repeats: usize, mut prepare: impl FnMut() -> S, mut body: impl FnMut(S)) -> f64 {
    let samples = (0..repeats)
        .map(|_| {
            let state = prepare();
            let t = Instant::now();
            body(state);
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    median_us(samples)
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

fn main() {
    let repeats = arg("--repeats", 31).max(1);
    let batch = arg("--batch", 64);
    println!(
        "| model (heads) | g | s | (a) in process us | (b) in process us | (a) per rank us | \
         (b) per rank us | (a) bytes/rank | (b) bytes/rank |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for model in ["kimi-k2", "deepseek-v3"] {
        let d = ModelDims::preset(model).unwrap();
        let (rows, width) = (batch * d.heads, d.d_v);
        for (g, s) in [(1, 2), (1, 4), (1, 8), (2, 2), (4, 2), (2, 4)] {
            let ranks = g * s;
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            let outs: Vec<Vec<f32>> = (0..ranks)
                .map(|_| {
                    (0..rows * width)
                        .map(|_| rng.random_range(-1.0..1.0))
                        .collect()
                })
                .collect();
            let lses: Vec<Vec<f32>> = (0..ranks)
                .map(|_| (0..rows).map(|_| rng.random_range(-5.0..5.0)).collect())
                .collect();
            // one bound per row of a latent group, 40 above its shards' log-sum-exps
            let bounds: Vec<Vec<f64>> = (0..ranks)
                .map(|r| {
                    let group = r / s;
                    (0..rows)
                        .map(|i| {
                            (0..s)
                                .map(|j| lses[group * s + j][i] as f64)
                                .fold(f64::NEG_INFINITY, f64::max)
                                + 40.0
                        })
                        .collect()
                })
                .collect();
            let lv: Vec<&[f32]> = lses.iter().map(|l| l.as_slice()).collect();
            let bv: Vec<&[f64]> = bounds.iter().map(|b| b.as_slice()).collect();
            let a_all = time(
                repeats,
                || outs.clone(),
                |mut o| {
                    let mut ov: Vec<&mut [f32]> = o.iter_mut().map(|x| x.as_mut_slice()).collect();
                    merge_by_lse_in_process(s, width, &mut ov, &lv).unwrap();
                },
            );
            let b_all = time(
                repeats,
                || outs.clone(),
                |mut o| {
                    let mut ov: Vec<&mut [f32]> = o.iter_mut().map(|x| x.as_mut_slice()).collect();
                    merge_packed_in_process(s, width, &mut ov, &lv, &bv).unwrap();
                },
            );
            // one rank's own work: (a) rescales by the gathered log-sum-exps of its
            // group; (b) packs, and unpacks the summed pack
            let a_rank = time(
                repeats,
                || outs[0].clone(),
                |mut o| {
                    rescale_by_gathered_lse(&mut o, width, 0, &lv[..s]).unwrap();
                },
            );
            let mut packed = vec![0.0f64; rows * packed_row_len(width)];
            let mut merged = vec![0.0f32; rows * width];
            let b_rank = time(
                repeats,
                || (),
                |()| {
                    pack_against_bound(&outs[0], &lses[0], &bounds[0], width, &mut packed).unwrap();
                    unpack_merged(&packed, width, &mut merged).unwrap();
                },
            );
            // what a rank sends into its collectives: (a) its log-sum-exps to the
            // all-gather, its outputs to one all-reduce over all ranks; (b) its f64 pack
            // to the all-reduce over its group's shards, then (g > 1) its outputs to the
            // all-reduce over the ranks of its shard index
            let a_bytes = 4 * rows + 4 * rows * width;
            let b_bytes =
                8 * rows * packed_row_len(width) + if g > 1 { 4 * rows * width } else { 0 };
            println!(
                "| {model} ({}) | {g} | {s} | {a_all:.0} | {b_all:.0} | {a_rank:.0} | {b_rank:.0} \
                 | {a_bytes} | {b_bytes} |",
                d.heads
            );
        }
    }
}
