//! Checkpoint reading and conversion end to end: synthetic Hugging Face checkpoints in
//! every supported dtype -> per-rank weights files -> decode contexts, against exact MLA
//! on the stored weights.

mod checkpoint_support;

use checkpoint_support::{edit_config, write_checkpoint, Encoding};
use serde_json::json;
use tpla::attention::reference::{self, rel_l2, rotated_latents, slice_rows, Reference};
use tpla::cache::{RankCache, ShardSpec};
use tpla::calibration::{
    synthetic_layers, write_synthetic, CalibrationFile, FitOptions, SyntheticCalibration,
};
use tpla::checkpoint::{convert, rank_file_name, Checkpoint, CheckpointConfig, ConvertOptions};
use tpla::decode::{Outputs, Queries, RankContext};
use tpla::transform::{MuPolicy, SliceLayout, TransformKind};
use tpla::weights_file;
use tpla::{DType, ErrorKind, ModelDims};

fn lite() -> ModelDims {
    ModelDims::preset("deepseek-v2-lite").unwrap()
}

fn fit(transform: TransformKind, groups: usize, policy: MuPolicy) -> FitOptions {
    FitOptions {
        transform,
        layout: SliceLayout::Contiguous,
        groups,
        policy,
        hadamard_seed: 99,
    }
}

#[test]
fn configs_of_published_models_give_their_dims_and_softmax_scale() {
    // The attention fields of DeepSeek-V3's and Kimi-K2's config.json.
    let v3 = json!({
        "hidden_size": 7168, "num_attention_heads": 128, "num_hidden_layers": 61,
        "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
            "quant_method": "fp8", "weight_block_size": [128, 128]}
    });
    let c = CheckpointConfig::parse(&v3.to_string()).unwrap();
    assert_eq!(c.dims, ModelDims::preset("deepseek-v3").unwrap());
    assert_eq!((c.layers, c.hidden, c.fp8_block), (61, 7168, [128, 128]));
    let mut kimi = v3.clone();
    kimi["num_attention_heads"] = json!(64);
    kimi["rope_scaling"]["factor"] = json!(32.0);
    let c = CheckpointConfig::parse(&kimi.to_string()).unwrap();
    assert_eq!(c.dims, ModelDims::preset("kimi-k2").unwrap());
    // No rope_scaling, or no mscale_all_dim: the plain 1/sqrt(d_n + d_r).
    let mut plain = v3.clone();
    plain["rope_scaling"] = json!(null);
    let c = CheckpointConfig::parse(&plain.to_string()).unwrap();
    assert_eq!(c.dims.softmax_scale, 1.0 / 192f64.sqrt());
    plain["rope_scaling"] = json!({"type": "linear", "factor": 4.0});
    let c = CheckpointConfig::parse(&plain.to_string()).unwrap();
    assert_eq!(c.dims.softmax_scale, 1.0 / 192f64.sqrt());
}

