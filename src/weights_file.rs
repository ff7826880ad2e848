//! The converted weights file, version 1: one rank's TPLA weights of every layer, as
//! `tpla convert` writes them and a [`RankContext`](crate::decode::RankContext) loads
//! them.
//!
//! docs/weights-format.md is the byte-level description; this module is the authority.
//! All integers and floats little-endian.
//!
//! ```text
//! [0, 128)                 header (field offsets in `at`)
//! [128, 128 + 32 L)        layer table: per layer u64 offset, u64 length, u32 CRC-32C of
//!                          the section, u32 transform code, u64 zero
//! [128 + 32 L, file end)   layer sections, in layer order, back to back, each padded
//!                          with zeros to a multiple of 8 bytes
//! ```
//!
//! A layer section: u32 transform code, u32 zero, u64 Hadamard seed (zero for other
//! kinds), u64 fingerprint of `U`, f64 mu, f64 slice energy fraction, then `W'_UK` f32
//! `[heads][slice_width][d_n]`, `W'_UV` f32 `[heads][slice_width][d_v]`, and for PCA the
//! matrix `U` f64 `[d_c][d_c]` (row-major) and its eigenvalues f64 `[d_c]`.
//!
//! Every byte is checked on load: magic, version, the header CRC (bytes 16..128), the
//! table CRC (stored in the header), the section CRCs, zero padding and reserved fields,
//! the placement of every section (fixed by the geometry and transform kinds), the file
//! length, finite weights, a positive mu, a fraction in (0, 1], an orthogonal PCA
//! matrix, and the fingerprint against the rebuilt transform.

use crate::decode::RankLayer;
use crate::error::{Error, Result};
use crate::geometry::{ModelDims, ShardPlan};
use crate::le::{f64_at, put_u32, put_u64, u32_at, u64_at};
use crate::transform::{Transform, TransformKind};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// First eight bytes of every converted weights file.
pub const MAGIC: [u8; 8] = *b"TPLAWGTS";
/// Version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 128;
/// Bytes of one layer table entry.
pub const LAYER_ENTRY_LEN: usize = 32;
/// Bytes of a layer section before the weights.
pub const SECTION_HEADER_LEN: usize = 40;

/// Byte offsets of the header fields.
mod at {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const HEADER_CRC: usize = 12;
    pub const HEADS: usize = 16;
    pub const D_C: usize = 20;
    pub const D_R: usize = 24;
    pub const D_N: usize = 28;
    pub const D_V: usize = 32;
    pub const GROUPS: usize = 36;
    pub const RANKS: usize = 40;
    pub const RANK: usize = 44;
    pub const SOFTMAX_SCALE: usize = 48;
    pub const LAYERS: usize = 56;
    pub const TABLE_CRC: usize = 60;
    pub const FILE_LEN: usize = 64;
    /// Bytes 72..128 are zero.
    pub const RESERVED: usize = 72;
}

/// Section offsets.
mod sec {
    pub const CODE: usize = 0;
    pub const RESERVED: usize = 4;
    pub const SEED: usize = 8;
    pub const FINGERPRINT: usize = 16;
    pub const MU: usize = 24;
    pub const FRACTION: usize = 32;
}

/// Byte sizes of a layer section's parts, fixed by the geometry, plan and transform kind.
#[derive(Clone, Copy, Debug)]
struct SectionLayout {
    w_uk: usize,
    w_uv: usize,
    /// PCA matrix and eigenvalues; zero for the other kinds.
    pca: usize,
}

impl SectionLayout {
    fn new(dims: &ModelDims, plan: &ShardPlan, kind: TransformKind) -> Option<Self> {
        let per_head = plan.heads.checked_mul(plan.slice_width)?;
        let pca = match kind {
            TransformKind::Pca => dims.d_c.checked_mul(dims.d_c + 1)?.checked_mul(8)?,
            _ => 0,
        };
        Some(SectionLayout {
            w_uk: per_head.checked_mul(dims.d_n)?.checked_mul(4)?,
            w_uv: per_head.checked_mul(dims.d_v)?.checked_mul(4)?,
            pca,
        })
    }

    /// Bytes without padding.
    fn content(&self) -> Option<usize> {
        SECTION_HEADER_LEN
            .checked_add(self.w_uk)?
            .checked_add(self.w_uv)?
            .checked_add(self.pca)
    }

    /// Bytes with padding to a multiple of 8.
    fn padded(&self) -> Option<usize> {
        self.content()?.checked_next_multiple_of(8)
    }
}

/// Writes one rank's converted weights, layer by layer, to a temporary file next to the
/// destination; [`WeightsFileWriter::finish`] completes the header, fsyncs and renames.
/// Dropping an unfinished writer removes the temporary file.
pub struct WeightsFileWriter {
    path: PathBuf,
    dims: ModelDims,
    plan: ShardPlan,
    layers: usize,
    temp: std::io::BufWriter<tempfile::NamedTempFile>,
    /// (offset, length, crc, code) per written layer.
    table: Vec<(u64, u64, u32, u32)>,
    offset: u64,
}

