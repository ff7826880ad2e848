//! The shard file format, versions 1 and 2: one rank's slice of an exported prefill cache.
//!
//! docs/shard-format.md is the byte-level description; this module is the authority.
//! All integers little-endian. Version 2 is version 1 plus a 16-byte sequence-shard block
//! after the fixed header (sequence shards, shard index, interleave, reserved zero); it
//! is written only for a shard of a sequence-sharded deployment (more than one sequence
//! shard), so that every other file keeps the bytes of version 1 and a reader of
//! version 1 refuses a sequence shard as an unsupported version.
//!
//! ```text
//! [0, 128)            fixed header (field offsets below)
//! [128, 144)          version 2 only: the sequence-shard block
//! [lt, lt + 16 L)     layer table: per layer  u32 transform code, u32 zero, u64 fingerprint
//! [st, st + 24 S)     sequence table: per seq u32 id, u32 zero, u64 length, u64 first page
//! [data, data + len)  pages, [layer][page][page_stride bytes], data % 4096 == 0
//! ```
//!
//! Checksums (CRC-32C): the header checksum covers header bytes 16..128 (16..144 in
//! version 2: everything after magic, version and itself); the tables checksum covers the layer table then the
//! sequence table; the data checksum covers the data region. Parsing checks the first
//! two; the data checksum is checked on demand ([`ShardHeader::verify_data`]) because
//! registration must not read the data.
//!
//! The placement is fixed: layer table right after the header (128, or 144), sequence table right after it, data at
//! the next multiple of 4096, zero bytes between; so every metadata byte is checked
//! (magic, version, checksums, or zero padding).
//!
//! Within a layer, sequence `k` owns pages `[first_page_k, first_page_k +
//! ceil(len_k / page_size))`; sequences follow each other in table order with no gap,
//! and the last page of a sequence is zero past its end.

use super::{ShardSpec, TransformId, MAX_LAYERS, MAX_PAGE_SIZE};
use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result};
use crate::geometry::{ModelDims, SequenceSharding, ShardPlan};
use crate::le::{f64_at, put_u32, put_u64, u32_at, u64_at};
use crate::transform::TransformKind;
use std::collections::HashSet;

/// First eight bytes of every shard file.
pub const MAGIC: [u8; 8] = *b"TPLASHRD";
/// Version of a shard that holds every token of its sequences (no sequence sharding).
pub const FORMAT_VERSION: u32 = 1;
/// Version of a shard of one sequence shard of several: version 1 plus the
/// sequence-shard block. This build reads both.
pub const SEQUENCE_SHARD_VERSION: u32 = 2;
/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 128;
/// Bytes of version 2's sequence-shard block, right after the fixed header.
pub const SEQUENCE_BLOCK_LEN: usize = 16;

/// Bytes before the layer table in a file of format `version` (1 or 2).
pub fn header_len(version: u32) -> usize {
    if version == SEQUENCE_SHARD_VERSION {
        HEADER_LEN + SEQUENCE_BLOCK_LEN
    } else {
        HEADER_LEN
    }
}

/// The version a shard of `spec` is written in.
fn version_of(spec: &ShardSpec) -> u32 {
    if spec.is_sequence_shard() {
        SEQUENCE_SHARD_VERSION
    } else {
        FORMAT_VERSION
    }
}
/// Bytes of one layer table entry.
pub const LAYER_ENTRY_LEN: usize = 16;
/// Bytes of one sequence table entry.
pub const SEQUENCE_ENTRY_LEN: usize = 24;
/// Alignment of the data region in the file: an operating-system page, so that mapped
/// pages keep the 64-byte alignment of the page stride.
pub const DATA_ALIGN: usize = 4096;

/// Byte offsets of the fixed header's fields.
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
    pub const GROUP: usize = 40;
    pub const DTYPE: usize = 44;
    pub const SOFTMAX_SCALE: usize = 48;
    pub const PAGE_SIZE: usize = 56;
    pub const LAYERS: usize = 60;
    pub const SEQUENCES: usize = 64;
    pub const TABLES_CRC: usize = 68;
    pub const PAGES_PER_LAYER: usize = 72;
    pub const PAGE_STRIDE: usize = 80;
    pub const LAYER_TABLE: usize = 88;
    pub const SEQUENCE_TABLE: usize = 96;
    pub const DATA_OFFSET: usize = 104;
    pub const DATA_LEN: usize = 112;
    pub const DATA_CRC: usize = 120;
    pub const RESERVED: usize = 124;
    // version 2's sequence-shard block
    pub const SEQ_SHARDS: usize = 128;
    pub const SEQ_SHARD: usize = 132;
    pub const SEQ_INTERLEAVE: usize = 136;
    pub const SEQ_RESERVED: usize = 140;
}

