//! [`RankCache`]: sequences, block tables and appends over the page pool, and the
//! per-layer [`RowSource`] views the attention backends read.

use super::file::ShardFile;
use super::format::ShardHeader;
use super::pool::PagePool;
use super::{check_representable, ShardSpec};
use crate::attention::RowSource;
use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result};
use std::collections::HashMap;
use std::path::Path;

/// Where one page of a sequence lives.
#[derive(Clone, Copy, Debug)]
enum PageLoc {
    Pool(u32),
    /// Page `page` (within each layer) of registered shard `shard`.
    Shard {
        shard: usize,
        page: usize,
    },
}

struct Sequence {
    /// Cached tokens per layer.
    lens: Vec<usize>,
    /// Block table: page `k` holds tokens `[k * page_size, (k + 1) * page_size)` of every
    /// layer.
    pages: Vec<PageLoc>,
    /// The registered shard holding this sequence's prefix, if any.
    shard: Option<usize>,
}

/// A registered shard image: a read-only file mapping or a buffer the cache owns.
struct Shard {
    image: Box<dyn AsRef<[u8]> + Send + Sync>,
    header: ShardHeader,
    /// Sequences still holding pages of it; the image is dropped when none is left.
    live: usize,
}

/// One rank's slice cache: every layer of a model, for a set of sequences.
pub struct RankCache {
    spec: ShardSpec,
    pool: PagePool,
    sequences: HashMap<u32, Sequence>,
    /// Registered images by slot; a slot is emptied when its last sequence is freed.
    shards: Vec<Option<Shard>>,
}

impl RankCache {
    /// An empty cache whose pool holds `capacity_pages` pages (each `page_size` tokens
    /// in every layer), allocated now.
    pub fn new(spec: ShardSpec, capacity_pages: usize) -> Result<Self> {
        let pool = PagePool::new(
            spec.layers(),
            capacity_pages,
            spec.page_bytes(),
            spec.page_stride(),
        )?;
        Ok(RankCache {
            spec,
            pool,
            sequences: HashMap::new(),
            shards: Vec::new(),
        })
    }

    pub fn spec(&self) -> &ShardSpec {
        &self.spec
    }

    /// Pages the pool was created with.
    pub fn capacity_pages(&self) -> usize {
        self.pool.capacity()
    }

    /// Pages not held by any sequence.
    pub fn free_pages(&self) -> usize {
        self.pool.free_count()
    }

    /// Shard images (files or buffers) some sequence still reads from.
    pub fn registered_images(&self) -> usize {
        self.shards.iter().flatten().count()
    }

