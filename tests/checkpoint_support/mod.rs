//! Writes Hugging Face style MLA checkpoints for the tests, independently of the reader:
//! real tensor names, HF `Linear` layouts, safetensors files, an index over shards.

#![allow(dead_code)]

use float8::F8E4M3;
use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use tpla::convert::MlaWeights;
use tpla::synthetic::SyntheticLayer;
use tpla::ModelDims;

/// How the weight matrices are stored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Encoding {
    F32,
    Bf16,
    F16,
    /// FP8 e4m3 with per-block f32 `weight_scale_inv` of the given block shape.
    Fp8 {
        block: [usize; 2],
    },
}

/// A stored tensor: dtype, shape, bytes.
pub struct Stored {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// Encodes `values` (`[rows][cols]` or 1-D) and returns what was stored plus the values
/// a correct reader dequantises, and the FP8 scales tensor if any.
pub fn encode(
    values: &[f64],
    shape: &[usize],
    enc: Encoding,
) -> (Stored, Vec<f64>, Option<Stored>) {
    let plain = |dtype, size, f: &dyn Fn(f64) -> (Vec<u8>, f64)| {
        let mut bytes = Vec::with_capacity(values.len() * size);
        let mut back = Vec::with_capacity(values.len());
        for &v in values {
            let (b, r) = f(v);
            bytes.extend(b);
            back.push(r);
        }
        (
            Stored {
                dtype,
                shape: shape.to_vec(),
                bytes,
            },
            back,
            None,
        )
    };
    match enc {
        Encoding::F32 => plain(Dtype::F32, 4, &|v| {
            ((v as f32).to_le_bytes().to_vec(), v as f32 as f64)
        }),
        Encoding::Bf16 => plain(Dtype::BF16, 2, &|v| {
            let x = bf16::from_f64(v);
            (x.to_le_bytes().to_vec(), x.to_f64())
        }),
        Encoding::F16 => plain(Dtype::F16, 2, &|v| {
            let x = f16::from_f64(v);
            (x.to_le_bytes().to_vec(), x.to_f64())
        }),
        Encoding::Fp8 { block: [b0, b1] } => {
            let (rows, cols) = (shape[0], shape[1]);
            let (sr, sc) = (rows.div_ceil(b0), cols.div_ceil(b1));
            // scale = max |w| / 448 per block (448 is e4m3's largest finite value)
            let mut scales = vec![0f32; sr * sc];
            for r in 0..rows {
                for c in 0..cols {
                    let s = &mut scales[(r / b0) * sc + c / b1];
                    *s = s.max((values[r * cols + c].abs() / 448.0) as f32);
                }
            }
            let mut bytes = Vec::with_capacity(rows * cols);
            let mut back = Vec::with_capacity(rows * cols);
            for r in 0..rows {
                for c in 0..cols {
                    let s = scales[(r / b0) * sc + c / b1];
                    let q = F8E4M3::from_f64(values[r * cols + c] / s as f64);
                    bytes.push(q.to_bits());
                    back.push(q.to_f64() * s as f64);
                }
            }
            let scale_bytes = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
            (
                Stored {
                    dtype: Dtype::F8_E4M3,
                    shape: shape.to_vec(),
                    bytes,
                },
                back,
                Some(Stored {
                    dtype: Dtype::F32,
                    shape: vec![sr, sc],
                    bytes: scale_bytes,
                }),
            )
        }
    }
}

/// `kv_b_proj.weight` `[heads * (d_n + d_v)][d_c]` of a layer: per head `d_n` no-RoPE key
/// rows then `d_v` value rows, as DeepSeek's modelling code splits the projection.
pub fn kv_b_proj(w: &MlaWeights) -> Vec<f64> {
    let d = &w.dims;
    let mut out = Vec::with_capacity(d.heads * (d.d_n + d.d_v) * d.d_c);
    for h in 0..d.heads {
        for j in 0..d.d_n {
            out.extend((0..d.d_c).map(|c| w.w_uk[(h * d.d_c + c) * d.d_n + j]));
        }
        for j in 0..d.d_v {
            out.extend((0..d.d_c).map(|c| w.w_uv[(h * d.d_c + c) * d.d_v + j]));
        }
    }
    out
}

/// Inverse of [`kv_b_proj`].
pub fn split_kv_b_proj(dims: ModelDims, rows: &[f64], gamma: Vec<f64>) -> MlaWeights {
    let d = dims;
    let mut w_uk = vec![0.0; d.heads * d.d_c * d.d_n];
    let mut w_uv = vec![0.0; d.heads * d.d_c * d.d_v];
    for h in 0..d.heads {
        for j in 0..d.d_n + d.d_v {
            let row = &rows[(h * (d.d_n + d.d_v) + j) * d.d_c..][..d.d_c];
            for c in 0..d.d_c {
                if j < d.d_n {
                    w_uk[(h * d.d_c + c) * d.d_n + j] = row[c];
                } else {
                    w_uv[(h * d.d_c + c) * d.d_v + j - d.d_n] = row[c];
                }
            }
        }
    }
    MlaWeights::new(d, w_uk, w_uv, gamma).unwrap()
}

/// `kv_a_proj_with_mqa.weight` `[d_c + d_r][hidden]` of a synthetic layer.
pub fn kv_a_proj(layer: &SyntheticLayer) -> Vec<f64> {
    let d = &layer.dims;
    let hid = layer.hidden;
    let mut out = Vec::with_capacity((d.d_c + d.d_r) * hid);
    for i in 0..d.d_c {
        out.extend((0..hid).map(|x| layer.w_dkv[x * d.d_c + i]));
    }
    for k in 0..d.d_r {
        out.extend((0..hid).map(|x| layer.w_kr[x * d.d_r + k]));
    }
    out
}

/// A DeepSeek-style config.json for `dims` (yarn factor 40, mscale_all_dim 0.707 as
/// DeepSeek-V2-Lite) with `layers` layers and hidden size `hidden`.
pub fn config(dims: &ModelDims, layers: usize, hidden: usize, enc: Encoding) -> Value {
    let mut c = json!({
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "hidden_size": hidden,
        "num_attention_heads": dims.heads,
        "num_key_value_heads": dims.heads,
        "num_hidden_layers": layers,
        "kv_lora_rank": dims.d_c,
        "q_lora_rank": null,
        "qk_nope_head_dim": dims.d_n,
        "qk_rope_head_dim": dims.d_r,
        "v_head_dim": dims.d_v,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000,
        "rope_scaling": {
            "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
            "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"
        },
        "torch_dtype": "bfloat16"
    });
    if let Encoding::Fp8 { block } = enc {
        c["quantization_config"] = json!({
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "weight_block_size": block
        });
    }
    c
}

/// The tensors of one layer, named as in the checkpoint, and the weights a correct
/// reader returns for it.
pub fn layer_tensors(
    index: usize,
    layer: &SyntheticLayer,
    enc: Encoding,
) -> (Vec<(String, Stored)>, MlaWeights) {
    let d = layer.dims;
    let prefix = format!("model.layers.{index}.self_attn");
    let mut tensors = Vec::new();
    let mut matrix = |name: &str, values: &[f64], shape: [usize; 2]| {
        let (stored, back, scales) = encode(values, &shape, enc);
        tensors.push((format!("{prefix}.{name}.weight"), stored));
        if let Some(s) = scales {
            tensors.push((format!("{prefix}.{name}.weight_scale_inv"), s));
        }
        back
    };
    let kv_b = matrix(
        "kv_b_proj",
        &kv_b_proj(&layer.weights),
        [d.heads * (d.d_n + d.d_v), d.d_c],
    );
    matrix(
        "kv_a_proj_with_mqa",
        &kv_a_proj(layer),
        [d.d_c + d.d_r, layer.hidden],
    );
    // Norm weights stay bf16 in FP8 checkpoints, as in DeepSeek-V3.
    let norm_enc = match enc {
        Encoding::Fp8 { .. } => Encoding::Bf16,
        e => e,
    };
    let (stored, gamma, _) = encode(&layer.weights.gamma, &[d.d_c], norm_enc);
    tensors.push((format!("{prefix}.kv_a_layernorm.weight"), stored));
    (tensors, split_kv_b_proj(d, &kv_b, gamma))
}

/// Writes one safetensors file.
pub fn write_safetensors(path: &Path, tensors: &[(String, Stored)]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, s)| {
            (
                n.clone(),
                TensorView::new(s.dtype, s.shape.clone(), &s.bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Writes a checkpoint of `layers` into `dir`: config.json, and with `sharded` one
/// safetensors file per layer (plus one with an unrelated tensor) and an index, else a
/// single model.safetensors. Returns the weights a correct reader returns, per layer.
pub fn write_checkpoint(
    dir: &Path,
    layers: &[SyntheticLayer],
    enc: Encoding,
    sharded: bool,
) -> Vec<MlaWeights> {
    let d = layers[0].dims;
    let cfg = config(&d, layers.len(), layers[0].hidden, enc);
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    let mut expected = Vec::new();
    let mut files: Vec<Vec<(String, Stored)>> = Vec::new();
    let (embed, _, _) = encode(&[0.5; 64], &[4, 16], Encoding::Bf16);
    files.push(vec![("model.embed_tokens.weight".to_string(), embed)]);
    // The dims a reader derives from the config (its softmax scale included).
    let dims = tpla::checkpoint::CheckpointConfig::parse(&cfg.to_string())
        .unwrap()
        .dims;
    for (i, layer) in layers.iter().enumerate() {
        let (tensors, w) = layer_tensors(i, layer, enc);
        expected.push(MlaWeights::new(dims, w.w_uk, w.w_uv, w.gamma).unwrap());
        if sharded {
            files.push(tensors);
        } else {
            files[0].extend(tensors);
        }
    }
    if sharded {
        let n = files.len();
        let mut map = BTreeMap::new();
        for (k, tensors) in files.iter().enumerate() {
            let name = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
            write_safetensors(&dir.join(&name), tensors);
            for (t, _) in tensors {
                map.insert(t.clone(), name.clone());
            }
        }
        let index = json!({"metadata": {"total_size": 0}, "weight_map": map});
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index).unwrap(),
        )
        .unwrap();
    } else {
        write_safetensors(&dir.join("model.safetensors"), &files[0]);
    }
    expected
}

/// Edits config.json in `dir`.
pub fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
}