impl std::fmt::Debug for WeightsFileWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightsFileWriter")
            .field("path", &self.path)
            .field("plan", &self.plan)
            .field("written", &self.table.len())
            .finish()
    }
}

impl WeightsFileWriter {
    /// A writer of `layers` layers of `plan`'s rank, to `path`.
    pub fn create(
        path: impl AsRef<Path>,
        dims: ModelDims,
        plan: ShardPlan,
        layers: usize,
    ) -> Result<Self> {
        plan.check_belongs_to(&dims)?;
        if layers == 0 || layers > crate::cache::MAX_LAYERS {
            return Err(Error::invalid(format!(
                "a weights file holds between 1 and {} layers, got {layers}",
                crate::cache::MAX_LAYERS
            )));
        }
        let path = path.as_ref().to_path_buf();
        let at = |e: std::io::Error| Error::from(e).context(format!("writing {}", path.display()));
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file = crate::files::temp_file_in(&dir, ".tpla-weights-").map_err(at)?;
        let mut temp = std::io::BufWriter::new(file);
        let start = HEADER_LEN + LAYER_ENTRY_LEN * layers;
        temp.write_all(&vec![0u8; start]).map_err(at)?;
        Ok(WeightsFileWriter {
            path,
            dims,
            plan,
            layers,
            temp,
            table: Vec::with_capacity(layers),
            offset: start as u64,
        })
    }

