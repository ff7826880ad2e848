//! Calibration data: captured latents (and optionally queries) per layer, the file that
//! holds them, and the fit of a layer's transform `U` and logit scales `mu` from them.
//!
//! A calibration file (docs/calibration-format.md; this module is the authority) is a
//! stream of records, each tagged with its layer, in any order, so that an engine can
//! write it while it runs a model:
//! - *latent* records: pre-norm latents `a_t` `[tokens][d_c]`. Every latent record of a
//!   layer feeds its second moment (PCA, slice energy fractions), read as a stream.
//! - *window* records: the latents and RoPE keys of a run of tokens `[tokens][d_c]`,
//!   `[tokens][d_r]`, and decode queries `q_nope` `[queries][heads][d_n]`, `q_rope`
//!   `[queries][heads][d_r]` (RoPE applied) that attend over all of those tokens. The
//!   `kl` policy fits `mu` on a layer's first window; the fidelity report evaluates on
//!   its last. Windows do not feed the second moment.
//!
//! Values are f32 (lossless for the bf16 activations of serving engines). Every record
//! carries CRC-32C checksums of its header and payload, and the file ends with an end
//! record counting the records, so truncation and corruption are errors.

use crate::attention::reference::{self, normalise};
use crate::convert::{FoldedLayer, MlaWeights};
use crate::error::{Error, Result};
use crate::geometry::ModelDims;
use crate::le::{u32_at, u64_at};
use crate::synthetic::SyntheticLayer;
use crate::transform::{
    choose_mu, slice_energy_fractions, KlCalibration, MuPolicy, SecondMoment, SliceLayout,
    Transform, TransformKind,
};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// First eight bytes of every calibration file.
pub const MAGIC: [u8; 8] = *b"TPLACALB";
/// Version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of the file header.
pub const HEADER_LEN: usize = 64;
/// Bytes of a record header.
pub const RECORD_HEADER_LEN: usize = 32;
/// Bytes of the end record's payload: u64 record count, u64 zero.
const END_PAYLOAD_LEN: u64 = 16;

/// Record kinds. The codes are stored in files: never renumber.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RecordKind {
    Latents = 1,
    Window = 2,
    End = 3,
}

impl RecordKind {
    fn from_code(code: u32) -> Option<Self> {
        [Self::Latents, Self::Window, Self::End]
            .into_iter()
            .find(|k| *k as u32 == code)
    }
}

/// The shapes a calibration file is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CalibrationShape {
    pub heads: usize,
    pub d_c: usize,
    pub d_r: usize,
    pub d_n: usize,
    pub d_v: usize,
    pub layers: usize,
}

impl CalibrationShape {
    pub fn new(dims: &ModelDims, layers: usize) -> Result<Self> {
        dims.validate()?;
        if layers == 0 || layers > crate::cache::MAX_LAYERS {
            return Err(Error::invalid(format!(
                "a calibration file holds between 1 and {} layers, got {layers}",
                crate::cache::MAX_LAYERS
            )));
        }
        Ok(CalibrationShape {
            heads: dims.heads,
            d_c: dims.d_c,
            d_r: dims.d_r,
            d_n: dims.d_n,
            d_v: dims.d_v,
            layers,
        })
    }

    /// Whether a model's dims match (the softmax scale is not part of the file).
    pub fn matches(&self, dims: &ModelDims) -> bool {
        (self.heads, self.d_c, self.d_r, self.d_n, self.d_v)
            == (dims.heads, dims.d_c, dims.d_r, dims.d_n, dims.d_v)
    }

    /// Payload bytes of a record, or None when it overflows.
    fn payload_len(&self, kind: RecordKind, tokens: usize, queries: usize) -> Option<u64> {
        let values = match kind {
            RecordKind::Latents => tokens.checked_mul(self.d_c)?,
            RecordKind::Window => {
                let q = self.heads.checked_mul(self.d_n + self.d_r)?;
                tokens
                    .checked_mul(self.d_c + self.d_r)?
                    .checked_add(queries.checked_mul(q)?)?
            }
            RecordKind::End => return Some(END_PAYLOAD_LEN),
        };
        u64::try_from(values).ok()?.checked_mul(4)
    }
}