/// One entry of the sequence table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SequenceEntry {
    pub id: u32,
    /// Tokens, the same in every layer.
    pub len: usize,
    /// First page of the sequence within each layer's pages.
    pub first_page: usize,
}

/// The validated metadata of a shard image (file or buffer).
#[derive(Clone, Debug, PartialEq)]
pub struct ShardHeader {
    spec: ShardSpec,
    sequences: Vec<SequenceEntry>,
    pages_per_layer: usize,
    layer_table_offset: usize,
    sequence_table_offset: usize,
    data_offset: usize,
    data_len: usize,
    data_crc: u32,
}

fn overflow(what: &str) -> Error {
    Error::corrupt(format!("header: {what} overflows"))
}

/// A u64 file field as usize, naming the field if it does not fit.
fn usize_field(b: &[u8], off: usize, name: &str) -> Result<usize> {
    let v = u64_at(b, off);
    usize::try_from(v).map_err(|_| Error::corrupt(format!("{name} {v} does not fit in memory")))
}

impl ShardHeader {
    /// The layout of a shard holding `sequences` (id, tokens), in that order.
    pub fn for_sequences(spec: ShardSpec, sequences: &[(u32, usize)]) -> Result<Self> {
        let mut seen = HashSet::new();
        let mut entries = Vec::with_capacity(sequences.len());
        let mut pages = 0usize;
        for &(id, len) in sequences {
            if !seen.insert(id) {
                return Err(Error::invalid(format!(
                    "sequence {id} appears twice in the export"
                )));
            }
            entries.push(SequenceEntry {
                id,
                len,
                first_page: pages,
            });
            pages = pages
                .checked_add(len.div_ceil(spec.page_size()))
                .ok_or_else(|| Error::invalid("page count of the export overflows"))?;
        }
        let too_big = || Error::invalid("the export is too large to address");
        if u32::try_from(sequences.len()).is_err() {
            return Err(too_big());
        }
        let layer_table_offset = header_len(version_of(&spec));
        let sequence_table_offset = layer_table_offset + LAYER_ENTRY_LEN * spec.layers();
        let tables_end = sequences
            .len()
            .checked_mul(SEQUENCE_ENTRY_LEN)
            .and_then(|n| n.checked_add(sequence_table_offset))
            .ok_or_else(too_big)?;
        let data_offset = tables_end
            .checked_next_multiple_of(DATA_ALIGN)
            .ok_or_else(too_big)?;
        let data_len = pages
            .checked_mul(spec.layers())
            .and_then(|n| n.checked_mul(spec.page_stride()))
            .filter(|n| n.checked_add(data_offset).is_some())
            .ok_or_else(too_big)?;
        Ok(ShardHeader {
            spec,
            sequences: entries,
            pages_per_layer: pages,
            layer_table_offset,
            sequence_table_offset,
            data_offset,
            data_len,
            data_crc: 0,
        })
    }

    /// What the shard holds: dims, group, element type, page size, transforms.
    pub fn spec(&self) -> &ShardSpec {
        &self.spec
    }
    /// The format version of the image: [`FORMAT_VERSION`], or [`SEQUENCE_SHARD_VERSION`]
    /// for a sequence shard.
    pub fn version(&self) -> u32 {
        version_of(&self.spec)
    }
    pub fn sequences(&self) -> &[SequenceEntry] {
        &self.sequences
    }
    /// Pages of every layer (the sum over sequences of `ceil(len / page_size)`).
    pub fn pages_per_layer(&self) -> usize {
        self.pages_per_layer
    }
    /// Offset of the data region: the metadata (header, tables, padding) before it.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }
    pub fn data_len(&self) -> usize {
        self.data_len
    }
    pub fn data_crc(&self) -> u32 {
        self.data_crc
    }
    pub(crate) fn set_data_crc(&mut self, crc: u32) {
        self.data_crc = crc;
    }
    /// Bytes of the whole image.
    pub fn image_len(&self) -> usize {
        self.data_offset + self.data_len
    }
    /// Offset in the image of page `page` of layer `layer`.
    pub fn page_offset(&self, layer: usize, page: usize) -> usize {
        self.data_offset + (layer * self.pages_per_layer + page) * self.spec.page_stride()
    }