    /// Appends the next layer.
    pub fn write_layer(&mut self, layer: &RankLayer) -> Result<()> {
        let index = self.table.len();
        if index == self.layers {
            return Err(Error::invalid(format!(
                "the weights file was created for {} layers, all written",
                self.layers
            )));
        }
        let (d, p) = (&self.dims, &self.plan);
        let kind = layer.transform.kind();
        let layout = SectionLayout::new(d, p, kind).expect("sizes of a checked plan fit");
        let check = |what: &str, got: usize, want: usize| {
            if got == want {
                Ok(())
            } else {
                Err(Error::invalid(format!(
                    "layer {index}: {what} holds {got} values, this rank needs {want}"
                )))
            }
        };
        check("W_UK", layer.w_uk.len(), layout.w_uk / 4)?;
        check("W_UV", layer.w_uv.len(), layout.w_uv / 4)?;
        check("the transform", layer.transform.dim(), d.d_c)?;
        if !(layer.mu.is_finite() && layer.mu > 0.0) {
            return Err(Error::invalid(format!(
                "layer {index}: mu must be finite and positive, got {}",
                layer.mu
            )));
        }
        if !(layer.slice_fraction > 0.0 && layer.slice_fraction <= 1.0) {
            return Err(Error::invalid(format!(
                "layer {index}: slice energy fraction must lie in (0, 1], got {}",
                layer.slice_fraction
            )));
        }
        let mut bytes = Vec::with_capacity(layout.padded().expect("checked plan"));
        bytes.extend_from_slice(&kind.code().to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&layer.transform.seed().unwrap_or(0).to_le_bytes());
        bytes.extend_from_slice(&layer.transform_id().fingerprint.to_le_bytes());
        bytes.extend_from_slice(&layer.mu.to_le_bytes());
        bytes.extend_from_slice(&layer.slice_fraction.to_le_bytes());
        for v in layer.w_uk.iter().chain(&layer.w_uv) {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        if let Some(eigenvalues) = layer.transform.eigenvalues() {
            for v in layer.transform.matrix().iter().chain(eigenvalues) {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
        }
        bytes.resize(layout.padded().expect("checked plan"), 0);
        self.temp
            .write_all(&bytes)
            .map_err(|e| Error::from(e).context(format!("writing {}", self.path.display())))?;
        let len = bytes.len() as u64;
        self.table
            .push((self.offset, len, crc32c::crc32c(&bytes), kind.code()));
        self.offset += len;
        Ok(())
    }

    /// Writes the header and table, fsyncs, and renames the file to its path.
    pub fn finish(self) -> Result<PathBuf> {
        if self.table.len() != self.layers {
            return Err(Error::invalid(format!(
                "the weights file needs {} layers, only {} were written",
                self.layers,
                self.table.len()
            )));
        }
        let path = self.path;
        let at = |e: std::io::Error| Error::from(e).context(format!("writing {}", path.display()));
        let mut table = vec![0u8; LAYER_ENTRY_LEN * self.layers];
        for (entry, &(offset, len, crc, code)) in
            table.chunks_exact_mut(LAYER_ENTRY_LEN).zip(&self.table)
        {
            put_u64(entry, 0, offset);
            put_u64(entry, 8, len);
            put_u32(entry, 16, crc);
            put_u32(entry, 20, code);
        }
        let (d, p) = (self.dims, self.plan);
        let mut header = [0u8; HEADER_LEN];
        header[at::MAGIC..at::MAGIC + 8].copy_from_slice(&MAGIC);
        put_u32(&mut header, at::VERSION, FORMAT_VERSION);
        for (off, v) in [
            (at::HEADS, d.heads),
            (at::D_C, d.d_c),
            (at::D_R, d.d_r),
            (at::D_N, d.d_n),
            (at::D_V, d.d_v),
            (at::GROUPS, p.groups),
            (at::RANKS, p.ranks),
            (at::RANK, p.rank),
            (at::LAYERS, self.layers),
        ] {
            put_u32(&mut header, off, v as u32);
        }
        put_u64(&mut header, at::SOFTMAX_SCALE, d.softmax_scale.to_bits());
        put_u32(&mut header, at::TABLE_CRC, crc32c::crc32c(&table));
        put_u64(&mut header, at::FILE_LEN, self.offset);
        let crc = crc32c::crc32c(&header[16..]);
        put_u32(&mut header, at::HEADER_CRC, crc);
        let mut file = self.temp.into_inner().map_err(|e| at(e.into_error()))?;
        file.seek(SeekFrom::Start(0)).map_err(at)?;
        file.write_all(&header).map_err(at)?;
        file.write_all(&table).map_err(at)?;
        file.as_file().sync_all().map_err(at)?;
        file.persist(&path).map_err(|e| at(e.error))?;
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(at)?;
        }
        Ok(path)
    }
}

/// A loaded converted weights file: one rank's layers.
#[derive(Debug)]
pub struct WeightsFile {
    pub dims: ModelDims,
    pub plan: ShardPlan,
    pub layers: Vec<RankLayer>,
}

/// Reads and validates a converted weights file (memory-mapped; one layer decoded at a
/// time).
pub fn read(path: impl AsRef<Path>) -> Result<WeightsFile> {
    let path = path.as_ref();
    let at = |e: std::io::Error| Error::from(e).context(format!("reading {}", path.display()));
    let file = crate::files::open_regular(path)
        .map_err(|e| e.context(format!("reading {}", path.display())))?;
    // SAFETY: read-only private map; the file is not expected to change while loading
    // (writers replace files by rename, never in place).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(at)?;
    parse(&map).map_err(|e| e.context(path.display()))
}

/// Parses a weights file image (the bytes of a file).
pub fn parse(image: &[u8]) -> Result<WeightsFile> {
    let header = image.get(..HEADER_LEN).ok_or_else(|| {
        Error::corrupt(format!(
            "truncated: {} bytes, the header alone is {HEADER_LEN}",
            image.len()
        ))
    })?;
    if header[at::MAGIC..at::MAGIC + 8] != MAGIC {
        return Err(Error::corrupt("not a TPLA weights file (bad magic)"));
    }
    let version = u32_at(header, at::VERSION);
    if version != FORMAT_VERSION {
        return Err(Error::unsupported(format!(
            "weights file format version {version}; this build reads version {FORMAT_VERSION}"
        )));
    }
    if crc32c::crc32c(&header[16..]) != u32_at(header, at::HEADER_CRC) {
        return Err(Error::corrupt("header checksum mismatch"));
    }
    if header[at::RESERVED..].iter().any(|&b| b != 0) {
        return Err(Error::corrupt("header: reserved bytes are not zero"));
    }
    let field = |off| u32_at(header, off) as usize;
    let dims = ModelDims::new(
        field(at::HEADS),
        field(at::D_C),
        field(at::D_R),
        field(at::D_N),
        field(at::D_V),
        f64_at(header, at::SOFTMAX_SCALE),
    )
    .map_err(|e| Error::corrupt(format!("header: {}", e.message())))?;
    let plan =
        ShardPlan::with_head_split(&dims, field(at::RANKS), field(at::GROUPS), field(at::RANK))
            .map_err(|e| Error::corrupt(format!("header: {}", e.message())))?;
    let layers = field(at::LAYERS);
    if layers == 0 || layers > crate::cache::MAX_LAYERS {
        return Err(Error::corrupt(format!(
            "header: {layers} layers, expected 1 to {}",
            crate::cache::MAX_LAYERS
        )));
    }
    let file_len = u64_at(header, at::FILE_LEN);
    if file_len != image.len() as u64 {
        return Err(Error::corrupt(format!(
            "the header says the file is {file_len} bytes, it is {}",
            image.len()
        )));
    }
    let table_end = HEADER_LEN + LAYER_ENTRY_LEN * layers;
    let table = image
        .get(HEADER_LEN..table_end)
        .ok_or_else(|| Error::corrupt("truncated inside the layer table"))?;
    if crc32c::crc32c(table) != u32_at(header, at::TABLE_CRC) {
        return Err(Error::corrupt("layer table checksum mismatch"));
    }
    let mut offset = table_end as u64;
    let mut out = Vec::with_capacity(layers);
    for (index, entry) in table.chunks_exact(LAYER_ENTRY_LEN).enumerate() {
        let layer = parse_layer(image, entry, offset, &dims, &plan)
            .map_err(|e| e.context(format!("layer {index}")))?;
        offset += u64_at(entry, 8);
        out.push(layer);
    }
    if offset != image.len() as u64 {
        return Err(Error::corrupt(format!(
            "{} bytes follow the last layer section",
            image.len() as u64 - offset
        )));
    }
    Ok(WeightsFile {
        dims,
        plan,
        layers: out,
    })
}

fn parse_layer(
    image: &[u8],
    entry: &[u8],
    expected_offset: u64,
    dims: &ModelDims,
    plan: &ShardPlan,
) -> Result<RankLayer> {
    let (offset, len, crc, code) = (
        u64_at(entry, 0),
        u64_at(entry, 8),
        u32_at(entry, 16),
        u32_at(entry, 20),
    );
    if u64_at(entry, 24) != 0 {
        return Err(Error::corrupt("table entry: reserved bytes are not zero"));
    }
    let kind =
        TransformKind::from_code(code).map_err(|e| Error::corrupt(e.message().to_string()))?;
    let layout = SectionLayout::new(dims, plan, kind)
        .ok_or_else(|| Error::corrupt("section size overflows"))?;
    let want = layout
        .padded()
        .ok_or_else(|| Error::corrupt("section size overflows"))? as u64;
    if offset != expected_offset || len != want {
        return Err(Error::corrupt(format!(
            "section at [{offset}, +{len}), expected [{expected_offset}, +{want}) for a {} \
             transform",
            kind.name()
        )));
    }
    let section = usize::try_from(offset)
        .ok()
        .zip(usize::try_from(len).ok())
        .and_then(|(o, l)| image.get(o..o.checked_add(l)?))
        .ok_or_else(|| Error::corrupt("the section lies past the end of the file"))?;
    if crc32c::crc32c(section) != crc {
        return Err(Error::corrupt("section checksum mismatch"));
    }
    if u32_at(section, sec::CODE) != code || u32_at(section, sec::RESERVED) != 0 {
        return Err(Error::corrupt(
            "section header disagrees with the table or has non-zero reserved bytes",
        ));
    }
    let content = layout.content().expect("checked above");
    if section[content..].iter().any(|&b| b != 0) {
        return Err(Error::corrupt("section padding is not zero"));
    }
    let seed = u64_at(section, sec::SEED);
    if kind != TransformKind::Hadamard && seed != 0 {
        return Err(Error::corrupt(format!(
            "a {} transform has no seed, but the section stores {seed}",
            kind.name()
        )));
    }
    let mu = f64_at(section, sec::MU);
    let slice_fraction = f64_at(section, sec::FRACTION);
    let mut pos = SECTION_HEADER_LEN;
    let mut take = |n: usize| {
        let part = &section[pos..pos + n];
        pos += n;
        part
    };
    let f32s = |bytes: &[u8], what: &str| -> Result<Vec<f32>> {
        let v: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        match v.iter().position(|x| !x.is_finite()) {
            Some(i) => Err(Error::corrupt(format!(
                "{what} holds a non-finite value at index {i}"
            ))),
            None => Ok(v),
        }
    };
    let w_uk = f32s(take(layout.w_uk), "W_UK")?;
    let w_uv = f32s(take(layout.w_uv), "W_UV")?;
    let f64s = |bytes: &[u8]| -> Vec<f64> {
        bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect()
    };
    let transform = match kind {
        TransformKind::Pca => {
            let matrix = f64s(take(dims.d_c * dims.d_c * 8));
            let eigenvalues = f64s(take(dims.d_c * 8));
            Transform::from_parts(kind, dims.d_c, None, Some(matrix), Some(eigenvalues))
        }
        TransformKind::Hadamard => Transform::from_parts(kind, dims.d_c, Some(seed), None, None),
        TransformKind::Identity => Transform::from_parts(kind, dims.d_c, None, None, None),
    }
    .map_err(|e| Error::corrupt(format!("transform: {}", e.message())))?;
    let layer = RankLayer::from_f32(w_uk, w_uv, mu, transform, slice_fraction)
        .map_err(|e| Error::corrupt(e.message().to_string()))?;
    if layer.transform_id().fingerprint != u64_at(section, sec::FINGERPRINT) {
        return Err(Error::corrupt(
            "the stored fingerprint is not the fingerprint of the stored transform",
        ));
    }
    Ok(layer)
}