/// Tokens and decode queries of one window, f64, for the `kl` policy and evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    /// Pre-norm latents `[tokens][d_c]`.
    pub latents: Vec<f64>,
    /// RoPE keys `[tokens][d_r]`.
    pub k_rope: Vec<f64>,
    /// `[queries][heads][d_n]`
    pub q_nope: Vec<f64>,
    /// `[queries][heads][d_r]`
    pub q_rope: Vec<f64>,
}

impl Window {
    pub fn tokens(&self, d_c: usize) -> usize {
        self.latents.len() / d_c
    }
}

/// Writes a calibration file: records are appended as they come; [`Self::finish`]
/// writes the end record, fsyncs and renames the temporary file to its path.
pub struct CalibrationWriter {
    path: PathBuf,
    shape: CalibrationShape,
    out: BufWriter<tempfile::NamedTempFile>,
    records: u64,
}

impl std::fmt::Debug for CalibrationWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CalibrationWriter")
            .field("path", &self.path)
            .field("records", &self.records)
            .finish()
    }
}

fn f32_bytes<'a>(parts: impl IntoIterator<Item = &'a [f32]>) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    for part in parts {
        if let Some(i) = part.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(format!(
                "calibration values must be finite, entry {i} of a record part is {}",
                part[i]
            )));
        }
        bytes.extend(part.iter().flat_map(|v| v.to_le_bytes()));
    }
    Ok(bytes)
}

