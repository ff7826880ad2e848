//! The fidelity report on a checkpoint with a calibration file, and the command-line
//! tools end to end on a synthetic checkpoint.

mod checkpoint_support;

use checkpoint_support::{write_checkpoint, Encoding};
use std::process::Command;
use tpla::attention::reference::Reference;
use tpla::cache::{RankCache, ShardSpec};
use tpla::calibration::{
    synthetic_layers, write_synthetic, CalibrationFile, LayerCalibration, SyntheticCalibration,
};
use tpla::checkpoint::{rank_file_name, Checkpoint};
use tpla::decode::RankContext;
use tpla::fidelity::{
    build_transform, evaluate, report, AppendChoice, Prepared, ReportOptions, Scenario, Storage,
};
use tpla::transform::{MuPolicy, SliceLayout, TransformKind};
use tpla::weights_file;
use tpla::{DType, ModelDims};

fn dims() -> ModelDims {
    ModelDims::new(4, 64, 16, 32, 32, 0.15).unwrap()
}

/// A synthetic checkpoint and calibration file in a temporary directory.
fn setup(layers: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let synthetic = synthetic_layers(&dims(), layers, 3).unwrap();
    write_checkpoint(dir.path(), &synthetic, Encoding::Bf16, true);
    let spec = SyntheticCalibration {
        tokens: 1500,
        window: 600,
        queries: 2,
        seed: 8,
    };
    write_synthetic(dir.path().join("cal.bin"), &synthetic, &spec).unwrap();
    dir
}

#[test]
fn report_on_a_checkpoint_layer_measures_every_configuration() {
    let dir = setup(1);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let file = CalibrationFile::open(dir.path().join("cal.bin")).unwrap();
    let cal = LayerCalibration::from_file(&file, 0).unwrap();
    let window = file.window(0, 0).unwrap();
    let s = Scenario::from_window(ckpt.mla_weights(0).unwrap(), cal, &window).unwrap();
    assert_eq!(s.evaluated.len(), 2);
    assert_eq!(s.tokens.len(), 600);
    let opts = ReportOptions {
        groups: vec![2, 4],
        sequence: vec![tpla::SequenceSharding::NONE],
        transforms: TransformKind::ALL.to_vec(),
        policies: MuPolicy::ALL.to_vec(),
        appends: AppendChoice::ALL.to_vec(),
        storages: vec![Storage::F64],
        layout: SliceLayout::Contiguous,
        short: 4,
        long: 300,
    };
    // the dtype axis: every storage, compared with bf16 rows as well
    let dtypes = ReportOptions {
        groups: vec![1, 2],
        transforms: vec![TransformKind::Pca],
        policies: vec![MuPolicy::One],
        appends: vec![AppendChoice::Exact],
        storages: ["f64", "bf16", "fp8_e4m3", "fp8_e4m3_pow2"]
            .map(|n| Storage::parse(n).unwrap())
            .to_vec(),
        ..opts.clone()
    };
    let by_dtype = report(&s, &dtypes).unwrap();
    assert_eq!(by_dtype.len(), 2 * 4);
    for pair in by_dtype.chunks(4) {
        let (f64_row, bf16_row, fp8_row) = (&pair[0], &pair[1], &pair[2]);
        assert_eq!(bf16_row.short.vs_bf16, Some(0.0));
        let fp8_vs = fp8_row.short.vs_bf16.unwrap();
        assert!(fp8_vs > 1e-3 && fp8_vs < 0.05, "{fp8_row:?}");
        assert!(f64_row.short.vs_bf16.unwrap() < fp8_vs);
        assert!((fp8_row.short.rel_l2 - f64_row.short.rel_l2).abs() < 0.05);
    }
    let rows = report(&s, &opts).unwrap();
    assert_eq!(rows.len(), 2 * 3 * 4 * 2);
    for r in &rows {
        for m in [r.short, r.long] {
            assert!(m.rel_l2.is_finite() && m.rel_l2 > 0.0, "{r:?}");
            assert!(m.cosine > 0.0 && m.cosine <= 1.0 + 1e-12, "{r:?}");
            assert!(m.kl > 0.0, "{r:?}");
        }
        match r.append {
            // Exact appends store the prefill's rows: nothing accumulates.
            AppendChoice::Exact => assert_eq!(r.short, r.long, "{r:?}"),
            AppendChoice::SlicedRms => assert_ne!(r.short, r.long, "{r:?}"),
        }
    }
    // A report row is what evaluate gives for its configuration.
    let row = rows
        .iter()
        .find(|r| {
            r.groups == 4
                && r.transform == TransformKind::Pca
                && r.policy == MuPolicy::Kl
                && r.append == AppendChoice::SlicedRms
        })
        .unwrap();
    let t = build_transform(&s, TransformKind::Pca, SliceLayout::Contiguous, 4).unwrap();
    let p = Prepared::new(&s, t).unwrap();
    assert_eq!(p.mus(&s, 4, MuPolicy::Kl).unwrap(), row.mus);
    let m = evaluate(&s, &p, &row.mus, AppendChoice::SlicedRms, 300).unwrap();
    assert_eq!(m, row.long);
    // Contiguous PCA slices with mu = 1 beat plain slicing on anisotropic latents.
    let err = |t: TransformKind| {
        rows.iter()
            .find(|r| {
                r.groups == 2
                    && r.transform == t
                    && r.policy == MuPolicy::One
                    && r.append == AppendChoice::Exact
            })
            .unwrap()
            .short
            .rel_l2
    };
    assert!(err(TransformKind::Pca) < err(TransformKind::Identity));
    assert!(evaluate(&s, &p, &row.mus, AppendChoice::Exact, 600).is_err());
}

