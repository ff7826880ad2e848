//! The fixed-capacity page pool of one rank: one allocation, laid out
//! `[layer][page][page_stride bytes]`, every page 64-byte aligned.

use crate::error::{Error, Result};
use bytemuck::{Pod, Zeroable};

/// Alignment of every page, in the pool and in shard files: one cache line, enough for
/// any vector load up to AVX-512.
pub const PAGE_ALIGN: usize = 64;

/// One aligned cache line; the pool is a slice of them so that its base is 64-aligned.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C, align(64))]
struct Line([u8; PAGE_ALIGN]);

/// A pool page is `page_size` token slots of one sequence in every layer, like a block of
/// a paged-attention engine: a sequence grows by whole pages for all layers at once, so a
/// decode step that appends to layer 0 can never run out of pages at a later layer.
pub(crate) struct PagePool {
    lines: Box<[Line]>,
    layers: usize,
    capacity: usize,
    page_bytes: usize,
    page_stride: usize,
    /// Released page indices; the last one is handed out next, so freed pages are
    /// reused first.
    free: Vec<u32>,
    /// Pages `fresh..capacity` were never handed out. Keeping them as a range rather than
    /// in `free` makes a pool's bookkeeping proportional to the pages in use, not to its
    /// capacity.
    fresh: u32,
}

impl PagePool {
    /// `page_stride` is a multiple of [`PAGE_ALIGN`] and at least `page_bytes`.
    pub(crate) fn new(
        layers: usize,
        capacity: usize,
        page_bytes: usize,
        page_stride: usize,
    ) -> Result<Self> {
        debug_assert!(page_stride % PAGE_ALIGN == 0 && page_stride >= page_bytes);
        if capacity > u32::MAX as usize {
            return Err(Error::invalid(format!(
                "a pool of {capacity} pages is larger than the supported maximum {}",
                u32::MAX
            )));
        }
        let too_big = || {
            Error::invalid(format!(
                "cannot allocate a pool of {capacity} pages of {layers} layers x \
                 {page_stride} bytes"
            ))
        };
        let lines = capacity
            .checked_mul(layers)
            .and_then(|p| p.checked_mul(page_stride / PAGE_ALIGN))
            .ok_or_else(too_big)?;
        // Zeroed allocation: the operating system hands out zero pages lazily, so an
        // unused part of a large pool costs no resident memory.
        let lines =
            bytemuck::allocation::try_zeroed_slice_box::<Line>(lines).map_err(|()| too_big())?;
        Ok(PagePool {
            lines,
            layers,
            capacity,
            page_bytes,
            page_stride,
            free: Vec::new(),
            fresh: 0,
        })
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn free_count(&self) -> usize {
        self.free.len() + (self.capacity - self.fresh as usize)
    }

    /// Takes a free page and zeroes it in every layer, so that rows past a sequence's
    /// end read as zero, as they do in shard files.
    pub(crate) fn alloc(&mut self) -> Option<u32> {
        let page = match self.free.pop() {
            Some(page) => page,
            None if (self.fresh as usize) < self.capacity => {
                self.fresh += 1;
                self.fresh - 1
            }
            None => return None,
        };
        for layer in 0..self.layers {
            self.page_mut(layer, page).fill(0);
        }
        Some(page)
    }

    pub(crate) fn release(&mut self, page: u32) {
        debug_assert!(
            page < self.fresh && !self.free.contains(&page),
            "page {page} released twice or never handed out"
        );
        self.free.push(page);
    }

    fn offset(&self, layer: usize, page: u32) -> usize {
        (layer * self.capacity + page as usize) * self.page_stride
    }

    pub(crate) fn page(&self, layer: usize, page: u32) -> &[u8] {
        let start = self.offset(layer, page);
        &bytemuck::cast_slice(&self.lines)[start..start + self.page_bytes]
    }

    pub(crate) fn page_mut(&mut self, layer: usize, page: u32) -> &mut [u8] {
        let start = self.offset(layer, page);
        &mut bytemuck::cast_slice_mut(&mut self.lines)[start..start + self.page_bytes]
    }
}