impl CalibrationWriter {
    pub fn create(path: impl AsRef<Path>, shape: CalibrationShape) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let at = |e: std::io::Error| Error::from(e).context(format!("writing {}", path.display()));
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let temp = crate::files::temp_file_in(&dir, ".tpla-calibration-").map_err(at)?;
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        for (i, v) in [
            shape.heads,
            shape.d_c,
            shape.d_r,
            shape.d_n,
            shape.d_v,
            shape.layers,
        ]
        .into_iter()
        .enumerate()
        {
            header[16 + 4 * i..20 + 4 * i].copy_from_slice(&(v as u32).to_le_bytes());
        }
        let crc = crc32c::crc32c(&header[16..]);
        header[12..16].copy_from_slice(&crc.to_le_bytes());
        let mut out = BufWriter::new(temp);
        out.write_all(&header).map_err(at)?;
        Ok(CalibrationWriter {
            path,
            shape,
            out,
            records: 0,
        })
    }

    fn record(
        &mut self,
        kind: RecordKind,
        layer: usize,
        tokens: usize,
        queries: usize,
        payload: &[u8],
    ) -> Result<()> {
        let to_u32 = |v: usize, what: &str| {
            u32::try_from(v)
                .map_err(|_| Error::invalid(format!("a record holds at most 2^32-1 {what}")))
        };
        let mut h = [0u8; RECORD_HEADER_LEN];
        h[0..4].copy_from_slice(&(kind as u32).to_le_bytes());
        h[4..8].copy_from_slice(&to_u32(layer, "layers")?.to_le_bytes());
        h[8..12].copy_from_slice(&to_u32(tokens, "tokens")?.to_le_bytes());
        h[12..16].copy_from_slice(&to_u32(queries, "queries")?.to_le_bytes());
        h[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        h[24..28].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
        let crc = crc32c::crc32c(&h[..28]);
        h[28..32].copy_from_slice(&crc.to_le_bytes());
        let path = &self.path;
        let at = |e: std::io::Error| Error::from(e).context(format!("writing {}", path.display()));
        self.out.write_all(&h).map_err(at)?;
        self.out.write_all(payload).map_err(at)?;
        self.records += 1;
        Ok(())
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.shape.layers {
            return Err(Error::out_of_range(format!(
                "layer {layer} is out of range for a calibration file of {} layers",
                self.shape.layers
            )));
        }
        Ok(())
    }

    /// Appends pre-norm latents `[tokens][d_c]` of `layer`.
    pub fn latents(&mut self, layer: usize, latents: &[f32]) -> Result<()> {
        self.check_layer(layer)?;
        let d_c = self.shape.d_c;
        if latents.is_empty() || latents.len() % d_c != 0 {
            return Err(Error::invalid(format!(
                "latents must be a positive number of rows of d_c = {d_c} values, got {}",
                latents.len()
            )));
        }
        let payload = f32_bytes([latents])?;
        self.record(RecordKind::Latents, layer, latents.len() / d_c, 0, &payload)
    }

    /// Appends a window of `layer`: tokens (latents `[T][d_c]`, RoPE keys `[T][d_r]`) and
    /// queries (`q_nope` `[Q][heads][d_n]`, `q_rope` `[Q][heads][d_r]`) over all of them.
    pub fn window(
        &mut self,
        layer: usize,
        latents: &[f32],
        k_rope: &[f32],
        q_nope: &[f32],
        q_rope: &[f32],
    ) -> Result<()> {
        self.check_layer(layer)?;
        let s = self.shape;
        let tokens = latents.len() / s.d_c;
        let queries = q_nope.len() / (s.heads * s.d_n);
        let consistent = tokens > 0
            && queries > 0
            && latents.len() == tokens * s.d_c
            && k_rope.len() == tokens * s.d_r
            && q_nope.len() == queries * s.heads * s.d_n
            && q_rope.len() == queries * s.heads * s.d_r;
        if !consistent {
            return Err(Error::invalid(format!(
                "a window needs T > 0 tokens and Q > 0 queries: latents T x {}, RoPE keys \
                 T x {}, q_nope Q x {} x {}, q_rope Q x {} x {}; got {}, {}, {} and {} values",
                s.d_c,
                s.d_r,
                s.heads,
                s.d_n,
                s.heads,
                s.d_r,
                latents.len(),
                k_rope.len(),
                q_nope.len(),
                q_rope.len()
            )));
        }
        let payload = f32_bytes([latents, k_rope, q_nope, q_rope])?;
        self.record(RecordKind::Window, layer, tokens, queries, &payload)
    }

    /// Writes the end record, fsyncs and renames the file to its path.
    pub fn finish(mut self) -> Result<PathBuf> {
        let mut end = [0u8; END_PAYLOAD_LEN as usize];
        end[..8].copy_from_slice(&self.records.to_le_bytes());
        self.record(RecordKind::End, 0, 0, 0, &end)?;
        let path = self.path;
        let at = |e: std::io::Error| Error::from(e).context(format!("writing {}", path.display()));
        let temp = self.out.into_inner().map_err(|e| at(e.into_error()))?;
        temp.as_file().sync_all().map_err(at)?;
        temp.persist(&path).map_err(|e| at(e.error))?;
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(dir).and_then(|d| d.sync_all()).map_err(at)?;
        }
        Ok(path)
    }
}

/// Where one record lies.
#[derive(Clone, Copy, Debug)]
struct RecordEntry {
    kind: RecordKind,
    layer: usize,
    tokens: usize,
    queries: usize,
    payload_offset: u64,
    payload_len: u64,
    payload_crc: u32,
}

/// An opened calibration file: its shape and the index of its records (built by reading
/// every record header once; payloads are read when a layer is asked for).
#[derive(Debug)]
pub struct CalibrationFile {
    path: PathBuf,
    shape: CalibrationShape,
    records: Vec<RecordEntry>,
}

/// Rows streamed per read of a latent record.
const STREAM_ROWS: usize = 256;