#[test]
fn malformed_configs_name_the_field() {
    let good = checkpoint_support::config(&lite(), 2, 640, Encoding::Bf16);
    CheckpointConfig::parse(&good.to_string()).unwrap();
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("kv_lora_rank");
            }),
            "'kv_lora_rank' is missing",
        ),
        (
            Box::new(|c| c["v_head_dim"] = json!(0)),
            "'v_head_dim' must be a positive integer",
        ),
        (
            Box::new(|c| c["num_attention_heads"] = json!("16")),
            "'num_attention_heads' must be a positive integer",
        ),
        (
            Box::new(|c| c["qk_rope_head_dim"] = json!(63)),
            "'qk_rope_head_dim' must be even",
        ),
        (
            Box::new(|c| {
                c["rope_scaling"].as_object_mut().unwrap().remove("factor");
            }),
            "'rope_scaling.factor' is missing",
        ),
        (
            Box::new(|c| c["rope_scaling"]["factor"] = json!(-2)),
            "'rope_scaling.factor' must be positive",
        ),
        (
            Box::new(|c| c["rope_scaling"]["mscale_all_dim"] = json!("x")),
            "'rope_scaling.mscale_all_dim' must be a finite number",
        ),
        (
            Box::new(|c| c["rope_scaling"] = json!(3)),
            "'rope_scaling' must be an object or null",
        ),
        (
            Box::new(|c| c["rms_norm_eps"] = json!(1e-5)),
            "'rms_norm_eps' is 0.00001",
        ),
        (
            Box::new(|c| c["quantization_config"] = json!({"weight_block_size": [128]})),
            "'quantization_config.weight_block_size' must be two positive integers",
        ),
        (
            Box::new(|c| c["kv_lora_rank"] = json!(1 << 20)),
            "larger than the supported maximum",
        ),
        (
            Box::new(|c| *c = json!([1, 2])),
            "top level must be an object",
        ),
    ];
    for (i, (edit, want)) in cases.iter().enumerate() {
        let mut c = good.clone();
        edit(&mut c);
        let e = CheckpointConfig::parse(&c.to_string()).unwrap_err();
        assert!(e.message().contains(want), "case {i}: {e}");
        assert!(e.message().starts_with("config.json"), "case {i}: {e}");
    }
    let e = CheckpointConfig::parse("{not json").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::CorruptFile);
}

#[test]
fn every_dtype_reads_back_the_stored_weights() {
    // DeepSeek-V2-Lite geometry in bf16 over shards; smaller layers for the other dtypes,
    // FP8 with blocks that do not divide the matrices.
    let small = ModelDims::new(2, 160, 16, 48, 40, 0.1).unwrap();
    for (dims, enc, sharded) in [
        (lite(), Encoding::Bf16, true),
        (small, Encoding::F32, false),
        (small, Encoding::F16, true),
        (small, Encoding::Fp8 { block: [64, 32] }, true),
        (small, Encoding::Fp8 { block: [128, 128] }, false),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let layers = synthetic_layers(&dims, 2, 5).unwrap();
        let expected = write_checkpoint(dir.path(), &layers, enc, sharded);
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ckpt.config().layers, 2);
        for (l, want) in expected.iter().enumerate() {
            let got = ckpt.mla_weights(l).unwrap();
            assert_eq!(got.dims.heads, dims.heads);
            assert!(got == *want, "{enc:?} layer {l}: weights differ");
            // Quantisation keeps the weights close to the originals.
            let err = rel_l2(&got.w_uk, &layers[l].weights.w_uk);
            let tol = if matches!(enc, Encoding::Fp8 { .. }) {
                0.05
            } else {
                5e-3
            };
            assert!(err < tol, "{enc:?}: quantisation error {err}");
            let down = ckpt.down_projection(l).unwrap();
            let want = checkpoint_support::encode(
                &checkpoint_support::kv_a_proj(&layers[l]),
                &[dims.d_c + dims.d_r, layers[l].hidden],
                enc,
            )
            .1;
            assert!(down.weight == want, "{enc:?}: kv_a_proj differs");
        }
        let e = ckpt.mla_weights(2).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfRange);
    }
}

