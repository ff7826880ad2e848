//! Reading published MLA checkpoints (DeepSeek-V2/V3, Kimi-K2) in the Hugging Face layout:
//! `config.json` for the layer shapes and the softmax scale, and safetensors files
//! (one `model.safetensors`, or shards listed by `model.safetensors.index.json`),
//! memory-mapped and read tensor by tensor.
//!
//! Per layer `i` TPLA needs three tensors of `model.layers.{i}.self_attn.`:
//! - `kv_b_proj.weight`, `[heads * (d_n + d_v)][d_c]` (a `Linear` weight: output rows).
//!   DeepSeek's modelling code views its output as `[heads, d_n + d_v]` and splits it
//!   into the no-RoPE key (first `d_n`) and the value (last `d_v`), so head `h` owns rows
//!   `h*(d_n+d_v) ..`: `d_n` rows of `W_UK,h^T` then `d_v` rows of `W_UV,h^T`;
//! - `kv_a_layernorm.weight`, `[d_c]` (gamma);
//! - `kv_a_proj_with_mqa.weight`, `[d_c + d_r][hidden]`, for calibration: its first
//!   `d_c` rows make the pre-norm latent `a_t`, the last `d_r` rows the RoPE key.
//!
//! Weights may be f32, bf16, f16, or FP8 e4m3 with a `{name}_scale_inv` tensor of
//! per-block scales (DeepSeek-V3): `w[r][c] = fp8[r][c] * scale_inv[r / b0][c / b1]`,
//! blocks `b0 x b1` from `quantization_config.weight_block_size` (128 x 128 if absent).
//! Everything is dequantised to f64 exactly.
//!
//! [`convert`] turns a checkpoint (and optionally a calibration file) into one converted
//! weights file per rank ([`crate::weights_file`]).

use crate::calibration::{fit_layer, CalibrationFile, FitOptions, LayerCalibration, LayerFit};
use crate::convert::MlaWeights;
use crate::decode::RankLayer;
use crate::error::{Error, ErrorKind, Result};
use crate::geometry::{softmax_scale, ModelDims, ShardPlan, YarnScaling};
use crate::weights_file::WeightsFileWriter;
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Epsilon of kv_a_layernorm that the TPLA cache normalisation uses
/// ([`crate::attention::reference::RMS_EPS`]); a config with another one is refused.
const EXPECTED_RMS_EPS: f64 = crate::attention::reference::RMS_EPS;

/// FP8 block size of DeepSeek-V3's checkpoints, used when the config names none.
pub const DEFAULT_FP8_BLOCK: [usize; 2] = [128, 128];

/// What `config.json` says about the attention layers.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointConfig {
    /// Layer shapes and softmax scale (YaRN's mscale included).
    pub dims: ModelDims,
    /// `num_hidden_layers`.
    pub layers: usize,
    /// `hidden_size`, the input width of `kv_a_proj_with_mqa`.
    pub hidden: usize,
    /// `rope_scaling` when present.
    pub yarn: Option<YarnScaling>,
    /// Block shape of FP8 scales, `[rows, cols]`.
    pub fp8_block: [usize; 2],
}

fn config_error(message: impl Into<String>) -> Error {
    Error::corrupt(format!("config.json: {}", message.into()))
}

fn positive_int(obj: &Map<String, Value>, key: &str, path: &str) -> Result<usize> {
    let v = obj
        .get(key)
        .ok_or_else(|| config_error(format!("field '{path}' is missing")))?;
    v.as_u64()
        .filter(|&n| n > 0)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| {
            config_error(format!(
                "field '{path}' must be a positive integer, got {v}"
            ))
        })
}

fn finite_number(v: &Value, path: &str) -> Result<f64> {
    v.as_f64()
        .filter(|x| x.is_finite())
        .ok_or_else(|| config_error(format!("field '{path}' must be a finite number, got {v}")))
}