impl CalibrationFile {
    /// Opens and indexes `path`, validating the header, every record header, the payload
    /// sizes against the file length and the end record.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        Self::index(&path).map_err(|e| e.context(path.display()))
    }

    fn index(path: &Path) -> Result<Self> {
        let mut file = crate::files::open_regular(path)?;
        let len = file.metadata()?.len();
        let mut reader = BufReader::new(&mut file);
        let mut header = [0u8; HEADER_LEN];
        reader.read_exact(&mut header).map_err(|_| {
            Error::corrupt(format!(
                "truncated: {len} bytes, the header is {HEADER_LEN}"
            ))
        })?;
        if header[..8] != MAGIC {
            return Err(Error::corrupt("not a TPLA calibration file (bad magic)"));
        }
        let version = u32_at(&header, 8);
        if version != FORMAT_VERSION {
            return Err(Error::unsupported(format!(
                "calibration file format version {version}; this build reads version \
                 {FORMAT_VERSION}"
            )));
        }
        if crc32c::crc32c(&header[16..]) != u32_at(&header, 12) {
            return Err(Error::corrupt("header checksum mismatch"));
        }
        if header[40..].iter().any(|&b| b != 0) {
            return Err(Error::corrupt("header: reserved bytes are not zero"));
        }
        let field = |i: usize| u32_at(&header, 16 + 4 * i) as usize;
        let dims = ModelDims::new(field(0), field(1), field(2), field(3), field(4), 1.0)
            .map_err(|e| Error::corrupt(format!("header: {}", e.message())))?;
        let shape = CalibrationShape::new(&dims, field(5))
            .map_err(|e| Error::corrupt(format!("header: {}", e.message())))?;
        let mut records = Vec::new();
        let mut pos = HEADER_LEN as u64;
        loop {
            let index = records.len();
            let mut h = [0u8; RECORD_HEADER_LEN];
            reader.read_exact(&mut h).map_err(|_| {
                Error::corrupt(format!(
                    "truncated: record {index} starts at byte {pos} but the file ends at {len} \
                     (no end record)"
                ))
            })?;
            if crc32c::crc32c(&h[..28]) != u32_at(&h, 28) {
                return Err(Error::corrupt(format!(
                    "record {index}: header checksum mismatch"
                )));
            }
            let code = u32_at(&h, 0);
            let kind = RecordKind::from_code(code).ok_or_else(|| {
                Error::corrupt(format!("record {index}: unknown record kind {code}"))
            })?;
            let (layer, tokens, queries) = (
                u32_at(&h, 4) as usize,
                u32_at(&h, 8) as usize,
                u32_at(&h, 12) as usize,
            );
            let payload_len = u64_at(&h, 16);
            let want = shape.payload_len(kind, tokens, queries);
            let shape_ok = match kind {
                RecordKind::Latents => tokens > 0 && queries == 0,
                RecordKind::Window => tokens > 0 && queries > 0,
                RecordKind::End => layer == 0 && tokens == 0 && queries == 0,
            };
            if !shape_ok || layer >= shape.layers || want != Some(payload_len) {
                return Err(Error::corrupt(format!(
                    "record {index}: inconsistent header (kind {code}, layer {layer}, {tokens} \
                     tokens, {queries} queries, {payload_len} payload bytes)"
                )));
            }
            let payload_offset = pos + RECORD_HEADER_LEN as u64;
            let end = payload_offset
                .checked_add(payload_len)
                .filter(|&e| e <= len)
                .ok_or_else(|| {
                    Error::corrupt(format!(
                        "truncated: record {index}'s payload runs past the end of the file"
                    ))
                })?;
            let entry = RecordEntry {
                kind,
                layer,
                tokens,
                queries,
                payload_offset,
                payload_len,
                payload_crc: u32_at(&h, 24),
            };
            if kind == RecordKind::End {
                let mut payload = [0u8; END_PAYLOAD_LEN as usize];
                reader.read_exact(&mut payload)?;
                if crc32c::crc32c(&payload) != entry.payload_crc {
                    return Err(Error::corrupt("end record: payload checksum mismatch"));
                }
                if u64_at(&payload, 0) != records.len() as u64 || u64_at(&payload, 8) != 0 {
                    return Err(Error::corrupt(format!(
                        "end record counts {} records, the file holds {}",
                        u64_at(&payload, 0),
                        records.len()
                    )));
                }
                if end != len {
                    return Err(Error::corrupt(format!(
                        "{} bytes follow the end record",
                        len - end
                    )));
                }
                break;
            }
            reader.seek_relative(payload_len as i64)?;
            records.push(entry);
            pos = end;
        }
        Ok(CalibrationFile {
            path: path.to_path_buf(),
            shape,
            records,
        })
    }

    pub fn shape(&self) -> &CalibrationShape {
        &self.shape
    }

    /// Latent tokens of `layer` (over its latent records).
    pub fn latent_tokens(&self, layer: usize) -> usize {
        self.of(layer, RecordKind::Latents).map(|r| r.tokens).sum()
    }

    /// Windows of `layer`.
    pub fn window_count(&self, layer: usize) -> usize {
        self.of(layer, RecordKind::Window).count()
    }

    fn of(&self, layer: usize, kind: RecordKind) -> impl Iterator<Item = &RecordEntry> {
        self.records
            .iter()
            .filter(move |r| r.layer == layer && r.kind == kind)
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.shape.layers {
            return Err(Error::out_of_range(format!(
                "layer {layer} is out of range: the calibration file has {} layers",
                self.shape.layers
            )));
        }
        Ok(())
    }

    /// Second moment of `layer`'s normalised latents, streamed from its latent records
    /// (`STREAM_ROWS` rows in memory at a time).
    pub fn moment(&self, layer: usize) -> Result<SecondMoment> {
        self.check_layer(layer)?;
        let d_c = self.shape.d_c;
        let mut moment = SecondMoment::new(d_c);
        let mut file = File::open(&self.path)?;
        let mut buf = vec![0u8; STREAM_ROWS * d_c * 4];
        let mut row = vec![0.0f64; d_c];
        for (k, r) in self.of(layer, RecordKind::Latents).enumerate() {
            let at = |e: Error| {
                e.context(format!(
                    "{}: layer {layer} latent record {k}",
                    self.path.display()
                ))
            };
            file.seek(SeekFrom::Start(r.payload_offset))?;
            let mut crc = 0u32;
            let mut left = r.tokens;
            while left > 0 {
                let rows = left.min(STREAM_ROWS);
                let chunk = &mut buf[..rows * d_c * 4];
                file.read_exact(chunk).map_err(|e| at(e.into()))?;
                crc = crc32c::crc32c_append(crc, chunk);
                for bytes in chunk.chunks_exact(d_c * 4) {
                    for (v, b) in row.iter_mut().zip(bytes.chunks_exact(4)) {
                        *v = f32::from_le_bytes(b.try_into().expect("4 bytes")) as f64;
                    }
                    moment.add(&normalise(&row)).map_err(at)?;
                }
                left -= rows;
            }
            if crc != r.payload_crc {
                return Err(at(Error::corrupt("payload checksum mismatch")));
            }
        }
        Ok(moment)
    }

    /// Window `index` of `layer`.
    pub fn window(&self, layer: usize, index: usize) -> Result<Window> {
        self.check_layer(layer)?;
        let r = *self
            .of(layer, RecordKind::Window)
            .nth(index)
            .ok_or_else(|| {
                Error::out_of_range(format!(
                    "layer {layer} has {} windows, window {index} does not exist",
                    self.window_count(layer)
                ))
            })?;
        let at = |e: Error| {
            e.context(format!(
                "{}: layer {layer} window {index}",
                self.path.display()
            ))
        };
        let mut file = File::open(&self.path)?;
        file.seek(SeekFrom::Start(r.payload_offset))?;
        let mut payload = vec![0u8; r.payload_len as usize];
        file.read_exact(&mut payload).map_err(|e| at(e.into()))?;
        if crc32c::crc32c(&payload) != r.payload_crc {
            return Err(at(Error::corrupt("payload checksum mismatch")));
        }
        let s = self.shape;
        let mut values = payload
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")) as f64);
        let mut take = |n: usize| -> Result<Vec<f64>> {
            let v: Vec<f64> = values.by_ref().take(n).collect();
            match v.iter().position(|x| !x.is_finite()) {
                Some(i) => Err(at(Error::corrupt(format!("non-finite value at entry {i}")))),
                None => Ok(v),
            }
        };
        Ok(Window {
            latents: take(r.tokens * s.d_c)?,
            k_rope: take(r.tokens * s.d_r)?,
            q_nope: take(r.queries * s.heads * s.d_n)?,
            q_rope: take(r.queries * s.heads * s.d_r)?,
        })
    }
}

