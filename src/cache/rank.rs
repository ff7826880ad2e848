//! [`RankCache`]: sequences, block tables and appends over the page pool, and the
//! per-layer [`RowSource`] views the attention backends read.

use super::pool::PagePool;
use super::{check_representable, ShardSpec};
use crate::attention::RowSource;
use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result};
use std::collections::HashMap;

/// Where one page of a sequence lives.
#[derive(Clone, Copy, Debug)]
enum PageLoc {
    Pool(u32),
}

struct Sequence {
    /// Cached tokens per layer.
    lens: Vec<usize>,
    /// Block table: page `k` holds tokens `[k * page_size, (k + 1) * page_size)` of every
    /// layer.
    pages: Vec<PageLoc>,
}

/// One rank's slice cache: every layer of a model, for a set of sequences.
pub struct RankCache {
    spec: ShardSpec,
    pool: PagePool,
    sequences: HashMap<u32, Sequence>,
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
            },
        );
        Ok(())
    }

    /// Drops a sequence and returns its pages to the pool.
    pub fn free_sequence(&mut self, seq: u32) -> Result<()> {
        let s = self.sequences.remove(&seq).ok_or_else(|| unknown(seq))?;
        for loc in s.pages {
            match loc {
                PageLoc::Pool(p) => self.pool.release(p),
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
    /// exhausted pool, the cache is unchanged.
    pub fn append_rows(&mut self, seq: u32, layer: usize, rows: &[f64]) -> Result<()> {
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
        let new_pages = end.div_ceil(ps).saturating_sub(s.pages.len());
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
        for _ in 0..new_pages {
            let p = self.pool.alloc().expect("free pages counted above");
            s.pages.push(PageLoc::Pool(p));
        }
        let dt = self.spec.dtype();
        let row_bytes = rw * dt.size();
        let mut t = start;
        let mut rest = rows;
        while !rest.is_empty() {
            let in_page = t % ps;
            let n = (ps - in_page).min(rest.len() / rw);
            let PageLoc::Pool(p) = s.pages[t / ps];
            let page = self.pool.page_mut(layer, p);
            dt.encode(
                &rest[..n * rw],
                &mut page[in_page * row_bytes..(in_page + n) * row_bytes],
            );
            rest = &rest[n * rw..];
            t += n;
        }
        s.lens[layer] = end;
        Ok(())
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
            None => panic!(
                "RowSource::page: page {page} of sequence {seq} is past its {} pages",
                s.pages.len()
            ),
        }
    }
}