impl CheckpointConfig {
    /// Parses the text of a `config.json`.
    pub fn parse(text: &str) -> Result<Self> {
        let root: Value =
            serde_json::from_str(text).map_err(|e| config_error(format!("not valid JSON: {e}")))?;
        let obj = root
            .as_object()
            .ok_or_else(|| config_error("the top level must be an object"))?;
        let int = |key: &str| positive_int(obj, key, key);
        let heads = int("num_attention_heads")?;
        let d_c = int("kv_lora_rank")?;
        let d_r = int("qk_rope_head_dim")?;
        let d_n = int("qk_nope_head_dim")?;
        let d_v = int("v_head_dim")?;
        let layers = int("num_hidden_layers")?;
        let hidden = int("hidden_size")?;
        if d_r % 2 != 0 {
            return Err(config_error(format!(
                "field 'qk_rope_head_dim' must be even (RoPE rotates pairs), got {d_r}"
            )));
        }
        if layers > crate::cache::MAX_LAYERS {
            return Err(config_error(format!(
                "field 'num_hidden_layers' is {layers}, more than the supported {}",
                crate::cache::MAX_LAYERS
            )));
        }
        if let Some(eps) = obj.get("rms_norm_eps") {
            let eps = finite_number(eps, "rms_norm_eps")?;
            if (eps - EXPECTED_RMS_EPS).abs() > 1e-12 {
                return Err(Error::unsupported(format!(
                    "config.json: field 'rms_norm_eps' is {eps}; the TPLA cache normalises with \
                     {EXPECTED_RMS_EPS} as DeepSeek-V2/V3 and Kimi-K2 do"
                )));
            }
        }
        let yarn = match obj.get("rope_scaling") {
            None | Some(Value::Null) => None,
            Some(Value::Object(rs)) => {
                let factor = finite_number(
                    rs.get("factor")
                        .ok_or_else(|| config_error("field 'rope_scaling.factor' is missing"))?,
                    "rope_scaling.factor",
                )?;
                if factor <= 0.0 {
                    return Err(config_error(format!(
                        "field 'rope_scaling.factor' must be positive, got {factor}"
                    )));
                }
                // DeepSeek's attention reads mscale_all_dim with a default of 0 (no change).
                let mscale_all_dim = match rs.get("mscale_all_dim") {
                    None | Some(Value::Null) => 0.0,
                    Some(v) => finite_number(v, "rope_scaling.mscale_all_dim")?,
                };
                Some(YarnScaling {
                    factor,
                    mscale_all_dim,
                })
            }
            Some(other) => {
                return Err(config_error(format!(
                    "field 'rope_scaling' must be an object or null, got {other}"
                )))
            }
        };
        let fp8_block = match obj
            .get("quantization_config")
            .and_then(|q| q.get("weight_block_size"))
        {
            None | Some(Value::Null) => DEFAULT_FP8_BLOCK,
            Some(v) => {
                let path = "quantization_config.weight_block_size";
                let bad = || {
                    config_error(format!(
                        "field '{path}' must be two positive integers, got {v}"
                    ))
                };
                let list = v.as_array().filter(|a| a.len() == 2).ok_or_else(bad)?;
                let mut block = [0; 2];
                for (b, x) in block.iter_mut().zip(list) {
                    *b = x
                        .as_u64()
                        .filter(|&n| n > 0)
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or_else(bad)?;
                }
                block
            }
        };
        let scale = softmax_scale(d_n, d_r, yarn);
        let dims = ModelDims::new(heads, d_c, d_r, d_n, d_v, scale)
            .map_err(|e| config_error(e.message().to_string()))?;
        Ok(CheckpointConfig {
            dims,
            layers,
            hidden,
            yarn,
            fp8_block,
        })
    }

    /// Reads `path` (a `config.json`).
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::from(e).context(format!("reading {}", path.display())))?;
        Self::parse(&text)
    }
}

/// One memory-mapped safetensors file with its validated header.
struct Shard {
    map: Mmap,
    /// Offset of the data region (8 + header length).
    data_start: usize,
    metadata: Metadata,
}

impl Shard {
    fn open(path: &Path) -> Result<Self> {
        let at = |e: std::io::Error| Error::from(e).context(format!("opening {}", path.display()));
        let file = crate::files::open_regular(path)
            .map_err(|e| e.context(format!("opening {}", path.display())))?;
        // SAFETY: the map is read-only and private to this process; like every reader of
        // memory-mapped checkpoints, we rely on nobody truncating the file while it is open.
        let map = unsafe { Mmap::map(&file) }.map_err(at)?;
        let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
            Error::corrupt(format!(
                "{} is not a valid safetensors file: {e}",
                path.display()
            ))
        })?;
        Ok(Shard {
            map,
            data_start: 8 + header_len,
            metadata,
        })
    }

    fn bytes(&self, info: &TensorInfo) -> Option<&[u8]> {
        let (start, end) = info.data_offsets;
        self.map
            .get(self.data_start.checked_add(start)?..self.data_start.checked_add(end)?)
    }
}

/// A checkpoint directory: its config and its (lazily mapped) safetensors files.
pub struct Checkpoint {
    dir: PathBuf,
    config: CheckpointConfig,
    files: Vec<String>,
    shards: Vec<OnceLock<std::result::Result<Shard, Error>>>,
    /// Tensor name -> index into `files`.
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("config", &self.config)
            .field("files", &self.files.len())
            .finish()
    }
}