/// A layer's calibration data as [`fit_layer`] uses it.
#[derive(Clone, Debug)]
pub struct LayerCalibration {
    /// Second moment of the normalised latents.
    pub moment: SecondMoment,
    /// The window the `kl` policy fits on.
    pub window: Option<Window>,
}

impl LayerCalibration {
    /// From pre-norm latents `[T][d_c]` held in memory and an optional window.
    pub fn from_latents(d_c: usize, latents: &[f64], window: Option<Window>) -> Result<Self> {
        let mut moment = SecondMoment::new(d_c);
        if d_c == 0 || latents.len() % d_c != 0 {
            return Err(Error::invalid(format!(
                "latents must be rows of d_c = {d_c} values, got {}",
                latents.len()
            )));
        }
        for a in latents.chunks_exact(d_c) {
            moment.add(&normalise(a))?;
        }
        Ok(LayerCalibration { moment, window })
    }

    /// `layer`'s second moment and first window (if any) from `file`.
    pub fn from_file(file: &CalibrationFile, layer: usize) -> Result<Self> {
        let window = match file.window_count(layer) {
            0 => None,
            _ => Some(file.window(layer, 0)?),
        };
        Ok(LayerCalibration {
            moment: file.moment(layer)?,
            window,
        })
    }
}

/// How a layer is fitted.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FitOptions {
    pub transform: TransformKind,
    /// Slice layout of PCA.
    pub layout: SliceLayout,
    pub groups: usize,
    pub policy: MuPolicy,
    /// Seed of the model's randomised Hadamard transforms: layer `l` uses
    /// [`Transform::hadamard_for_layer`]`(d_c, hadamard_seed, l)`.
    pub hadamard_seed: u64,
}