fn tpla(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tpla"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tpla {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn command_line_converts_fits_and_reports_on_a_checkpoint() {
    let dir = setup(2);
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (model, cal, out) = (p(""), p("cal.bin"), p("out"));
    let text = tpla(&[
        "convert",
        "--model",
        &model,
        "--groups",
        "2",
        "--ranks",
        "4",
        "--transform",
        "pca",
        "--mu",
        "kl",
        "--calibration",
        &cal,
        "--out",
        &out,
    ]);
    assert!(text.contains("layer 1: mu ["), "{text}");
    for r in 0..4 {
        let f = weights_file::read(dir.path().join("out").join(rank_file_name(r, 4))).unwrap();
        assert_eq!((f.plan.rank, f.plan.groups, f.layers.len()), (r, 2, 2));
    }
    let fit = tpla(&[
        "calibrate",
        "fit",
        "--calibration",
        &cal,
        "--model",
        &model,
        "--groups",
        "2",
        "--json",
    ]);
    let lines: Vec<serde_json::Value> = fit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    // The fit prints the mu the converted files hold.
    let converted = weights_file::read(dir.path().join("out").join(rank_file_name(2, 4))).unwrap();
    assert_eq!(lines[1]["mu"][1].as_f64().unwrap(), converted.layers[1].mu);
    let report = tpla(&[
        "fidelity",
        "--model",
        &model,
        "--calibration",
        &cal,
        "--layers",
        "1",
        "--groups",
        "2",
        "--short",
        "2",
        "--long",
        "100",
        "--json",
    ]);
    let rows: Vec<serde_json::Value> = report
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3 * 4 * 2);
    assert!(rows
        .iter()
        .all(|r| r["long"]["rel_l2"].as_f64().unwrap() > 0.0));
    // Bad input is an error with a message, not a panic.
    let bad = Command::new(env!("CARGO_BIN_EXE_tpla"))
        .args([
            "convert",
            "--model",
            &model,
            "--groups",
            "2",
            "--transform",
            "pca",
            "--mu",
            "kl",
            "--out",
            &out,
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("PCA transform needs calibration latents"),
        "{err}"
    );
}

#[test]
fn converted_weights_and_exported_shards_follow_one_hadamard_rule() {
    // Two layers: layer 1's seed is where the tools used to disagree (issue 17).
    let d = ModelDims::preset("deepseek-v2-lite").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    std::fs::create_dir(&ckpt).unwrap();
    write_checkpoint(
        &ckpt,
        &synthetic_layers(&d, 2, 3).unwrap(),
        Encoding::Bf16,
        false,
    );
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    tpla(&[
        "convert",
        "--model",
        &p("ckpt"),
        "--groups",
        "2",
        "--transform",
        "hadamard",
        "--mu",
        "one",
        "--out",
        &p("weights"),
    ]);
    tpla(&[
        "shard",
        "export",
        "--out",
        &p("shards"),
        "--preset",
        "deepseek-v2-lite",
        "--layers",
        "2",
        "--sequences",
        "0:20",
        "--transform",
        "hadamard",
    ]);
    for r in 0..2 {
        let weights = dir.path().join("weights").join(rank_file_name(r, 2));
        let ctx = RankContext::from_weights_file(weights, Box::new(Reference)).unwrap();
        let ids = ctx.transform_ids().unwrap();
        let spec = ShardSpec::new(*ctx.dims(), ctx.plan(), DType::Bf16, 64, ids).unwrap();
        let mut cache = RankCache::new(spec, 1).unwrap();
        let shard = dir.path().join(format!("shards/prefill.rank{r}-of-2.tpla"));
        assert_eq!(cache.register_file(&shard).unwrap(), [0]);
    }
}