/// The decode of `seq` on every rank file in `dir`, combined, vs MLA on `weights`.
fn decode_error_vs_mla(
    dir: &std::path::Path,
    ranks: usize,
    layer_index: usize,
    weights: &tpla::convert::MlaWeights,
    layer: &tpla::synthetic::SyntheticLayer,
) -> f64 {
    let d = weights.dims;
    let seq = layer.sequence(300, 7);
    let t = 299;
    let q = layer.query_at(&seq, t);
    let want = reference::mla_decode(
        weights,
        &seq.tokens.latents,
        &seq.tokens.k_rope,
        &q.q_nope,
        &q.q_rope,
    );
    let mut sum = vec![0.0f64; d.heads * d.d_v];
    for r in 0..ranks {
        let path = dir.join(rank_file_name(r, ranks));
        let mut ctx = RankContext::from_weights_file(&path, Box::new(Reference)).unwrap();
        let plan = *ctx.plan();
        let spec = ShardSpec::new(d, &plan, DType::F32, 16, ctx.transform_ids().unwrap()).unwrap();
        let mut cache = RankCache::new(spec, 64).unwrap();
        cache.add_sequence(0).unwrap();
        // Prefill rows written directly, the last 5 tokens appended through the context.
        let prefix = seq.tokens.prefix(295);
        for l in 0..ctx.layer_count() {
            let u_l = ctx.layer(l).unwrap().transform.clone();
            let rows = slice_rows(
                &rotated_latents(&prefix.latents, &u_l),
                &prefix.k_rope,
                &plan,
                d.d_c,
            );
            cache.append_rows(0, l, &rows).unwrap();
        }
        for t in 295..300 {
            let a: Vec<f32> = seq.tokens.latent(t).iter().map(|&v| v as f32).collect();
            let kr: Vec<f32> = seq.tokens.key_rope(t).iter().map(|&v| v as f32).collect();
            for l in 0..ctx.layer_count() {
                ctx.append_token(&mut cache, 0, l, &a, &kr, true).unwrap();
            }
        }
        let heads = |v: &[f64]| -> Vec<f32> {
            v[plan.head_start * v.len() / d.heads
                ..(plan.head_start + plan.heads) * v.len() / d.heads]
                .iter()
                .map(|&x| x as f32)
                .collect()
        };
        let (qn, qr) = (heads(&q.q_nope), heads(&q.q_rope));
        let mut out = vec![f32::NAN; plan.heads * d.d_v];
        ctx.decode(
            &cache,
            layer_index,
            &[0],
            Queries::Nope {
                q_nope: &qn,
                q_rope: &qr,
            },
            Outputs::Heads(&mut out),
        )
        .unwrap();
        for (s, o) in sum[plan.head_start * d.d_v..].iter_mut().zip(&out) {
            *s += *o as f64;
        }
    }
    rel_l2(&sum, &want.out)
}

#[test]
fn conversion_at_one_group_decodes_exactly_like_mla_on_the_stored_weights() {
    let d = lite();
    let ckpt_dir = tempfile::tempdir().unwrap();
    let layers = synthetic_layers(&d, 2, 11).unwrap();
    let stored = write_checkpoint(ckpt_dir.path(), &layers, Encoding::Bf16, true);
    let ckpt = Checkpoint::open(ckpt_dir.path()).unwrap();
    let cal_path = ckpt_dir.path().join("cal.bin");
    let spec = SyntheticCalibration {
        tokens: 600,
        window: 200,
        queries: 1,
        seed: 3,
    };
    write_synthetic(&cal_path, &layers, &spec).unwrap();
    let cal = CalibrationFile::open(&cal_path).unwrap();
    for (transform, policy, ranks) in [
        (TransformKind::Identity, MuPolicy::One, 1),
        (TransformKind::Hadamard, MuPolicy::Groups, 1),
        (TransformKind::Pca, MuPolicy::Variance, 1),
        // one latent group, heads split over two ranks: still exact
        (TransformKind::Pca, MuPolicy::Kl, 2),
    ] {
        let out = tempfile::tempdir().unwrap();
        let opts = ConvertOptions {
            fit: fit(transform, 1, policy),
            ranks,
        };
        let mut seen = Vec::new();
        let files = convert(&ckpt, Some(&cal), &opts, out.path(), |l, f| {
            assert_eq!(f.mus, vec![1.0], "g = 1 needs no logit scale");
            assert_eq!(f.fractions, vec![1.0]);
            seen.push(l)
        })
        .unwrap();
        assert_eq!(seen, vec![0, 1]);
        assert_eq!(files.len(), ranks);
        for l in 0..2 {
            let err = decode_error_vs_mla(out.path(), ranks, l, &stored[l], &layers[l]);
            // f32 weights and an f32 cache against the f64 oracle
            assert!(
                err < 2e-5,
                "{transform:?} ranks {ranks} layer {l}: rel L2 {err}"
            );
        }
    }
}