/// A layer's transform, its folded weights, and each slice's mu and energy fraction.
#[derive(Clone, Debug)]
pub struct LayerFit {
    pub transform: Transform,
    pub folded: FoldedLayer,
    pub mus: Vec<f64>,
    /// Share of the latent energy in each slice; `1/g` each when fitted without
    /// calibration latents (identity or Hadamard with mu `one` or `groups`).
    pub fractions: Vec<f64>,
}

/// Builds layer `layer`'s `U` (PCA needs calibration latents), folds the layer, and
/// chooses mu (the `variance` policy needs latents, `kl` a window).
pub fn fit_layer(
    weights: &MlaWeights,
    calibration: Option<&LayerCalibration>,
    opts: &FitOptions,
    layer: usize,
) -> Result<LayerFit> {
    let d = weights.dims;
    let g = opts.groups;
    let moment = calibration.map(|c| &c.moment).filter(|m| m.count() > 0);
    let needs_latents = |what: &str| {
        Error::invalid(format!(
            "{what} needs calibration latents, but there are none for this layer"
        ))
    };
    let transform = match opts.transform {
        TransformKind::Identity => Transform::identity(d.d_c)?,
        TransformKind::Hadamard => Transform::hadamard_for_layer(d.d_c, opts.hadamard_seed, layer)?,
        TransformKind::Pca => Transform::pca(
            moment.ok_or_else(|| needs_latents("the PCA transform"))?,
            opts.layout,
            g,
        )?,
    };
    let fractions = match moment {
        // One slice holds all the energy by definition (the sum would round).
        Some(_) if g == 1 => vec![1.0],
        Some(m) => slice_energy_fractions(&transform, m, g)?,
        None if matches!(opts.policy, MuPolicy::One | MuPolicy::Groups) => {
            if g == 0 || d.d_c % g != 0 {
                return Err(Error::invalid(format!(
                    "{g} latent groups do not divide d_c = {}",
                    d.d_c
                )));
            }
            vec![1.0 / g as f64; g]
        }
        None => {
            return Err(needs_latents(&format!(
                "the {} mu policy",
                opts.policy.name()
            )))
        }
    };
    if let Some(m) = moment {
        check_every_slice_has_energy(&fractions, m.count(), d.d_c, opts)?;
    }
    let folded = FoldedLayer::new(weights, &transform)?;
    let window = calibration.and_then(|c| c.window.as_ref());
    let mus =
        match (opts.policy, window) {
            // One slice is exact MLA: every policy's mu is 1 (kl's search would only find it
            // to within its tolerance).
            _ if g == 1 => vec![1.0],
            (MuPolicy::Kl, None) => return Err(Error::invalid(
                "the kl mu policy needs calibration queries (a window), but this layer has none",
            )),
            (MuPolicy::Kl, Some(w)) => {
                let kl = KlInputs::new(&folded, &transform, w)?;
                choose_mu(opts.policy, g, &fractions, Some(&kl.calibration(&d)))?
            }
            (policy, _) => choose_mu(policy, g, &fractions, None)?,
        };
    Ok(LayerFit {
        transform,
        folded,
        mus,
        fractions,
    })
}