    /// Ids of the cached sequences, in no particular order.
    pub fn sequence_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.sequences.keys().copied()
    }

    /// Starts an empty sequence. An id already in the cache is an error.
    pub fn add_sequence(&mut self, seq: u32) -> Result<()> {
        if self.sequences.contains_key(&seq) {
            return Err(Error::invalid(format!(
                "sequence {seq} is already in the cache"
            )));
        }
        self.sequences.insert(
            seq,
            Sequence {
                lens: vec![0; self.spec.layers()],
                pages: Vec::new(),
                shard: None,
            },
        );
        Ok(())
    }

    /// Drops a sequence and returns its pages to the pool.
    pub fn free_sequence(&mut self, seq: u32) -> Result<()> {
        let s = self.sequences.remove(&seq).ok_or_else(|| unknown(seq))?;
        for loc in s.pages {
            if let PageLoc::Pool(p) = loc {
                self.pool.release(p);
            }
        }
        if let Some(slot) = s.shard {
            let shard = self.shards[slot]
                .as_mut()
                .expect("a live sequence keeps its shard");
            shard.live -= 1;
            if shard.live == 0 {
                self.shards[slot] = None;
            }
        }
        Ok(())
    }

    /// Cached tokens of `seq` in `layer`.
    pub fn seq_len(&self, seq: u32, layer: usize) -> Result<usize> {
        self.check_layer(layer)?;
        Ok(self.sequence(seq)?.lens[layer])
    }

    /// Appends `rows.len() / row_width` rows to `seq` in `layer`. Rows are already
    /// normalised, rotated and sliced (`[slice_width + d_r]` each, latent slice first);
    /// they are rounded to the cache's element type. On any error, including an
    /// exhausted pool, the cache is unchanged. A cache of one sequence shard of several
    /// refuses it: its appends name their position ([`Self::append_rows_at`]).
    pub fn append_rows(&mut self, seq: u32, layer: usize, rows: &[f64]) -> Result<()> {
        if self.spec.is_sequence_shard() {
            return Err(Error::invalid(format!(
                "this cache holds sequence shard {} of {}: append by position \
                 (append_rows_at), so that every token lands on the shard that owns it",
                self.spec.sequence_shard(),
                self.spec.sequence_sharding().shards
            )));
        }
        self.append(seq, layer, rows)
    }

    /// As [`Self::append_rows`], for the token at `position` of the sequence and the
    /// ones after it that this cache holds: on a cache of sequence shard `j`
    /// ([`ShardSpec::for_hybrid`]) the rows are the shard's next tokens, at positions
    /// `position_of(j, len ..)` of its [`SequenceSharding`](crate::SequenceSharding).
    /// A position another shard owns is a `Mismatch` error (the token belongs to another
    /// rank: [`crate::HybridPlan::owner_rank`] names it), one that is not this shard's
    /// next position (a gap, or a token appended twice) an `InvalidArgument` error. On a
    /// cache of every token, `position` must be the sequence's length in `layer`.
    pub fn append_rows_at(
        &mut self,
        seq: u32,
        layer: usize,
        position: u64,
        rows: &[f64],
    ) -> Result<()> {
        let len = self.seq_len(seq, layer)? as u64;
        let (sh, j) = (self.spec.sequence_sharding(), self.spec.sequence_shard());
        let owner = sh.owner(position);
        if owner != j {
            return Err(Error::mismatch(format!(
                "position {position} belongs to sequence shard {owner} of {} (interleave {}), \
                 this cache holds shard {j}: append it on the rank that owns it",
                sh.shards, sh.interleave
            )));
        }
        let next = sh.position_of(j, len);
        if position != next {
            return Err(Error::invalid(format!(
                "sequence {seq}, layer {layer}: the next token this cache holds is at \
                 position {next}, not {position}"
            )));
        }
        self.append(seq, layer, rows)
    }

    fn append(&mut self, seq: u32, layer: usize, rows: &[f64]) -> Result<()> {
        let rw = self.spec.row_width();
        if rows.len() % rw != 0 {
            return Err(Error::invalid(format!(
                "{} values are not a whole number of {rw}-wide rows",
                rows.len()
            )));
        }
        self.check_layer(layer)?;
        check_representable(self.spec.dtype(), rows, "appended rows")?;
        let ps = self.spec.page_size();
        let s = self.sequence(seq)?;
        let start = s.lens[layer];
        let end = start + rows.len() / rw;
        // Pages being written that still live in a read-only shard (the mapped prefix's
        // last, partial page) move to the pool first, in every layer, so that all pages
        // of a sequence stay uniform.
        let written = start / ps..end.div_ceil(ps).min(s.pages.len());
        let to_copy: Vec<usize> = written
            .filter(|&k| matches!(s.pages[k], PageLoc::Shard { .. }))
            .collect();
        let new_pages = end.div_ceil(ps).saturating_sub(s.pages.len()) + to_copy.len();
        if new_pages > self.pool.free_count() {
            return Err(Error::new(
                ErrorKind::OutOfCapacity,
                format!(
                    "appending {} tokens to sequence {seq} needs {new_pages} more pages, \
                     but only {} of {} pages are free",
                    end - start,
                    self.pool.free_count(),
                    self.pool.capacity()
                ),
            ));
        }

        let s = self.sequences.get_mut(&seq).expect("checked above");
        for k in to_copy {
            let p = self.pool.alloc().expect("free pages counted above");
            for l in 0..self.spec.layers() {
                let src = shard_page(&self.shards, s.pages[k], l);
                self.pool.page_mut(l, p).copy_from_slice(src);
            }
            s.pages[k] = PageLoc::Pool(p);
        }
        while s.pages.len() < end.div_ceil(ps) {
            let p = self.pool.alloc().expect("free pages counted above");
            s.pages.push(PageLoc::Pool(p));
        }
        let (dt, w) = (self.spec.dtype(), self.spec.slice_width());
        let row_bytes = self.spec.row_bytes();
        let mut t = start;
        let mut rest = rows;
        while !rest.is_empty() {
            let in_page = t % ps;
            let n = (ps - in_page).min(rest.len() / rw);
            let PageLoc::Pool(p) = s.pages[t / ps] else {
                unreachable!("pages being written were moved to the pool above");
            };
            let page = self.pool.page_mut(layer, p);
            let dst = &mut page[in_page * row_bytes..(in_page + n) * row_bytes];
            for (row, out) in rest[..n * rw]
                .chunks_exact(rw)
                .zip(dst.chunks_exact_mut(row_bytes))
            {
                dt.encode_row(row, w, out);
            }
            rest = &rest[n * rw..];
            t += n;
        }
        s.lens[layer] = end;
        Ok(())
    }

    /// Registers the shard file at `path`: reads it into memory ([`ShardFile::read`]),
    /// checks its data checksum, validates its metadata (see [`ShardHeader::parse`]) and
    /// checks that it belongs to this cache ([`ShardHeader::check_matches`]). Its
    /// sequences join the cache with the ids of its sequence table, which are returned.
    /// The copy costs a read of the file and memory of its size, and makes the cache
    /// immune to what happens to the file afterwards (truncation included). Rows appended
    /// later go to pool pages.
    pub fn register_file(&mut self, path: impl AsRef<Path>) -> Result<Vec<u32>> {
        let path = path.as_ref();
        let file = ShardFile::read(path)?;
        self.register_buffer(file)
            .map_err(|e| e.context(format!("shard file {}", path.display())))
    }

    /// As [`register_file`](Self::register_file), but zero-copy: the file is mapped
    /// read-only and its rows are read in place, so registration costs time and memory
    /// in proportion to the metadata, not the file, and the data checksum is not checked.
    ///
    /// # Safety
    /// As [`ShardFile::map`]: the file must not be truncated (nor rewritten in place)
    /// while any of its sequences is in the cache, or a decode step dies of SIGBUS.
    pub unsafe fn register_file_mapped(&mut self, path: impl AsRef<Path>) -> Result<Vec<u32>> {
        let path = path.as_ref();
        // SAFETY: forwarded contract.
        let file = unsafe { ShardFile::map(path) }?;
        self.register_buffer(file)
            .map_err(|e| e.context(format!("shard file {}", path.display())))
    }

    /// Registers a shard image held in memory (for example one filled by
    /// [`ShardWriter::to_buffers`](super::ShardWriter::to_buffers) and moved here by
    /// the engine); the cache keeps it and reads its pages in place. Otherwise as
    /// [`register_file`](Self::register_file).
    pub fn register_buffer<B>(&mut self, image: B) -> Result<Vec<u32>>
    where
        B: AsRef<[u8]> + Send + Sync + 'static,
    {
        let header = ShardHeader::parse(image.as_ref())?;
        header.check_matches(&self.spec)?;
        if let Some(e) = header
            .sequences()
            .iter()
            .find(|e| self.sequences.contains_key(&e.id))
        {
            return Err(Error::invalid(format!(
                "sequence {} of the shard is already in the cache",
                e.id
            )));
        }
        let ids: Vec<u32> = header.sequences().iter().map(|e| e.id).collect();
        if ids.is_empty() {
            return Ok(ids);
        }
        let slot = match self.shards.iter().position(Option::is_none) {
            Some(slot) => slot,
            None => {
                self.shards.push(None);
                self.shards.len() - 1
            }
        };
        let ps = self.spec.page_size();
        for e in header.sequences() {
            let pages = (0..e.len.div_ceil(ps))
                .map(|k| PageLoc::Shard {
                    shard: slot,
                    page: e.first_page + k,
                })
                .collect();
            let s = Sequence {
                lens: vec![e.len; self.spec.layers()],
                pages,
                shard: Some(slot),
            };
            self.sequences.insert(e.id, s);
        }
        self.shards[slot] = Some(Shard {
            image: Box::new(image),
            live: ids.len(),
            header,
        });
        Ok(ids)
    }

    /// Layer `layer` as the backends read it.
    pub fn layer(&self, layer: usize) -> Result<LayerView<'_>> {
        self.check_layer(layer)?;
        Ok(LayerView { cache: self, layer })
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.spec.layers() {
            return Err(Error::out_of_range(format!(
                "layer {layer} is out of range for a cache of {} layers",
                self.spec.layers()
            )));
        }
        Ok(())
    }

    fn sequence(&self, seq: u32) -> Result<&Sequence> {
        self.sequences.get(&seq).ok_or_else(|| unknown(seq))
    }
}