#[test]
fn fp8_checkpoint_converts_and_decodes_like_mla_on_the_dequantised_weights() {
    let d = ModelDims::new(4, 128, 16, 32, 32, 0.12).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layers = synthetic_layers(&d, 1, 21).unwrap();
    let stored = write_checkpoint(
        dir.path(),
        &layers,
        Encoding::Fp8 { block: [128, 128] },
        true,
    );
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let opts = ConvertOptions {
        fit: fit(TransformKind::Hadamard, 1, MuPolicy::One),
        ranks: 1,
    };
    convert(&ckpt, None, &opts, out.path(), |_, _| {}).unwrap();
    let err = decode_error_vs_mla(out.path(), 1, 0, &stored[0], &layers[0]);
    assert!(err < 2e-5, "rel L2 {err}");
}

#[test]
fn per_rank_files_differ_only_where_they_must() {
    let d = lite();
    let dir = tempfile::tempdir().unwrap();
    let layers = synthetic_layers(&d, 2, 31).unwrap();
    write_checkpoint(dir.path(), &layers, Encoding::Bf16, false);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let cal_path = dir.path().join("cal.bin");
    let spec = SyntheticCalibration {
        tokens: 600,
        window: 100,
        queries: 1,
        seed: 3,
    };
    write_synthetic(&cal_path, &layers, &spec).unwrap();
    let cal = CalibrationFile::open(&cal_path).unwrap();
    let convert_to = |groups: usize, ranks: usize| {
        let out = tempfile::tempdir().unwrap();
        let opts = ConvertOptions {
            fit: fit(TransformKind::Pca, groups, MuPolicy::Variance),
            ranks,
        };
        convert(&ckpt, Some(&cal), &opts, out.path(), |_, _| {}).unwrap();
        let files: Vec<_> = (0..ranks)
            .map(|r| std::fs::read(out.path().join(rank_file_name(r, ranks))).unwrap())
            .collect();
        files
    };
    let whole = weights_file::parse(&convert_to(1, 1)[0]).unwrap();
    // 4 groups, 2 ranks per group (heads split in halves).
    let images = convert_to(4, 8);
    let parsed: Vec<_> = images
        .iter()
        .map(|i| weights_file::parse(i).unwrap())
        .collect();
    for (r, (image, file)) in images.iter().zip(&parsed).enumerate() {
        // Headers: only the rank field (and the checksums) differ.
        for (k, (a, b)) in image[16..128].iter().zip(&images[0][16..128]).enumerate() {
            let off = k + 16;
            if !(44..48).contains(&off) && !(60..64).contains(&off) {
                assert_eq!(a, b, "rank {r}: header byte {off} differs");
            }
        }
        assert_eq!(file.plan.rank, r);
        assert_eq!(image.len(), images[0].len());
        let p = file.plan;
        for (l, layer) in file.layers.iter().enumerate() {
            let first = &parsed[0].layers[l];
            // Same transform (PCA matrix, fingerprint) for every rank.
            assert!(layer.transform == first.transform, "rank {r} layer {l}");
            // mu and energy fraction belong to the latent group.
            let same_group = &parsed[(r / 2) * 2].layers[l];
            assert_eq!(
                (layer.mu, layer.slice_fraction),
                (same_group.mu, same_group.slice_fraction)
            );
            // Weights are exactly the rank's heads and slice of the g = 1 weights.
            let full = &whole.layers[l];
            let w = p.slice_width;
            for (i, h) in (p.head_start..p.head_start + p.heads).enumerate() {
                for c in 0..w {
                    let src = (h * d.d_c + p.slice_start + c) * d.d_n;
                    let dst = (i * w + c) * d.d_n;
                    assert_eq!(layer.w_uk[dst..dst + d.d_n], full.w_uk[src..src + d.d_n]);
                    let src = (h * d.d_c + p.slice_start + c) * d.d_v;
                    let dst = (i * w + c) * d.d_v;
                    assert_eq!(layer.w_uv[dst..dst + d.d_v], full.w_uv[src..src + d.d_v]);
                }
            }
        }
        // The mu values really differ across groups (variance policy on PCA slices).
        assert_ne!(parsed[0].layers[0].mu, parsed[7].layers[0].mu);
    }
    // The slice fractions of the four groups add up to one.
    let total: f64 = (0..4).map(|g| parsed[2 * g].layers[0].slice_fraction).sum();
    assert!((total - 1.0).abs() < 1e-12, "{total}");
}