/// A window in the rotated basis: what [`KlCalibration`] borrows.
pub(crate) struct KlInputs {
    q_lat: Vec<f64>,
    q_rope: Vec<f64>,
    keys_lat: Vec<f64>,
    keys_rope: Vec<f64>,
}

impl KlInputs {
    pub(crate) fn new(folded: &FoldedLayer, transform: &Transform, w: &Window) -> Result<Self> {
        let d = folded.dims;
        let queries = w.q_nope.len() / (d.heads * d.d_n);
        let tokens = w.latents.len() / d.d_c;
        if w.q_nope.len() != queries * d.heads * d.d_n
            || w.q_rope.len() != queries * d.heads * d.d_r
            || w.latents.len() != tokens * d.d_c
            || w.k_rope.len() != tokens * d.d_r
        {
            return Err(Error::invalid(
                "the calibration window's shapes do not match the layer",
            ));
        }
        // Every head's query, absorbed and rotated: U^T diag(gamma) W_UK q_nope.
        let mut q_lat = Vec::with_capacity(queries * d.heads * d.d_c);
        for (i, qn) in w.q_nope.chunks_exact(d.d_n).enumerate() {
            let h = i % d.heads;
            let wk = &folded.w_uk[h * d.d_c * d.d_n..(h + 1) * d.d_c * d.d_n];
            q_lat.extend(wk.chunks_exact(d.d_n).map(|row| reference::dot(row, qn)));
        }
        Ok(KlInputs {
            q_lat,
            q_rope: w.q_rope.clone(),
            keys_lat: reference::rotated_latents(&w.latents, transform),
            keys_rope: w.k_rope.clone(),
        })
    }

    pub(crate) fn calibration(&self, d: &ModelDims) -> KlCalibration<'_> {
        KlCalibration {
            d_c: d.d_c,
            d_r: d.d_r,
            scale: d.softmax_scale,
            q_lat: &self.q_lat,
            q_rope: &self.q_rope,
            keys_lat: &self.keys_lat,
            keys_rope: &self.keys_rope,
        }
    }
}

/// Tokens of the synthetic calibration data: a latent sequence and a window.
#[derive(Clone, Copy, Debug)]
pub struct SyntheticCalibration {
    /// Tokens of the latent sequence (PCA).
    pub tokens: usize,
    /// Tokens of the window; its last `queries` positions give the queries.
    pub window: usize,
    pub queries: usize,
    pub seed: u64,
}