    /// The metadata bytes `[0, data_offset)`: header, tables, zero padding.
    pub fn encode(&self) -> Vec<u8> {
        let s = &self.spec;
        let d = s.dims();
        let mut b = vec![0u8; self.data_offset];
        b[at::MAGIC..at::MAGIC + 8].copy_from_slice(&MAGIC);
        let version = version_of(s);
        put_u32(&mut b, at::VERSION, version);
        if version == SEQUENCE_SHARD_VERSION {
            let sh = s.sequence_sharding();
            // at most 64 shards and 2^20 tokens: SequenceSharding checks
            put_u32(&mut b, at::SEQ_SHARDS, sh.shards as u32);
            put_u32(&mut b, at::SEQ_SHARD, s.sequence_shard() as u32);
            put_u32(&mut b, at::SEQ_INTERLEAVE, sh.interleave as u32);
        }
        // Every width, count and code fits in u32: ShardSpec and for_sequences check.
        for (off, v) in [
            (at::HEADS, d.heads),
            (at::D_C, d.d_c),
            (at::D_R, d.d_r),
            (at::D_N, d.d_n),
            (at::D_V, d.d_v),
            (at::GROUPS, s.groups()),
            (at::GROUP, s.group()),
            (at::PAGE_SIZE, s.page_size()),
            (at::LAYERS, s.layers()),
            (at::SEQUENCES, self.sequences.len()),
        ] {
            put_u32(&mut b, off, v as u32);
        }
        put_u32(&mut b, at::DTYPE, s.dtype().code());
        put_u32(&mut b, at::DATA_CRC, self.data_crc);
        put_u64(&mut b, at::SOFTMAX_SCALE, d.softmax_scale.to_bits());
        put_u64(&mut b, at::PAGES_PER_LAYER, self.pages_per_layer as u64);
        put_u64(&mut b, at::PAGE_STRIDE, s.page_stride() as u64);
        put_u64(&mut b, at::LAYER_TABLE, self.layer_table_offset as u64);
        put_u64(
            &mut b,
            at::SEQUENCE_TABLE,
            self.sequence_table_offset as u64,
        );
        put_u64(&mut b, at::DATA_OFFSET, self.data_offset as u64);
        put_u64(&mut b, at::DATA_LEN, self.data_len as u64);

        let mut off = self.layer_table_offset;
        for t in s.transforms() {
            put_u32(&mut b, off, t.code);
            put_u64(&mut b, off + 8, t.fingerprint);
            off += LAYER_ENTRY_LEN;
        }
        let mut off = self.sequence_table_offset;
        for e in &self.sequences {
            put_u32(&mut b, off, e.id);
            put_u64(&mut b, off + 8, e.len as u64);
            put_u64(&mut b, off + 16, e.first_page as u64);
            off += SEQUENCE_ENTRY_LEN;
        }
        let tables_crc = self.tables_crc(&b);
        put_u32(&mut b, at::TABLES_CRC, tables_crc);
        let header_crc = crc32c::crc32c(&b[at::HEADS..header_len(version)]);
        put_u32(&mut b, at::HEADER_CRC, header_crc);
        b
    }

    fn tables_crc(&self, b: &[u8]) -> u32 {
        let lt = self.layer_table_offset;
        let st = self.sequence_table_offset;
        let layers = &b[lt..lt + LAYER_ENTRY_LEN * self.spec.layers()];
        let seqs = &b[st..st + SEQUENCE_ENTRY_LEN * self.sequences.len()];
        crc32c::crc32c_append(crc32c::crc32c(layers), seqs)
    }