#[test]
fn malformed_checkpoints_give_named_errors() {
    let d = ModelDims::new(2, 64, 16, 32, 24, 0.1).unwrap();
    let layers = synthetic_layers(&d, 2, 41).unwrap();
    let fresh = |enc: Encoding, sharded: bool| {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &layers, enc, sharded);
        dir
    };
    let kv_b = "model.layers.1.self_attn.kv_b_proj.weight";
    let norm = "model.layers.1.self_attn.kv_a_layernorm.weight";
    let open_err = |dir: &std::path::Path| Checkpoint::open(dir).unwrap_err();
    let layer1_err =
        |dir: &std::path::Path| Checkpoint::open(dir).unwrap().mla_weights(1).unwrap_err();
    let shard = |dir: &std::path::Path| dir.join("model-00003-of-00003.safetensors");

    // A tensor missing from the file (and from the index).
    let dir = fresh(Encoding::Bf16, true);
    let (mut tensors, _) = checkpoint_support::layer_tensors(1, &layers[1], Encoding::Bf16);
    tensors.retain(|(n, _)| n != norm);
    checkpoint_support::write_safetensors(&shard(dir.path()), &tensors);
    let e = layer1_err(dir.path());
    assert!(
        e.message().contains(norm) && e.message().contains("does not hold it"),
        "{e}"
    );
    let index = dir.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index)
        .unwrap()
        .replace(&format!("\"{norm}\""), "\"x\"");
    std::fs::write(&index, text).unwrap();
    let e = layer1_err(dir.path());
    assert!(e.message().contains(&format!("no tensor '{norm}'")), "{e}");
    Checkpoint::open(dir.path())
        .unwrap()
        .mla_weights(0)
        .unwrap();

    // Wrong shape: a config that disagrees with the tensors.
    let dir = fresh(Encoding::Bf16, false);
    edit_config(dir.path(), |c| c["v_head_dim"] = json!(16));
    let e = Checkpoint::open(dir.path())
        .unwrap()
        .mla_weights(0)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Mismatch);
    assert!(
        e.message()
            .contains("kv_b_proj.weight' has shape [112, 64], expected [96, 64]"),
        "{e}"
    );

    // Unsupported dtype.
    let dir = fresh(Encoding::Bf16, true);
    let (mut tensors, _) = checkpoint_support::layer_tensors(1, &layers[1], Encoding::Bf16);
    for (n, s) in tensors.iter_mut() {
        if n == kv_b {
            s.dtype = safetensors::Dtype::I16;
        }
    }
    checkpoint_support::write_safetensors(&shard(dir.path()), &tensors);
    let e = layer1_err(dir.path());
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(
        e.message().contains(kv_b) && e.message().contains("I16"),
        "{e}"
    );

    // Non-finite weights.
    let dir = fresh(Encoding::Bf16, true);
    let (mut tensors, _) = checkpoint_support::layer_tensors(1, &layers[1], Encoding::Bf16);
    for (n, s) in tensors.iter_mut() {
        if n == norm {
            s.bytes[6..8].copy_from_slice(&half::bf16::NAN.to_le_bytes());
        }
    }
    checkpoint_support::write_safetensors(&shard(dir.path()), &tensors);
    let e = layer1_err(dir.path());
    assert!(
        e.message().contains(norm) && e.message().contains("non-finite value at element 3"),
        "{e}"
    );

    // FP8 without its scales, and with scales of the wrong shape.
    let fp8 = Encoding::Fp8 { block: [128, 128] };
    let dir = fresh(fp8, true);
    let (mut tensors, _) = checkpoint_support::layer_tensors(1, &layers[1], fp8);
    tensors.retain(|(n, _)| !n.ends_with("kv_b_proj.weight_scale_inv"));
    checkpoint_support::write_safetensors(&shard(dir.path()), &tensors);
    let e = layer1_err(dir.path());
    assert!(e.message().contains(&format!("'{kv_b}_scale_inv'")), "{e}");
    let index = dir.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index)
        .unwrap()
        .replace(&format!("\"{kv_b}_scale_inv\""), "\"x\"");
    std::fs::write(&index, text).unwrap();
    let e = layer1_err(dir.path());
    assert!(
        e.message()
            .contains(&format!("no scale tensor '{kv_b}_scale_inv'")),
        "{e}"
    );
    let dir = fresh(fp8, false);
    edit_config(dir.path(), |c| {
        c["quantization_config"]["weight_block_size"] = json!([32, 32])
    });
    let e = Checkpoint::open(dir.path())
        .unwrap()
        .mla_weights(0)
        .unwrap_err();
    assert!(
        e.message()
            .contains("weight_scale_inv' has shape [1, 1], expected [4, 2]"),
        "{e}"
    );

    // Empty FP8 matrices read as empty (no block arithmetic on zero widths).
    let dir = fresh(fp8, false);
    let empty = |dtype, shape: Vec<usize>| checkpoint_support::Stored {
        dtype,
        shape,
        bytes: Vec::new(),
    };
    checkpoint_support::write_safetensors(
        &dir.path().join("model.safetensors"),
        &[
            (
                "e.weight".to_string(),
                empty(safetensors::Dtype::F8_E4M3, vec![0, 4]),
            ),
            (
                "e.weight_scale_inv".to_string(),
                empty(safetensors::Dtype::F32, vec![0, 1]),
            ),
        ],
    );
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(
        ckpt.tensor("e.weight", &[0, 4], "empty").unwrap(),
        Vec::<f64>::new()
    );

    // Index naming a missing file, or a path outside the directory.
    let dir = fresh(Encoding::Bf16, true);
    std::fs::remove_file(shard(dir.path())).unwrap();
    let e = layer1_err(dir.path());
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(
        e.message().contains("model-00003-of-00003.safetensors"),
        "{e}"
    );
    let text = std::fs::read_to_string(dir.path().join("model.safetensors.index.json")).unwrap();
    let evil = text.replacen(
        "model-00002-of-00003.safetensors",
        "../model-00002-of-00003.safetensors",
        1,
    );
    std::fs::write(dir.path().join("model.safetensors.index.json"), evil).unwrap();
    assert!(open_err(dir.path())
        .message()
        .contains("not a plain file name"));
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        "{\"metadata\": {}}",
    )
    .unwrap();
    assert!(open_err(dir.path()).message().contains("'weight_map'"));

    // Truncated or garbage safetensors files.
    let dir = fresh(Encoding::Bf16, true);
    let bytes = std::fs::read(shard(dir.path())).unwrap();
    for cut in [0, 7, 8, 100, bytes.len() - 1] {
        std::fs::write(shard(dir.path()), &bytes[..cut]).unwrap();
        let e = layer1_err(dir.path());
        assert_eq!(e.kind(), ErrorKind::CorruptFile, "cut {cut}: {e}");
        assert!(e.message().contains("not a valid safetensors file"), "{e}");
    }

    // No checkpoint at all; a missing config.
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(open_err(empty.path()).kind(), ErrorKind::Io);
    std::fs::write(
        empty.path().join("config.json"),
        checkpoint_support::config(&d, 2, 640, Encoding::Bf16).to_string(),
    )
    .unwrap();
    assert!(open_err(empty.path()).message().contains("holds neither"));
}