/// Names of the index file and of the single-file checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";

/// A shard name from an index must be a plain file name inside the checkpoint directory.
fn check_file_name(name: &str) -> Result<()> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && !name.contains('\0');
    if plain {
        Ok(())
    } else {
        Err(Error::corrupt(format!(
            "{INDEX_FILE}: weight_map names '{name}', which is not a plain file name in the \
             checkpoint directory"
        )))
    }
}

impl Checkpoint {
    /// Opens the checkpoint in `dir`: parses `config.json` and the index (or the single
    /// file's header). Shards are mapped when a tensor in them is first read.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config = CheckpointConfig::read(&dir.join("config.json"))?;
        let index_path = dir.join(INDEX_FILE);
        let mut files = Vec::new();
        let mut index = HashMap::new();
        let mut shards = Vec::new();
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| Error::from(e).context(format!("reading {}", index_path.display())))?;
            let root: Value = serde_json::from_str(&text)
                .map_err(|e| Error::corrupt(format!("{INDEX_FILE}: not valid JSON: {e}")))?;
            let map = root
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| {
                    Error::corrupt(format!(
                        "{INDEX_FILE}: field 'weight_map' (an object) is missing"
                    ))
                })?;
            let mut file_ids: HashMap<&str, usize> = HashMap::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    Error::corrupt(format!(
                        "{INDEX_FILE}: weight_map entry '{tensor}' must be a file name, got {file}"
                    ))
                })?;
                check_file_name(file)?;
                let next = file_ids.len();
                let id = *file_ids.entry(file).or_insert(next);
                if id == files.len() {
                    files.push(file.to_string());
                    shards.push(OnceLock::new());
                }
                index.insert(tensor.clone(), id);
            }
        } else if dir.join(SINGLE_FILE).exists() {
            let shard = Shard::open(&dir.join(SINGLE_FILE))?;
            for name in shard.metadata.tensors().keys() {
                index.insert(name.clone(), 0);
            }
            files.push(SINGLE_FILE.to_string());
            let cell = OnceLock::new();
            let _ = cell.set(Ok(shard));
            shards.push(cell);
        } else {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "{} holds neither {INDEX_FILE} nor {SINGLE_FILE}",
                    dir.display()
                ),
            ));
        }
        Ok(Checkpoint {
            dir,
            config,
            files,
            shards,
            index,
        })
    }

    pub fn config(&self) -> &CheckpointConfig {
        &self.config
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn shard(&self, id: usize) -> Result<&Shard> {
        self.shards[id]
            .get_or_init(|| Shard::open(&self.dir.join(&self.files[id])))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Where tensor `name` lives: its header entry and its bytes.
    fn locate(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let &id = self
            .index
            .get(name)
            .ok_or_else(|| Error::corrupt(format!("the checkpoint has no tensor '{name}'")))?;
        let shard = self.shard(id)?;
        let info = shard.metadata.info(name).ok_or_else(|| {
            Error::corrupt(format!(
                "the index places tensor '{name}' in {}, but that file does not hold it",
                self.files[id]
            ))
        })?;
        let bytes = shard.bytes(info).ok_or_else(|| {
            Error::corrupt(format!("tensor '{name}' lies outside {}", self.files[id]))
        })?;
        Ok((info, bytes))
    }

    /// Tensor `name`, which must have shape `shape`, dequantised to f64 (row-major).
    /// `what` explains the expected shape in errors.
    pub fn tensor(&self, name: &str, shape: &[usize], what: &str) -> Result<Vec<f64>> {
        self.read(name, shape, what, true)
    }

    fn read(&self, name: &str, shape: &[usize], what: &str, allow_fp8: bool) -> Result<Vec<f64>> {
        let (info, bytes) = self.locate(name)?;
        if info.shape != shape {
            return Err(Error::mismatch(format!(
                "tensor '{name}' has shape {:?}, expected {shape:?} ({what})",
                info.shape
            )));
        }
        let values = match info.dtype {
            Dtype::F32 => decode_plain(bytes, 4, |b| {
                f32::from_le_bytes(b.try_into().expect("4")) as f64
            }),
            Dtype::BF16 => decode_plain(bytes, 2, |b| {
                half::bf16::from_le_bytes(b.try_into().expect("2")).to_f64()
            }),
            Dtype::F16 => decode_plain(bytes, 2, |b| {
                half::f16::from_le_bytes(b.try_into().expect("2")).to_f64()
            }),
            Dtype::F8_E4M3 if allow_fp8 => self.dequantise_fp8(name, shape, bytes)?,
            other => {
                let supported = if allow_fp8 {
                    "F32, BF16, F16 and F8_E4M3 with block scales"
                } else {
                    "F32, BF16 and F16 for block scales"
                };
                return Err(Error::unsupported(format!(
                    "tensor '{name}' has dtype {other}; supported are {supported}"
                )));
            }
        };
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::corrupt(format!(
                "tensor '{name}' holds a non-finite value at element {i}"
            )));
        }
        Ok(values)
    }

    /// `fp8 * scale_inv[block]` with the scales of `{name}_scale_inv`.
    fn dequantise_fp8(&self, name: &str, shape: &[usize], bytes: &[u8]) -> Result<Vec<f64>> {
        let &[rows, cols] = shape else {
            return Err(Error::unsupported(format!(
                "tensor '{name}' is FP8 but not a matrix (shape {shape:?}); only block-quantised \
                 matrices are supported"
            )));
        };
        if rows == 0 || cols == 0 {
            return Ok(Vec::new());
        }
        let [b0, b1] = self.config.fp8_block;
        let scale_name = format!("{name}_scale_inv");
        let scale_shape = [rows.div_ceil(b0), cols.div_ceil(b1)];
        let scales = self
            .read(
                &scale_name,
                &scale_shape,
                &format!("the {b0}x{b1} block scales of FP8 tensor '{name}'"),
                false,
            )
            .map_err(|e| {
                if e.message().contains("has no tensor") {
                    Error::corrupt(format!(
                        "tensor '{name}' is FP8 but the checkpoint has no scale tensor \
                         '{scale_name}'"
                    ))
                } else {
                    e
                }
            })?;
        let mut out = Vec::with_capacity(rows * cols);
        for (r, row) in bytes.chunks_exact(cols).enumerate() {
            let block_row = &scales[(r / b0) * scale_shape[1]..(r / b0 + 1) * scale_shape[1]];
            out.extend(
                row.iter()
                    .enumerate()
                    .map(|(c, &b)| float8::F8E4M3::from_bits(b).to_f64() * block_row[c / b1]),
            );
        }
        Ok(out)
    }

    /// The MLA up-projections and norm weight of layer `layer`.
    pub fn mla_weights(&self, layer: usize) -> Result<MlaWeights> {
        let d = self.config.dims;
        self.check_layer(layer)?;
        let prefix = format!("model.layers.{layer}.self_attn");
        let per_head = d.d_n + d.d_v;
        let kv_b = self.tensor(
            &format!("{prefix}.kv_b_proj.weight"),
            &[d.heads * per_head, d.d_c],
            "num_attention_heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank",
        )?;
        let gamma = self.tensor(
            &format!("{prefix}.kv_a_layernorm.weight"),
            &[d.d_c],
            "kv_lora_rank",
        )?;
        let mut w_uk = vec![0.0; d.heads * d.d_c * d.d_n];
        let mut w_uv = vec![0.0; d.heads * d.d_c * d.d_v];
        for (row_index, row) in kv_b.chunks_exact(d.d_c).enumerate() {
            let (h, j) = (row_index / per_head, row_index % per_head);
            let (dst, width, j) = if j < d.d_n {
                (&mut w_uk, d.d_n, j)
            } else {
                (&mut w_uv, d.d_v, j - d.d_n)
            };
            for (c, &v) in row.iter().enumerate() {
                dst[(h * d.d_c + c) * width + j] = v;
            }
        }
        MlaWeights::new(d, w_uk, w_uv, gamma).map_err(|e| e.context(format!("layer {layer}")))
    }

    /// Layer `layer`'s `kv_a_proj_with_mqa`.
    pub fn down_projection(&self, layer: usize) -> Result<DownProjection> {
        let c = &self.config;
        self.check_layer(layer)?;
        let weight = self.tensor(
            &format!("model.layers.{layer}.self_attn.kv_a_proj_with_mqa.weight"),
            &[c.dims.d_c + c.dims.d_r, c.hidden],
            "kv_lora_rank + qk_rope_head_dim, hidden_size",
        )?;
        Ok(DownProjection {
            d_c: c.dims.d_c,
            d_r: c.dims.d_r,
            hidden: c.hidden,
            weight,
        })
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.config.layers {
            return Err(Error::out_of_range(format!(
                "layer {layer} is out of range: the model has {} layers",
                self.config.layers
            )));
        }
        Ok(())
    }
}