    /// Reads and validates the metadata of a shard image. Every field, count, offset and
    /// length is checked against `image.len()` (with checked arithmetic) before anything
    /// past the metadata is touched; data bytes are never read.
    pub fn parse(image: &[u8]) -> Result<Self> {
        let n = image.len();
        if n >= MAGIC.len() && image[..MAGIC.len()] != MAGIC {
            return Err(Error::corrupt(
                "not a shard file: the magic bytes are wrong",
            ));
        }
        if n < HEADER_LEN {
            return Err(Error::corrupt(format!(
                "truncated: {n} bytes, shorter than the {HEADER_LEN}-byte header"
            )));
        }
        let version = u32_at(image, at::VERSION);
        if version != FORMAT_VERSION && version != SEQUENCE_SHARD_VERSION {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "shard format version {version} is not supported (this build reads \
                     {FORMAT_VERSION} and {SEQUENCE_SHARD_VERSION})"
                ),
            ));
        }
        let hl = header_len(version);
        if n < hl {
            return Err(Error::corrupt(format!(
                "truncated: {n} bytes, shorter than the {hl}-byte header of version {version}"
            )));
        }
        let b = &image[..hl];
        let stored = u32_at(b, at::HEADER_CRC);
        let computed = crc32c::crc32c(&b[at::HEADS..]);
        if stored != computed {
            return Err(Error::corrupt(format!(
                "header checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): \
                 the header is corrupted"
            )));
        }

        let field = |off| u32_at(b, off) as usize;
        let dims = ModelDims::new(
            field(at::HEADS),
            field(at::D_C),
            field(at::D_R),
            field(at::D_N),
            field(at::D_V),
            f64_at(b, at::SOFTMAX_SCALE),
        )
        .map_err(|e| Error::corrupt(format!("header: {}", e.message())))?;
        let (groups, group) = (field(at::GROUPS), field(at::GROUP));
        if group >= groups {
            return Err(Error::corrupt(format!(
                "header: group index {group} is out of range for {groups} latent groups"
            )));
        }
        let plan = ShardPlan::new(&dims, groups, group)
            .map_err(|e| Error::corrupt(format!("header: {}", e.message())))?;
        let dtype = DType::from_code(u32_at(b, at::DTYPE))
            .map_err(|e| Error::corrupt(format!("header: {}", e.message())))?;
        let page_size = field(at::PAGE_SIZE);
        if page_size == 0 || page_size > MAX_PAGE_SIZE {
            return Err(Error::corrupt(format!(
                "header: page size {page_size} is outside 1..={MAX_PAGE_SIZE} tokens"
            )));
        }
        let layers = field(at::LAYERS);
        if layers == 0 || layers > MAX_LAYERS {
            return Err(Error::corrupt(format!(
                "header: layer count {layers} is outside 1..={MAX_LAYERS}"
            )));
        }
        let seq_count = field(at::SEQUENCES);
        let reserved = u32_at(b, at::RESERVED);
        if reserved != 0 {
            return Err(Error::corrupt(format!(
                "header: reserved field is {reserved:#x}, must be zero"
            )));
        }
        let row_bytes = dtype.row_bytes(plan.slice_width, dims.d_r) as u64;
        let page_stride = (page_size as u64 * row_bytes).next_multiple_of(64);
        if u64_at(b, at::PAGE_STRIDE) != page_stride {
            return Err(Error::corrupt(format!(
                "header: page stride is {} bytes, expected {page_stride} for {page_size} rows \
                 of {row_bytes} bytes",
                u64_at(b, at::PAGE_STRIDE)
            )));
        }

        // Regions, in the one placement writers use: header, layer table, sequence
        // table, zero padding to the aligned data offset, data up to the end of the file.
        let lt = usize_field(b, at::LAYER_TABLE, "layer table offset")?;
        let st = usize_field(b, at::SEQUENCE_TABLE, "sequence table offset")?;
        let data_offset = usize_field(b, at::DATA_OFFSET, "data offset")?;
        let data_len = usize_field(b, at::DATA_LEN, "data length")?;
        let pages_per_layer = usize_field(b, at::PAGES_PER_LAYER, "pages per layer")?;
        let sharding = if version == SEQUENCE_SHARD_VERSION {
            let (shards, shard, interleave) = (
                field(at::SEQ_SHARDS),
                field(at::SEQ_SHARD),
                field(at::SEQ_INTERLEAVE),
            );
            let sh = SequenceSharding::new(shards, interleave)
                .map_err(|e| Error::corrupt(format!("header: {}", e.message())))?;
            if shards == 1 {
                return Err(Error::corrupt(
                    "header: a version 2 file holds one sequence shard of several, but its \
                     sequence shard count is 1 (such a file is version 1)",
                ));
            }
            if shard >= shards {
                return Err(Error::corrupt(format!(
                    "header: sequence shard {shard} is out of range for {shards} sequence shards"
                )));
            }
            let reserved = u32_at(b, at::SEQ_RESERVED);
            if reserved != 0 {
                return Err(Error::corrupt(format!(
                    "header: sequence-shard reserved field is {reserved:#x}, must be zero"
                )));
            }
            Some((sh, shard))
        } else {
            None
        };
        let lt_end = hl + layers * LAYER_ENTRY_LEN;
        let st_end = seq_count
            .checked_mul(SEQUENCE_ENTRY_LEN)
            .and_then(|len| len.checked_add(lt_end))
            .ok_or_else(|| overflow("sequence table end"))?;
        let aligned = st_end
            .checked_next_multiple_of(DATA_ALIGN)
            .ok_or_else(|| overflow("data offset"))?;
        for (name, got, want, before) in [
            ("layer table offset", lt, hl, "the header"),
            ("sequence table offset", st, lt_end, "the layer table"),
            ("data offset", data_offset, aligned, "the sequence table"),
        ] {
            if got < want {
                return Err(Error::corrupt(format!(
                    "header: {name} {got} overlaps {before} (expected {want})"
                )));
            }
            if got > want {
                return Err(Error::corrupt(format!(
                    "header: {name} is {got}, expected {want}: a gap after {before}"
                )));
            }
        }
        let expected_len = pages_per_layer
            .checked_mul(layers)
            .and_then(|p| p.checked_mul(page_stride as usize))
            .ok_or_else(|| overflow("data length of pages per layer x layers x page stride"))?;
        if data_len != expected_len {
            return Err(Error::corrupt(format!(
                "header: data length is {data_len} bytes, but {layers} layers of \
                 {pages_per_layer} pages of {page_stride} bytes make {expected_len}"
            )));
        }
        let end = data_offset
            .checked_add(data_len)
            .ok_or_else(|| overflow("data end"))?;
        if n < end {
            return Err(Error::corrupt(format!(
                "truncated: the file is {n} bytes but its header describes {end}"
            )));
        }
        if n > end {
            return Err(Error::corrupt(format!(
                "{} unexpected bytes after the data region (file {n} bytes, data ends at {end})",
                n - end
            )));
        }

        // The tables and the padding lie inside [hl, data_offset) now, and
        // data_offset <= n. Zero padding leaves no metadata byte unchecked.
        if let Some(i) = image[st_end..data_offset].iter().position(|&x| x != 0) {
            return Err(Error::corrupt(format!(
                "padding byte at offset {} before the data is not zero",
                st_end + i
            )));
        }
        let stored = u32_at(b, at::TABLES_CRC);
        let computed =
            crc32c::crc32c_append(crc32c::crc32c(&image[lt..lt_end]), &image[st..st_end]);
        if stored != computed {
            return Err(Error::corrupt(format!(
                "table checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): \
                 the layer or sequence table is corrupted"
            )));
        }
        let mut transforms = Vec::with_capacity(layers);
        for (layer, e) in image[lt..lt_end].chunks_exact(LAYER_ENTRY_LEN).enumerate() {
            if u32_at(e, 4) != 0 {
                return Err(Error::corrupt(format!(
                    "layer table entry {layer}: reserved field must be zero"
                )));
            }
            let code = u32_at(e, 0);
            if TransformKind::from_code(code).is_err() {
                return Err(Error::corrupt(format!(
                    "layer table entry {layer}: unknown transform code {code} (0 identity, \
                     1 hadamard, 2 pca)"
                )));
            }
            transforms.push(TransformId {
                code,
                fingerprint: u64_at(e, 8),
            });
        }
        let mut sequences = Vec::with_capacity(seq_count);
        let mut seen = HashSet::with_capacity(seq_count);
        let mut next_page = 0usize;
        for (k, e) in image[st..st_end]
            .chunks_exact(SEQUENCE_ENTRY_LEN)
            .enumerate()
        {
            let id = u32_at(e, 0);
            let what = || format!("sequence table entry {k} (id {id})");
            if u32_at(e, 4) != 0 {
                return Err(Error::corrupt(format!(
                    "{}: reserved field must be zero",
                    what()
                )));
            }
            if !seen.insert(id) {
                return Err(Error::corrupt(format!("{}: the id appears twice", what())));
            }
            let len = usize_field(e, 8, "sequence length")?;
            let first_page = usize_field(e, 16, "first page")?;
            if first_page != next_page {
                return Err(Error::corrupt(format!(
                    "{}: starts at page {first_page}, but the sequences before it end at \
                     page {next_page} (sequences must follow each other without gap or overlap)",
                    what()
                )));
            }
            next_page = next_page
                .checked_add(len.div_ceil(page_size))
                .filter(|&p| p <= pages_per_layer)
                .ok_or_else(|| {
                    Error::corrupt(format!(
                        "{}: {len} tokens run past the {pages_per_layer} pages of a layer",
                        what()
                    ))
                })?;
            sequences.push(SequenceEntry {
                id,
                len,
                first_page,
            });
        }
        if next_page != pages_per_layer {
            return Err(Error::corrupt(format!(
                "header: the sequences fill {next_page} pages per layer, the header says \
                 {pages_per_layer}"
            )));
        }
        let mut spec = ShardSpec::new(dims, &plan, dtype, page_size, transforms)
            .map_err(|e| Error::corrupt(format!("header: {}", e.message())))?;
        if let Some((sh, shard)) = sharding {
            spec = spec.with_sequence_shard(sh, shard).expect("checked above");
        }
        debug_assert_eq!(spec.page_stride() as u64, page_stride);
        Ok(ShardHeader {
            spec,
            sequences,
            pages_per_layer,
            layer_table_offset: lt,
            sequence_table_offset: st,
            data_offset,
            data_len,
            data_crc: u32_at(b, at::DATA_CRC),
        })
    }

    /// Checks the data checksum of `image` (the image this header was parsed from).
    /// Reads the whole data region.
    pub fn verify_data(&self, image: &[u8]) -> Result<()> {
        if image.len() != self.image_len() {
            return Err(Error::invalid(format!(
                "image is {} bytes, the header describes {}",
                image.len(),
                self.image_len()
            )));
        }
        let computed = crc32c::crc32c(&image[self.data_offset..]);
        if computed != self.data_crc {
            return Err(Error::corrupt(format!(
                "data checksum mismatch (stored {:#010x}, computed {computed:#010x}): the \
                 cached rows are corrupted",
                self.data_crc
            )));
        }
        Ok(())
    }

    /// Refuses a shard that does not belong to a cache of `expected`, naming the first
    /// field that differs.
    pub fn check_matches(&self, expected: &ShardSpec) -> Result<()> {
        let (f, e) = (&self.spec, expected);
        let (fd, ed) = (f.dims(), e.dims());
        for (name, file, want) in [
            ("heads", fd.heads, ed.heads),
            ("latent width d_c", fd.d_c, ed.d_c),
            ("RoPE width d_r", fd.d_r, ed.d_r),
            ("no-RoPE width d_n", fd.d_n, ed.d_n),
            ("value width d_v", fd.d_v, ed.d_v),
            ("latent group count", f.groups(), e.groups()),
        ] {
            if file != want {
                return Err(Error::mismatch(format!(
                    "the shard has {name} {file}, this cache expects {want}"
                )));
            }
        }
        if fd.softmax_scale.to_bits() != ed.softmax_scale.to_bits() {
            return Err(Error::mismatch(format!(
                "the shard has softmax scale {}, this cache expects {}",
                fd.softmax_scale, ed.softmax_scale
            )));
        }
        if f.group() != e.group() {
            return Err(Error::mismatch(format!(
                "the shard holds latent group {} of {}, this cache is group {}: the file \
                 belongs to another rank",
                f.group(),
                f.groups(),
                e.group()
            )));
        }
        let (fs, es) = (f.sequence_sharding(), e.sequence_sharding());
        if fs != es {
            return Err(Error::mismatch(format!(
                "the shard was cut for {} sequence shards of interleave {}, this cache is \
                 one of {} sequence shards of interleave {}",
                fs.shards, fs.interleave, es.shards, es.interleave
            )));
        }
        if f.sequence_shard() != e.sequence_shard() {
            return Err(Error::mismatch(format!(
                "the shard holds sequence shard {} of {}, this cache is sequence shard {}: \
                 the file belongs to another rank",
                f.sequence_shard(),
                fs.shards,
                e.sequence_shard()
            )));
        }
        if f.dtype() != e.dtype() {
            return Err(Error::mismatch(format!(
                "the shard stores {}, this cache stores {}",
                f.dtype().name(),
                e.dtype().name()
            )));
        }
        if f.page_size() != e.page_size() {
            return Err(Error::mismatch(format!(
                "the shard has pages of {} tokens, this cache {}",
                f.page_size(),
                e.page_size()
            )));
        }
        if f.layers() != e.layers() {
            return Err(Error::mismatch(format!(
                "the shard has {} layers, this cache {}",
                f.layers(),
                e.layers()
            )));
        }
        for (layer, (tf, te)) in f.transforms().iter().zip(e.transforms()).enumerate() {
            if tf != te {
                return Err(Error::mismatch(format!(
                    "layer {layer}: the shard was rotated by transform code {} fingerprint \
                     {:#018x}, this cache expects code {} fingerprint {:#018x}",
                    tf.code, tf.fingerprint, te.code, te.fingerprint
                )));
            }
        }
        Ok(())
    }
}