#[test]
fn converted_weights_files_reject_every_corruption() {
    let d = ModelDims::new(2, 32, 8, 8, 8, 0.2).unwrap();
    let layers = synthetic_layers(&d, 2, 51).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &layers, Encoding::F32, false);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let cal_path = dir.path().join("cal.bin");
    let spec = SyntheticCalibration {
        tokens: 200,
        window: 50,
        queries: 1,
        seed: 3,
    };
    write_synthetic(&cal_path, &layers, &spec).unwrap();
    let cal = CalibrationFile::open(&cal_path).unwrap();
    for transform in [TransformKind::Pca, TransformKind::Hadamard] {
        let out = tempfile::tempdir().unwrap();
        let opts = ConvertOptions {
            fit: fit(transform, 2, MuPolicy::Kl),
            ranks: 2,
        };
        convert(&ckpt, Some(&cal), &opts, out.path(), |_, _| {}).unwrap();
        let image = std::fs::read(out.path().join(rank_file_name(1, 2))).unwrap();
        let good = weights_file::parse(&image).unwrap();
        assert_eq!((good.plan.rank, good.layers.len()), (1, 2));
        for pos in 0..image.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = image.clone();
                bad[pos] ^= bit;
                let e = weights_file::parse(&bad);
                assert!(
                    e.is_err(),
                    "{transform:?}: flipping bit {bit:#x} of byte {pos} was not noticed"
                );
            }
        }
        for cut in (0..image.len()).step_by(7).chain([image.len() - 1]) {
            assert!(weights_file::parse(&image[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = image.clone();
        longer.extend([0; 8]);
        assert!(weights_file::parse(&longer).is_err());
        let mut v2 = image.clone();
        v2[8] = 2;
        assert_eq!(
            weights_file::parse(&v2).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
    }
}

#[test]
fn conversion_refuses_missing_calibration_and_mismatched_files() {
    let d = ModelDims::new(2, 32, 8, 8, 8, 0.2).unwrap();
    let layers = synthetic_layers(&d, 2, 61).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &layers, Encoding::F32, false);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let out = tempfile::tempdir().unwrap();
    for (transform, policy, want) in [
        (
            TransformKind::Pca,
            MuPolicy::One,
            "PCA transform needs calibration latents",
        ),
        (
            TransformKind::Hadamard,
            MuPolicy::Variance,
            "variance mu policy needs calibration latents",
        ),
        (
            TransformKind::Identity,
            MuPolicy::Kl,
            "needs calibration latents",
        ),
    ] {
        let opts = ConvertOptions {
            fit: fit(transform, 2, policy),
            ranks: 2,
        };
        let e = convert(&ckpt, None, &opts, out.path(), |_, _| {}).unwrap_err();
        assert!(
            e.message().contains(want) && e.message().starts_with("layer 0"),
            "{e}"
        );
    }
    // No half-written rank files are left behind.
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
    // A calibration file of another layer count.
    let cal_path = dir.path().join("cal.bin");
    let spec = SyntheticCalibration {
        tokens: 50,
        window: 10,
        queries: 1,
        seed: 3,
    };
    write_synthetic(&cal_path, &layers[..1], &spec).unwrap();
    let cal = CalibrationFile::open(&cal_path).unwrap();
    let opts = ConvertOptions {
        fit: fit(TransformKind::Pca, 2, MuPolicy::Kl),
        ranks: 2,
    };
    let e = convert(&ckpt, Some(&cal), &opts, out.path(), |_, _| {}).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Mismatch);
    // Ranks that do not split into the groups.
    let opts = ConvertOptions {
        fit: fit(TransformKind::Hadamard, 2, MuPolicy::One),
        ranks: 3,
    };
    assert!(convert(&ckpt, None, &opts, out.path(), |_, _| {}).is_err());
}