/// The bytes of a shard page in layer `layer`.
fn shard_page(shards: &[Option<Shard>], loc: PageLoc, layer: usize) -> &[u8] {
    let PageLoc::Shard { shard, page } = loc else {
        unreachable!("a pool page is not a shard page");
    };
    let sh = shards[shard]
        .as_ref()
        .expect("a live sequence keeps its shard");
    let start = sh.header.page_offset(layer, page);
    // In range: parse checked that every layer's pages lie inside the image.
    &sh.image.as_ref().as_ref()[start..start + sh.header.spec().page_bytes()]
}

fn unknown(seq: u32) -> Error {
    Error::out_of_range(format!("sequence {seq} is not in the cache"))
}

/// One layer of a [`RankCache`], read by the attention backends.
#[derive(Clone, Copy)]
pub struct LayerView<'a> {
    cache: &'a RankCache,
    layer: usize,
}

impl LayerView<'_> {
    pub fn layer(&self) -> usize {
        self.layer
    }
}

impl RowSource for LayerView<'_> {
    fn dtype(&self) -> DType {
        self.cache.spec.dtype()
    }

    fn row_width(&self) -> usize {
        self.cache.spec.row_width()
    }

    fn page_size(&self) -> usize {
        self.cache.spec.page_size()
    }

    fn seq_len(&self, seq: u32) -> Result<usize> {
        Ok(self.cache.sequence(seq)?.lens[self.layer])
    }

    /// Panics if `seq` is not cached or `page` is past its pages: the trait's contract
    /// is that callers ask only for pages of known sequences below their length.
    fn page(&self, seq: u32, page: usize) -> &[u8] {
        let s = self
            .cache
            .sequence(seq)
            .unwrap_or_else(|e| panic!("RowSource::page: {e}"));
        match s.pages.get(page) {
            Some(PageLoc::Pool(p)) => self.cache.pool.page(self.layer, *p),
            Some(loc) => shard_page(&self.cache.shards, *loc, self.layer),
            None => panic!(
                "RowSource::page: page {page} of sequence {seq} is past its {} pages",
                s.pages.len()
            ),
        }
    }
}
