//! The prefill side of disaggregated serving (DESIGN 3.5): cut a full-width latent cache
//! into the `g` shard images, one per latent group, streamed to files or buffers.
//!
//! Rows arrive layer by layer, sequence by sequence (the order a prefill produces them
//! and the order of the data region), so an export never holds more than one page.

use super::format::ShardHeader;
use super::{check_representable, ShardSpec, TransformId};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::geometry::{ModelDims, ShardPlan};
use std::fs::File;
use std::io::{BufWriter, Cursor, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use tempfile::NamedTempFile;

/// What one export writes: the shard header of every latent group.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportPlan {
    headers: Vec<ShardHeader>,
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
        // At least one group, so that a group count of 0 reaches ShardPlan's check.
        let headers = (0..groups.max(1))
            .map(|group| {
                let plan = ShardPlan::new(&dims, groups, group)?;
                let spec = ShardSpec::new(dims, &plan, dtype, page_size, transforms.clone())?;
                ShardHeader::for_sequences(spec, sequences)
            })
            .collect::<Result<_>>()?;
        Ok(ExportPlan { headers })
    }

    pub fn groups(&self) -> usize {
        self.headers.len()
    }

    /// The header of group `group`'s shard.
    pub fn header(&self, group: usize) -> Option<&ShardHeader> {
        self.headers.get(group)
    }

    /// Bytes of each shard image (all groups have the same size).
    pub fn image_len(&self) -> usize {
        self.headers[0].image_len()
    }
}

/// Streams an export into one sink per latent group. Call [`push`](Self::push) once per
/// (layer, sequence) in that order — layer-major, sequences in the plan's order — then
/// [`finish`](Self::finish).
pub struct ShardWriter<W: Write + Seek> {
    headers: Vec<ShardHeader>,
    sinks: Vec<W>,
    data_crcs: Vec<u32>,
    /// Index of the next (layer, sequence) block: `layer * sequences + sequence`.
    next: usize,
    page: Vec<u8>,
    /// Set when a sink failed: its contents are then unknown.
    failed: bool,
}

impl<W: Write + Seek> ShardWriter<W> {
    /// Writes the metadata of every group's shard into `sinks` (one per group, at
    /// position 0). The data checksum is filled in by `finish`.
    pub fn new(plan: &ExportPlan, mut sinks: Vec<W>) -> Result<Self> {
        if sinks.len() != plan.groups() {
            return Err(Error::invalid(format!(
                "{} sinks for an export of {} latent groups",
                sinks.len(),
                plan.groups()
            )));
        }
        for (h, sink) in plan.headers.iter().zip(&mut sinks) {
            sink.write_all(&h.encode())?;
        }
        let spec = plan.headers[0].spec();
        Ok(ShardWriter {
            headers: plan.headers.clone(),
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
    /// normalised latent, `[len][d_c]`; `rope` the RoPE keys, `[len][d_r]`. Group `i`'s
    /// shard gets columns `[i*w, (i+1)*w)` of each latent row, then its RoPE key.
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
        let len = h.sequences()[self.next % h.sequences().len()].len;
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
        for g in 0..self.sinks.len() {
            self.write_slice(g, latent, rope)?;
        }
        self.failed = false;
        self.next += 1;
        Ok(())
    }

    fn write_slice(&mut self, group: usize, latent: &[f64], rope: &[f64]) -> Result<()> {
        let spec = self.headers[group].spec();
        let (dt, ps, d_c, d_r) = (
            spec.dtype(),
            spec.page_size(),
            spec.dims().d_c,
            spec.dims().d_r,
        );
        let (w, start) = (spec.slice_width(), spec.slice_start());
        let row_bytes = spec.row_bytes();
        let tokens = rope.len() / d_r;
        let mut values = vec![0.0; w + d_r];
        for first in (0..tokens).step_by(ps) {
            self.page.fill(0);
            for t in first..(first + ps).min(tokens) {
                let row = &mut self.page[(t - first) * row_bytes..][..row_bytes];
                values[..w].copy_from_slice(&latent[t * d_c + start..][..w]);
                values[w..].copy_from_slice(&rope[t * d_r..][..d_r]);
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
    /// An export into caller memory: one buffer of exactly [`ExportPlan::image_len`]
    /// bytes per group, which afterwards hold the same bytes as the shard files would.
    pub fn to_buffers(plan: &ExportPlan, buffers: Vec<&'a mut [u8]>) -> Result<Self> {
        for (g, b) in buffers.iter().enumerate() {
            if b.len() != plan.image_len() {
                return Err(Error::invalid(format!(
                    "buffer {g} holds {} bytes, a shard image of this export is {}",
                    b.len(),
                    plan.image_len()
                )));
            }
        }
        Self::new(plan, buffers.into_iter().map(Cursor::new).collect())
    }
}

/// An export into the `g` shard files. Rows go to temporary files next to their
/// destinations; [`commit`](Self::commit) syncs them and renames them into place, so a
/// reader never sees a half-written shard. Dropping the writer before `commit` removes
/// the temporary files.
pub struct ShardFileWriter {
    writer: ShardWriter<BufWriter<NamedTempFile>>,
    paths: Vec<PathBuf>,
}

impl ShardFileWriter {
    /// `paths[i]` receives group `i`'s shard; they must name distinct files.
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