/// `kv_a_proj_with_mqa` of one layer: hidden state -> pre-norm latent and RoPE key.
#[derive(Clone, Debug, PartialEq)]
pub struct DownProjection {
    pub d_c: usize,
    pub d_r: usize,
    pub hidden: usize,
    /// `[d_c + d_r][hidden]`, rows as in the checkpoint.
    pub weight: Vec<f64>,
}

fn decode_plain(bytes: &[u8], size: usize, decode: impl Fn(&[u8]) -> f64) -> Vec<f64> {
    bytes.chunks_exact(size).map(decode).collect()
}

/// What `tpla convert` produces.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConvertOptions {
    /// Transform, slice layout, latent groups, mu policy and Hadamard seed.
    pub fit: FitOptions,
    /// Ranks (a multiple of the groups: each group splits its heads over
    /// `ranks / groups` ranks).
    pub ranks: usize,
}

/// File name of rank `rank` of `ranks` in an output directory: `model.rank<r>-of-<k>
/// .weights`, named like the shard files (`prefill.rank<i>-of-<g>.tpla`).
pub fn rank_file_name(rank: usize, ranks: usize) -> String {
    format!("model.rank{rank}-of-{ranks}.weights")
}

/// Converts every layer of `checkpoint` into one weights file per rank in `out_dir`
/// (created if missing), fitting each layer on `calibration` when given. `on_layer` is
/// called after each layer with its index and fit. Returns the files, rank by rank.
pub fn convert(
    checkpoint: &Checkpoint,
    calibration: Option<&CalibrationFile>,
    opts: &ConvertOptions,
    out_dir: &Path,
    mut on_layer: impl FnMut(usize, &LayerFit),
) -> Result<Vec<PathBuf>> {
    let config = checkpoint.config();
    let dims = config.dims;
    if let Some(cal) = calibration {
        let s = cal.shape();
        if !s.matches(&dims) || s.layers != config.layers {
            return Err(Error::mismatch(format!(
                "the calibration file is for {} layers of H={}, d_c={}, d_r={}, d_n={}, \
                 d_v={}; the checkpoint has {} layers of H={}, d_c={}, d_r={}, d_n={}, d_v={}",
                s.layers,
                s.heads,
                s.d_c,
                s.d_r,
                s.d_n,
                s.d_v,
                config.layers,
                dims.heads,
                dims.d_c,
                dims.d_r,
                dims.d_n,
                dims.d_v
            )));
        }
    }
    let plans = (0..opts.ranks)
        .map(|r| ShardPlan::with_head_split(&dims, opts.ranks, opts.fit.groups, r))
        .collect::<Result<Vec<_>>>()?;
    std::fs::create_dir_all(out_dir)
        .map_err(|e| Error::from(e).context(format!("creating {}", out_dir.display())))?;
    let mut writers = plans
        .iter()
        .map(|plan| {
            WeightsFileWriter::create(
                out_dir.join(rank_file_name(plan.rank, opts.ranks)),
                dims,
                *plan,
                config.layers,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    for layer in 0..config.layers {
        let weights = checkpoint.mla_weights(layer)?;
        let cal = calibration
            .map(|c| LayerCalibration::from_file(c, layer))
            .transpose()?;
        let fit = fit_layer(&weights, cal.as_ref(), &opts.fit, layer)
            .map_err(|e| e.context(format!("layer {layer}")))?;
        for (plan, writer) in plans.iter().zip(&mut writers) {
            let rank = fit.folded.rank(plan, fit.mus[plan.group])?;
            let rank_layer =
                RankLayer::new(&rank, fit.transform.clone(), fit.fractions[plan.group])?;
            writer.write_layer(&rank_layer)?;
        }
        on_layer(layer, &fit);
    }
    writers.into_iter().map(WeightsFileWriter::finish).collect()
}

#[cfg(test)]
mod tests {
    /// e4m3 (the "fn" variant of DeepSeek-V3 and torch.float8_e4m3fn): bias 7, no
    /// infinities, S.1111.111 is NaN, largest finite value 448.
    #[test]
    fn fp8_e4m3_bit_patterns_decode_to_their_values() {
        for (bits, want) in [
            (0x00u8, 0.0),
            (0x38, 1.0),
            (0xb8, -1.0),
            (0x40, 2.0),
            (0x3c, 1.5),
            (0x7e, 448.0),
            (0xfe, -448.0),
            (0x08, 2f64.powi(-6)),
            (0x01, 2f64.powi(-9)),
            (0x07, 7.0 * 2f64.powi(-9)),
        ] {
            assert_eq!(
                float8::F8E4M3::from_bits(bits).to_f64(),
                want,
                "{bits:#04x}"
            );
        }
        assert!(float8::F8E4M3::from_bits(0x7f).to_f64().is_nan());
        assert!(float8::F8E4M3::from_bits(0xff).to_f64().is_nan());
    }
}