/// The calibration data of one synthetic layer: a sequence of `tokens` latents and a
/// window of `window` tokens whose last `queries` positions give the queries (they
/// attend over the whole window).
pub fn synthetic_layer_calibration(
    layer: &SyntheticLayer,
    spec: &SyntheticCalibration,
) -> Result<(Vec<f64>, Window)> {
    if spec.tokens == 0 || spec.queries == 0 || spec.queries > spec.window {
        return Err(Error::invalid(format!(
            "synthetic calibration needs tokens > 0 and 1..=window queries, got {} tokens, a \
             window of {} and {} queries",
            spec.tokens, spec.window, spec.queries
        )));
    }
    let latents = layer.sequence(spec.tokens, spec.seed).tokens.latents;
    let seq = layer.sequence(spec.window, spec.seed.wrapping_add(1));
    let mut q_nope = Vec::new();
    let mut q_rope = Vec::new();
    for t in spec.window - spec.queries..spec.window {
        let q = layer.query_at(&seq, t);
        q_nope.extend(q.q_nope);
        q_rope.extend(q.q_rope);
    }
    Ok((
        latents,
        Window {
            latents: seq.tokens.latents,
            k_rope: seq.tokens.k_rope,
            q_nope,
            q_rope,
        },
    ))
}

/// Writes a calibration file for `layers` (all of one shape): per layer one latent
/// record and one window from [`synthetic_layer_calibration`].
pub fn write_synthetic(
    path: impl AsRef<Path>,
    layers: &[SyntheticLayer],
    spec: &SyntheticCalibration,
) -> Result<PathBuf> {
    let first = layers
        .first()
        .ok_or_else(|| Error::invalid("synthetic calibration needs at least one layer"))?;
    let shape = CalibrationShape::new(&first.dims, layers.len())?;
    let mut writer = CalibrationWriter::create(path, shape)?;
    let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    for (i, layer) in layers.iter().enumerate() {
        if !shape.matches(&layer.dims) {
            return Err(Error::invalid(format!(
                "synthetic layer {i} has another shape than layer 0"
            )));
        }
        let (latents, w) = synthetic_layer_calibration(layer, spec)?;
        writer.latents(i, &f32s(&latents))?;
        writer.window(
            i,
            &f32s(&w.latents),
            &f32s(&w.k_rope),
            &f32s(&w.q_nope),
            &f32s(&w.q_rope),
        )?;
    }
    writer.finish()
}

/// The synthetic layers the generator and the fidelity report use: layer `l` is
/// `SyntheticLayer::generate(dims, seed + l)`.
/// A slice's energy share below this is the round-off of zero (it can come out as
/// -1.8e-16): the slice holds no direction the calibration latents span.
const EMPTY_SLICE_SHARE: f64 = 1e-12;

/// Refuses a fit whose calibration latents leave a slice without energy, saying how many
/// latents the transform needs: `T` latents span at most `T` directions, and PCA puts
/// the weakest components in the last contiguous slice (from column `(g - 1) d_c / g`)
/// or, interleaved, one in every slice per `g` components.
fn check_every_slice_has_energy(
    fractions: &[f64],
    latents: u64,
    d_c: usize,
    opts: &FitOptions,
) -> Result<()> {
    let Some(slice) = fractions
        .iter()
        .position(|&f| f.is_nan() || f <= EMPTY_SLICE_SHARE)
    else {
        return Ok(());
    };
    let g = opts.groups;
    let needed = match (opts.transform, opts.layout) {
        (TransformKind::Pca, SliceLayout::Contiguous) => {
            format!(
                "; contiguous PCA slices need more than (g - 1) d_c / g = {} latents per layer",
                (g - 1) * (d_c / g)
            )
        }
        (TransformKind::Pca, SliceLayout::Interleaved) => {
            format!("; interleaved PCA slices need at least g = {g} latents per layer")
        }
        _ => String::new(),
    };
    Err(Error::invalid(format!(
        "slice {slice} of {g} gets none of the energy of this layer's {latents} calibration \
         latents (share {:.1e}){needed}, and thousands for a good fit",
        fractions[slice].max(0.0)
    )))
}

pub fn synthetic_layers(dims: &ModelDims, layers: usize, seed: u64) -> Result<Vec<SyntheticLayer>> {
    (0..layers)
        .map(|l| SyntheticLayer::generate(dims, seed.wrapping_add(l as u64)))
        .collect()
}
