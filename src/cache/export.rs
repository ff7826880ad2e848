//! The prefill side of disaggregated serving (DESIGN 3.5): cut a full-width latent cache
//! into the `g` shard images, one per latent group, streamed to files or buffers; or,
//! for a hybrid deployment of `g` latent groups times `s` sequence shards
//! ([`HybridPlan`]), into `g * s` images, rank `(i, j)` holding latent slice `i` of the
//! tokens the owner rule puts on sequence shard `j` (in position order, so that a rank's
//! rows are exactly what its decode-time appends would have made).
//!
//! Rows arrive layer by layer, sequence by sequence (the order a prefill produces them
//! and the order of the data region), so an export never holds more than one page.

use super::format::ShardHeader;
use super::{check_representable, ShardSpec, TransformId};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::geometry::{HybridPlan, ModelDims, SequenceSharding};
use std::fs::File;
use std::io::{BufWriter, Cursor, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use tempfile::NamedTempFile;

/// What one export writes: the shard header of every rank (one per latent group
/// without sequence sharding).
#[derive(Clone, Debug, PartialEq)]
pub struct ExportPlan {
    headers: Vec<ShardHeader>,
    groups: usize,
    sharding: SequenceSharding,
    /// Tokens of each sequence in the prefill, over all sequence shards.
    lens: Vec<usize>,
}

impl ExportPlan {
    /// An export of `sequences` (id, tokens), in that order, for a model of
    /// `transforms.len()` layers cut into `groups` latent slices.
    pub fn new(
        dims: ModelDims,
        groups: usize,
        dtype: DType,
        page_size: usize,
        transforms: Vec<TransformId>,
        sequences: &[(u32, usize)],
    ) -> Result<Self> {
        Self::hybrid(
            dims,
            groups,
            SequenceSharding::NONE,
            dtype,
            page_size,
            transforms,
            sequences,
        )
    }

    /// An export for every rank of `groups` latent groups times `sharding.shards`
    /// sequence shards: rank `r = i * shards + j` ([`HybridPlan`]) gets latent slice `i`
    /// of the tokens of each sequence whose position falls on shard `j`, which may be
    /// none (a sequence shorter than the shards' blocks).
    pub fn hybrid(
        dims: ModelDims,
        groups: usize,
        sharding: SequenceSharding,
        dtype: DType,
        page_size: usize,
        transforms: Vec<TransformId>,
        sequences: &[(u32, usize)],
    ) -> Result<Self> {
        let sharding = SequenceSharding::new(sharding.shards, sharding.interleave)?;
        // At least one group, so that a group count of 0 reaches ShardPlan's check.
        let headers = (0..groups.max(1) * sharding.shards)
            .map(|rank| {
                let plan = HybridPlan::new(&dims, groups, sharding, rank)?;
                let spec =
                    ShardSpec::for_hybrid(dims, &plan, dtype, page_size, transforms.clone())?;
                let local = sequences
                    .iter()
                    .map(|&(id, len)| {
                        Ok((id, sharding.tokens_on(plan.shard, len as u64)? as usize))
                    })
                    .collect::<Result<Vec<_>>>()?;
                ShardHeader::for_sequences(spec, &local)
            })
            .collect::<Result<_>>()?;
        Ok(ExportPlan {
            headers,
            groups,
            sharding,
            lens: sequences.iter().map(|&(_, len)| len).collect(),
        })
    }

    /// Latent groups of the export.
    pub fn groups(&self) -> usize {
        self.groups
    }

    /// How the export spreads tokens over sequence shards.
    pub fn sequence_sharding(&self) -> SequenceSharding {
        self.sharding
    }

    /// Shard images of the export: `groups * sequence shards`.
    pub fn ranks(&self) -> usize {
        self.headers.len()
    }

    /// The header of rank `rank`'s shard (of latent group `rank` without sequence
    /// sharding).
    pub fn header(&self, rank: usize) -> Option<&ShardHeader> {
        self.headers.get(rank)
    }

    /// Bytes of rank 0's shard image: of every image without sequence sharding (all
    /// latent groups have the same size); see [`Self::image_len_of`] with it.
    pub fn image_len(&self) -> usize {
        self.headers[0].image_len()
    }

    /// Bytes of rank `rank`'s shard image (sequence shards hold different token counts).
    pub fn image_len_of(&self, rank: usize) -> Option<usize> {
        self.headers.get(rank).map(ShardHeader::image_len)
    }
}

/// Streams an export into one sink per rank (per latent group without sequence
/// sharding). Call [`push`](Self::push) once per
/// (layer, sequence) in that order — layer-major, sequences in the plan's order — then
/// [`finish`](Self::finish).
pub struct ShardWriter<W: Write + Seek> {
    headers: Vec<ShardHeader>,
    /// Tokens of each sequence over all sequence shards.
    lens: Vec<usize>,
    sinks: Vec<W>,
    data_crcs: Vec<u32>,
    /// Index of the next (layer, sequence) block: `layer * sequences + sequence`.
    next: usize,
    page: Vec<u8>,
    /// Set when a sink failed: its contents are then unknown.
    failed: bool,
}

impl<W: Write + Seek> ShardWriter<W> {
    /// Writes the metadata of every rank's shard into `sinks` (one per rank, at
    /// position 0). The data checksum is filled in by `finish`.
    pub fn new(plan: &ExportPlan, mut sinks: Vec<W>) -> Result<Self> {
        if sinks.len() != plan.ranks() {
            let what = if plan.ranks() == plan.groups() {
                format!("{} latent groups", plan.groups())
            } else {
                format!(
                    "{} ranks ({} latent groups x {} sequence shards)",
                    plan.ranks(),
                    plan.groups(),
                    plan.sharding.shards
                )
            };
            return Err(Error::invalid(format!(
                "{} sinks for an export of {what}",
                sinks.len()
            )));
        }
        for (h, sink) in plan.headers.iter().zip(&mut sinks) {
            sink.write_all(&h.encode())?;
        }
        let spec = plan.headers[0].spec();
        Ok(ShardWriter {
            headers: plan.headers.clone(),
            lens: plan.lens.clone(),
            data_crcs: vec![0; sinks.len()],
            sinks,
            next: 0,
            page: vec![0; spec.page_stride()],
            failed: false,
        })
    }

    /// The (layer, sequence id) the next `push` must carry, or `None` when all are written.
    pub fn next_block(&self) -> Option<(usize, u32)> {
        let h = &self.headers[0];
        let n = h.sequences().len();
        (self.next < n * h.spec().layers())
            .then(|| (self.next / n, h.sequences()[self.next % n].id))
    }

    /// Writes the rows of the next (layer, sequence): `latent` is the full-width rotated
    /// normalised latent, `[len][d_c]`; `rope` the RoPE keys, `[len][d_r]`, of every
    /// token of the sequence. Group `i`'s shard gets columns `[i*w, (i+1)*w)` of each
    /// latent row, then its RoPE key; with sequence shards, rank `(i, j)` gets those of
    /// the tokens whose position falls on shard `j`.
    pub fn push(&mut self, latent: &[f64], rope: &[f64]) -> Result<()> {
        if self.failed {
            return Err(Error::invalid("an earlier write of this export failed"));
        }
        let Some((layer, id)) = self.next_block() else {
            return Err(Error::invalid(
                "every layer of every sequence is already written",
            ));
        };
        let h = &self.headers[0];
        let spec = h.spec();
        let len = self.lens[self.next % h.sequences().len()];
        let (d_c, d_r) = (spec.dims().d_c, spec.dims().d_r);
        // no overflow: the plan checked that len tokens of every layer fit in memory
        if Some(latent.len()) != len.checked_mul(d_c) || Some(rope.len()) != len.checked_mul(d_r) {
            return Err(Error::invalid(format!(
                "layer {layer}, sequence {id}: expected {len} tokens ({} latent and {} RoPE \
                 values), got {} and {}",
                len * d_c,
                len * d_r,
                latent.len(),
                rope.len()
            )));
        }
        let what = format!("layer {layer}, sequence {id}");
        check_representable(spec.dtype(), latent, &what)?;
        check_representable(spec.dtype(), rope, &what)?;
        self.failed = true;
        let k = self.next % h.sequences().len();
        for r in 0..self.sinks.len() {
            self.write_slice(r, k, latent, rope)?;
        }
        self.failed = false;
        self.next += 1;
        Ok(())
    }

    /// Writes rank `group`'s rows of sequence `k` (the table's `k`th).
    fn write_slice(&mut self, group: usize, k: usize, latent: &[f64], rope: &[f64]) -> Result<()> {
        let header = &self.headers[group];
        let spec = header.spec();
        let (sharding, shard) = (spec.sequence_sharding(), spec.sequence_shard());
        // this rank's tokens of the sequence, whose rows are those of positions
        // `position_of(shard, 0..tokens)`
        let tokens = header.sequences()[k].len;
        let (dt, ps, d_c, d_r) = (
            spec.dtype(),
            spec.page_size(),
            spec.dims().d_c,
            spec.dims().d_r,
        );
        let (w, start) = (spec.slice_width(), spec.slice_start());
        let row_bytes = spec.row_bytes();
        let mut values = vec![0.0; w + d_r];
        for first in (0..tokens).step_by(ps) {
            self.page.fill(0);
            for t in first..(first + ps).min(tokens) {
                let row = &mut self.page[(t - first) * row_bytes..][..row_bytes];
                // below the sequence's length: tokens_on counted exactly these positions
                let p = sharding.position_of(shard, t as u64) as usize;
                values[..w].copy_from_slice(&latent[p * d_c + start..][..w]);
                values[w..].copy_from_slice(&rope[p * d_r..][..d_r]);
                dt.encode_row(&values, w, row);
            }
            self.sinks[group].write_all(&self.page)?;
            self.data_crcs[group] = crc32c::crc32c_append(self.data_crcs[group], &self.page);
        }
        Ok(())
    }

    /// Completes every image (data checksum into the header) and returns the sinks,
    /// positioned at their end and flushed.
    pub fn finish(mut self) -> Result<Vec<W>> {
        if self.failed {
            return Err(Error::invalid("an earlier write of this export failed"));
        }
        if let Some((layer, id)) = self.next_block() {
            return Err(Error::invalid(format!(
                "the export is incomplete: layer {layer} of sequence {id} was not written"
            )));
        }
        for ((h, sink), crc) in self
            .headers
            .iter_mut()
            .zip(&mut self.sinks)
            .zip(&self.data_crcs)
        {
            h.set_data_crc(*crc);
            sink.seek(SeekFrom::Start(0))?;
            sink.write_all(&h.encode())?;
            sink.seek(SeekFrom::End(0))?;
            sink.flush()?;
        }
        Ok(self.sinks)
    }
}

impl<'a> ShardWriter<Cursor<&'a mut [u8]>> {
    /// An export into caller memory: one buffer per rank of exactly
    /// [`ExportPlan::image_len_of`] bytes (all [`ExportPlan::image_len`] without
    /// sequence sharding), which afterwards hold the same bytes as the shard files would.
    pub fn to_buffers(plan: &ExportPlan, buffers: Vec<&'a mut [u8]>) -> Result<Self> {
        for (g, b) in buffers.iter().enumerate() {
            let Some(want) = plan.image_len_of(g) else {
                break; // too many buffers: `new` says so
            };
            if b.len() != want {
                return Err(Error::invalid(format!(
                    "buffer {g} holds {} bytes, a shard image of this export is {want} \
                     (rank {g}'s)",
                    b.len(),
                )));
            }
        }
        Self::new(plan, buffers.into_iter().map(Cursor::new).collect())
    }
}

/// An export into the shard files, one per rank (`g`, or `g * s` with sequence shards). Rows go to temporary files next to their
/// destinations; [`commit`](Self::commit) syncs them and renames them into place, so a
/// reader never sees a half-written shard. Dropping the writer before `commit` removes
/// the temporary files.
pub struct ShardFileWriter {
    writer: ShardWriter<BufWriter<NamedTempFile>>,
    paths: Vec<PathBuf>,
}

impl ShardFileWriter {
    /// `paths[r]` receives rank `r`'s shard (group `r`'s without sequence sharding); they
    /// must name distinct files.
    pub fn create(plan: &ExportPlan, paths: &[impl AsRef<Path>]) -> Result<Self> {
        let paths: Vec<PathBuf> = paths.iter().map(|p| p.as_ref().to_path_buf()).collect();
        check_distinct(&paths)?;
        let temps = paths
            .iter()
            .map(|p| {
                let temp =
                    crate::files::temp_file_in(parent_dir(p), ".tpla-shard-").map_err(|e| {
                        Error::from(e).context(format!("creating a file next to {}", p.display()))
                    })?;
                Ok(BufWriter::with_capacity(1 << 20, temp))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ShardFileWriter {
            writer: ShardWriter::new(plan, temps)?,
            paths,
        })
    }

    /// See [`ShardWriter::next_block`].
    pub fn next_block(&self) -> Option<(usize, u32)> {
        self.writer.next_block()
    }

    /// See [`ShardWriter::push`].
    pub fn push(&mut self, latent: &[f64], rope: &[f64]) -> Result<()> {
        self.writer.push(latent, rope)
    }

    /// Completes the images, fsyncs them, renames them to their paths and fsyncs the
    /// directories, so that the files survive a crash once this returns.
    pub fn commit(self) -> Result<()> {
        let sinks = self.writer.finish()?;
        for (sink, path) in sinks.into_iter().zip(&self.paths) {
            let at = |e: std::io::Error| Error::from(e).context(path.display());
            let temp = sink.into_inner().map_err(|e| at(e.into_error()))?;
            temp.as_file().sync_all().map_err(at)?;
            temp.persist(path).map_err(|e| at(e.error))?;
            File::open(parent_dir(path))
                .and_then(|dir| dir.sync_all())
                .map_err(at)?;
        }
        Ok(())
    }
}

/// Refuses two groups aimed at one file: the second rename would silently replace the
/// first shard. Paths are compared by their directory's canonical form and their file
/// name, so `d/x` and `d/./x` (or a symlinked directory) are the same file.
fn check_distinct(paths: &[PathBuf]) -> Result<()> {
    let mut seen = std::collections::HashMap::new();
    for (group, path) in paths.iter().enumerate() {
        let dir = std::fs::canonicalize(parent_dir(path))
            .map_err(|e| Error::from(e).context(format!("the directory of {}", path.display())))?;
        let name = path
            .file_name()
            .ok_or_else(|| Error::invalid(format!("{} does not name a file", path.display())))?;
        if let Some(first) = seen.insert(dir.join(name), group) {
            return Err(Error::invalid(format!(
                "groups {first} and {group} would both be written to {}: every group needs \
                 its own shard file",
                path.display()
            )));
        }
    }
    Ok(())
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}
