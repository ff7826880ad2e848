//! The device copy of one rank's slice cache: a pool of pages of 64 rows (bf16
//! `[slice_width + d_r]` or FP8 e4m3 with block scales, the CPU layouts of DESIGN 7.1), a
//! block table per sequence slot and the slots' lengths, all in device memory.
//!
//! The host keeps the page allocator (a free list) and a mirror of the block tables.
//! Uploads go through pinned staging buffers and asynchronous copies; decode-time rows
//! (f32) are appended by a kernel that reads and bumps the device-side length, so an
//! engine can capture appends in a CUDA graph once it has reserved their pages. Appends
//! into an FP8 cache are quantised on the device to the bytes the host's
//! [`DType::encode_row`] writes.

use super::driver::{
    arg, driver_err, CUstream, CudaDevice, DeviceBuffer, Event, PinnedBuffer, Stream,
};
use super::kernels::{Kernels, PAGE_SIZE, ROPE_WIDTH};
use crate::attention::RowSource;
use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result};
use std::sync::Arc;

/// Pages copied per staging buffer (two buffers alternate so filling one overlaps the
/// copy of the other).
const STAGING_PAGES: usize = 256;

/// Sizes of a [`DeviceCache`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceCacheConfig {
    /// Latent slice width; rows are `slice_width + 64` values (bf16, or FP8 codes and
    /// scales then a bf16 RoPE key).
    pub slice_width: usize,
    /// Pages in the pool (each 64 rows).
    pub pages: usize,
    /// Sequence slots.
    pub slots: usize,
    /// Longest sequence a slot can hold, in pages.
    pub max_pages_per_slot: usize,
}

#[derive(Debug)]
pub struct DeviceCache {
    device: Arc<CudaDevice>,
    kernels: Arc<Kernels>,
    config: DeviceCacheConfig,
    /// The row type, the kernels' (`Kernels::config.dtype`).
    dtype: DType,
    pool: DeviceBuffer<u8>,
    block_table: DeviceBuffer<i32>,
    lens: DeviceBuffer<i32>,
    append_error: DeviceBuffer<i32>,
    host_table: Vec<i32>,
    host_lens: Vec<usize>,
    /// Pages reserved per slot (a prefix of its block-table row).
    host_pages: Vec<usize>,
    free: Vec<i32>,
    stream: Stream,
    staging: Option<[(PinnedBuffer, Event); 2]>,
}

impl DeviceCache {
    /// An empty cache of the rows `kernels` read (`kernels.config.dtype`); `kernels` must
    /// be specialised for `config.slice_width`.
    pub(crate) fn new(
        device: &Arc<CudaDevice>,
        kernels: Arc<Kernels>,
        config: DeviceCacheConfig,
    ) -> Result<Self> {
        if kernels.config.slice_width != config.slice_width {
            return Err(Error::invalid(
                "device cache and kernels disagree on the slice width",
            ));
        }
        if config.pages == 0 || config.slots == 0 || config.max_pages_per_slot == 0 {
            return Err(Error::invalid(format!(
                "a device cache needs at least one page, slot and page per slot, got {config:?}"
            )));
        }
        if config.pages > i32::MAX as usize {
            return Err(Error::invalid(format!(
                "{} pages exceed the 2^31 page ids",
                config.pages
            )));
        }
        let dtype = kernels.config.dtype;
        let bytes = config
            .pages
            .checked_mul(PAGE_SIZE * dtype.row_bytes(config.slice_width, ROPE_WIDTH))
            .ok_or_else(|| Error::invalid("device cache size overflows"))?;
        let table_len = config
            .slots
            .checked_mul(config.max_pages_per_slot)
            .ok_or_else(|| Error::invalid("device block table size overflows"))?;
        let mut block_table = DeviceBuffer::new(device, table_len)?;
        block_table.fill_bytes(0xff)?; // -1: no page
        let mut lens = DeviceBuffer::new(device, config.slots)?;
        lens.fill_bytes(0)?;
        let mut append_error = DeviceBuffer::new(device, 1)?;
        append_error.fill_bytes(0)?;
        Ok(DeviceCache {
            pool: DeviceBuffer::new(device, bytes)?,
            dtype,
            block_table,
            lens,
            append_error,
            host_table: vec![-1; table_len],
            host_lens: vec![0; config.slots],
            host_pages: vec![0; config.slots],
            // popped from the back: page 0 first, so fresh sequences get contiguous runs
            free: (0..config.pages as i32).rev().collect(),
            stream: Stream::new(device)?,
            staging: None,
            device: device.clone(),
            kernels,
            config,
        })
    }

    pub fn config(&self) -> DeviceCacheConfig {
        self.config
    }
    pub fn row_width(&self) -> usize {
        self.config.slice_width + ROPE_WIDTH
    }
    /// The row type of the pool.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Bytes of one row in the pool.
    fn row_bytes(&self) -> usize {
        self.dtype.row_bytes(self.config.slice_width, ROPE_WIDTH)
    }
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }
    /// Tokens in `slot` as the host knows them (uploads, host appends, and
    /// [`Self::refresh_lengths`] after device-side appends).
    pub fn seq_len(&self, slot: usize) -> Result<usize> {
        self.check_slot(slot)?;
        Ok(self.host_lens[slot])
    }

    /// Device addresses the kernels read: pool, block table, lengths.
    pub(crate) fn device_ptrs(&self) -> (u64, u64, u64) {
        (self.pool.ptr(), self.block_table.ptr(), self.lens.ptr())
    }

    /// The pool, block table and lengths as the decode launch reads them.
    pub(crate) fn pool_ref(&self) -> super::decode::PoolRef {
        super::decode::PoolRef {
            pool: self.pool.ptr(),
            row_width: self.row_width(),
            dtype: self.dtype,
            page_stride: PAGE_SIZE * self.row_bytes(),
            pages: self.config.pages,
            table: self.block_table.ptr(),
            lens: self.lens.ptr(),
            num_slots: self.config.slots,
            max_pages: self.config.max_pages_per_slot,
        }
    }

    fn check_slot(&self, slot: usize) -> Result<()> {
        if slot >= self.config.slots {
            return Err(Error::out_of_range(format!(
                "slot {slot} is out of range for a device cache of {} slots",
                self.config.slots
            )));
        }
        Ok(())
    }

    /// Frees the pages of `slot` and empties it.
    pub fn release(&mut self, slot: usize) -> Result<()> {
        self.check_slot(slot)?;
        self.stream.synchronize()?; // no copy into the freed pages is still in flight
        let row = slot * self.config.max_pages_per_slot;
        for p in &mut self.host_table[row..row + self.host_pages[slot]] {
            self.free.push(*p);
            *p = -1;
        }
        self.host_pages[slot] = 0;
        self.host_lens[slot] = 0;
        self.sync_slot_table(slot)?;
        self.lens_upload(slot)
    }

    /// Makes room for `extra` more tokens in `slot` (past its host-known length): pages
    /// are taken from the pool and the slot's block table row is updated on the device.
    /// Call it before device-side appends (and before capturing them in a graph).
    pub fn reserve(&mut self, slot: usize, extra: usize) -> Result<()> {
        self.check_slot(slot)?;
        let want = (self.host_lens[slot] + extra).div_ceil(PAGE_SIZE);
        if want > self.config.max_pages_per_slot {
            return Err(Error::new(
                ErrorKind::OutOfCapacity,
                format!(
                    "slot {slot} would need {want} pages for {} tokens; a slot holds at most {}",
                    self.host_lens[slot] + extra,
                    self.config.max_pages_per_slot
                ),
            ));
        }
        let have = self.host_pages[slot];
        if want <= have {
            return Ok(());
        }
        if want - have > self.free.len() {
            return Err(Error::new(
                ErrorKind::OutOfCapacity,
                format!(
                    "the device cache has {} free pages, slot {slot} needs {} more",
                    self.free.len(),
                    want - have
                ),
            ));
        }
        let row = slot * self.config.max_pages_per_slot;
        for i in have..want {
            self.host_table[row + i] = self.free.pop().expect("counted above");
        }
        self.host_pages[slot] = want;
        self.sync_slot_table(slot)
    }

    fn sync_slot_table(&mut self, slot: usize) -> Result<()> {
        let n = self.config.max_pages_per_slot;
        let row = &self.host_table[slot * n..(slot + 1) * n];
        self.device.bind()?;
        // SAFETY: the row lies inside the device block table (slot checked by callers).
        unsafe {
            cudarc::driver::result::memcpy_htod_sync(
                self.block_table.ptr() + (slot * n * 4) as u64,
                row,
            )
        }
        .map_err(driver_err("updating a block table"))?;
        // legacy-stream copy: finish it before kernels on other streams read the table
        cudarc::driver::result::ctx::synchronize().map_err(driver_err("updating a block table"))
    }

    fn lens_upload(&mut self, slot: usize) -> Result<()> {
        let v = [self.host_lens[slot] as i32];
        self.device.bind()?;
        // SAFETY: slot < slots (checked by callers).
        unsafe {
            cudarc::driver::result::memcpy_htod_sync(self.lens.ptr() + (slot * 4) as u64, &v)
        }
        .map_err(driver_err("updating a sequence length"))?;
        cudarc::driver::result::ctx::synchronize().map_err(driver_err("updating a sequence length"))
    }

    /// Replaces the contents of `slot` with sequence `seq` of `source` (rows of this
    /// cache's width and type, any page size), through pinned staging and asynchronous
    /// copies. Returns when the copies are done.
    pub fn upload(&mut self, slot: usize, source: &dyn RowSource, seq: u32) -> Result<()> {
        if source.dtype() != self.dtype {
            return Err(Error::mismatch(format!(
                "this device cache holds {} rows; the source holds {}",
                self.dtype.name(),
                source.dtype().name()
            )));
        }
        if source.row_width() != self.row_width() {
            return Err(Error::mismatch(format!(
                "source rows are {} wide, the device cache's are {}",
                source.row_width(),
                self.row_width()
            )));
        }
        let len = source.seq_len(seq)?;
        self.release(slot)?;
        self.reserve(slot, len)?;
        let row_bytes = self.row_bytes();
        let page_bytes = PAGE_SIZE * row_bytes;
        if self.staging.is_none() {
            self.staging = Some([
                (
                    PinnedBuffer::new(&self.device, STAGING_PAGES * page_bytes)?,
                    Event::new(&self.device)?,
                ),
                (
                    PinnedBuffer::new(&self.device, STAGING_PAGES * page_bytes)?,
                    Event::new(&self.device)?,
                ),
            ]);
        }
        let src_page_rows = source.page_size();
        let row0 = slot * self.config.max_pages_per_slot;
        let pages = self.host_table[row0..row0 + len.div_ceil(PAGE_SIZE)].to_vec();
        let staging = self.staging.as_mut().expect("allocated above");
        for (chunk_idx, chunk) in pages.chunks(STAGING_PAGES).enumerate() {
            let (buf, done) = &mut staging[chunk_idx % 2];
            if chunk_idx >= 2 {
                done.synchronize()?; // the copy out of this buffer two chunks ago is done
            }
            let first_token = chunk_idx * STAGING_PAGES * PAGE_SIZE;
            let tokens = (len - first_token).min(chunk.len() * PAGE_SIZE);
            let dst = buf.as_mut_slice();
            for i in 0..tokens {
                let t = first_token + i;
                let page = source.page(seq, t / src_page_rows);
                let off = (t % src_page_rows) * row_bytes;
                let src = page.get(off..off + row_bytes).ok_or_else(|| {
                    Error::corrupt(format!(
                        "sequence {seq}: page {} of the source is shorter than its rows",
                        t / src_page_rows
                    ))
                })?;
                dst[i * row_bytes..(i + 1) * row_bytes].copy_from_slice(src);
            }
            // One copy per run of consecutive page ids.
            let mut i = 0;
            while i < chunk.len() {
                let mut j = i + 1;
                while j < chunk.len() && chunk[j] == chunk[j - 1] + 1 {
                    j += 1;
                }
                let rows = ((j - i) * PAGE_SIZE).min(tokens.saturating_sub(i * PAGE_SIZE));
                if rows > 0 {
                    let dst_addr = self.pool.ptr() + (chunk[i] as usize * page_bytes) as u64;
                    // SAFETY: the run's pages lie in the pool; the staging range holds
                    // `rows` rows; the buffer is not refilled before its event passes.
                    unsafe {
                        buf.copy_to_device_async_from(
                            i * page_bytes,
                            dst_addr,
                            rows * row_bytes,
                            self.stream.raw(),
                        )?
                    };
                }
                i = j;
            }
            // SAFETY: the cache's own live stream.
            unsafe { done.record(self.stream.raw())? };
        }
        self.stream.synchronize()?;
        self.host_lens[slot] = len;
        self.lens_upload(slot)
    }

    /// Appends one row per entry of `slots` (distinct) from host rows (f32, `[n][row_width]`),
    /// reserving pages as needed; synchronous. The rows are stored as the cache's type:
    /// rounded to bf16, or quantised to FP8 as [`DType::encode_row`] does (bit for bit,
    /// non-finite values included).
    pub fn append(&mut self, slots: &[usize], rows: &[f32]) -> Result<()> {
        let rw = self.row_width();
        if rows.len() != slots.len() * rw {
            return Err(Error::invalid(format!(
                "{} rows of width {rw} need {} values, got {}",
                slots.len(),
                slots.len() * rw,
                rows.len()
            )));
        }
        let mut seen = vec![false; self.config.slots];
        for &s in slots {
            self.check_slot(s)?;
            if std::mem::replace(&mut seen[s], true) {
                return Err(Error::invalid(format!(
                    "slot {s} appears twice in one append"
                )));
            }
        }
        for &s in slots {
            self.reserve(s, 1)?;
        }
        let slots_i32: Vec<i32> = slots.iter().map(|&s| s as i32).collect();
        let slots_dev = DeviceBuffer::from_host(&self.device, &slots_i32)?;
        let rows_dev = DeviceBuffer::from_host(&self.device, rows)?;
        // SAFETY: both buffers hold `slots.len()` entries and live until the sync below;
        // every slot has a reserved page for its next row.
        unsafe {
            self.append_raw(
                slots_dev.ptr(),
                rows_dev.ptr(),
                slots.len(),
                self.stream.raw(),
            )?
        };
        self.stream.synchronize()?;
        self.check_append_error()?;
        for &s in slots {
            self.host_lens[s] += 1;
        }
        Ok(())
    }

    /// Device-side append, enqueued on `stream` with no host synchronisation (graph
    /// capturable): row `i` (f32, `row_width`, at `rows + i * row_width * 4`) goes to the
    /// end of slot `slots[i]` (device `i32`s, distinct), whose length grows by one; an FP8
    /// cache quantises it on the device (one block per row), as [`Self::append`] does.
    /// Pages must have been reserved; a row without one is dropped and reported by
    /// [`Self::check_append_error`]. Host-side lengths are brought up to date with
    /// [`Self::refresh_lengths`].
    ///
    /// # Safety
    /// `slots` and `rows` must be device addresses holding `count` entries each, valid
    /// until the stream passes this point; every slot id must be below the slot count.
    pub unsafe fn append_raw(
        &self,
        slots: u64,
        rows: u64,
        count: usize,
        stream: CUstream,
    ) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        let (pool, table, lens) = self.device_ptrs();
        let count_i = count as i32;
        let max_pages = self.config.max_pages_per_slot as i32;
        let num_slots = self.config.slots as i32;
        let err = self.append_error.ptr();
        let mut args = [
            arg(&rows),
            arg(&slots),
            arg(&count_i),
            arg(&num_slots),
            arg(&pool),
            arg(&table),
            arg(&lens),
            arg(&max_pages),
            arg(&err),
        ];
        // the kernels read bf16 or FP8 caches only (KernelConfig::choose)
        let kernel = if self.dtype == DType::Fp8E4m3 {
            &self.kernels.append_fp8
        } else {
            &self.kernels.append
        };
        self.device.bind()?;
        kernel.launch((count as u32, 1, 1), 128, 0, stream, &mut args)
    }

    /// Reports (and clears) a device-side append that found no reserved page.
    pub fn check_append_error(&mut self) -> Result<()> {
        let flag = self.append_error.to_vec()?[0];
        if flag != 0 {
            self.append_error.fill_bytes(0)?;
        }
        match flag {
            0 => Ok(()),
            2 => Err(Error::out_of_range(format!(
                "a device-side append named a slot outside 0..{}: its row was dropped",
                self.config.slots
            ))),
            _ => Err(Error::new(
                ErrorKind::OutOfCapacity,
                "a device-side append found no reserved page: call reserve before appending",
            )),
        }
    }

    /// The rows of `slot` in token order, bytes as the pool holds them (`seq_len(slot)`
    /// rows of the cache's row bytes; [`Self::refresh_lengths`] first after device-side
    /// appends), after all queued device work: for tests and tools.
    pub fn download_rows(&self, slot: usize) -> Result<Vec<u8>> {
        self.check_slot(slot)?;
        let row_bytes = self.row_bytes();
        let page_bytes = PAGE_SIZE * row_bytes;
        let mut rows = vec![0u8; self.host_lens[slot] * row_bytes];
        let first = slot * self.config.max_pages_per_slot;
        self.device.bind()?;
        cudarc::driver::result::ctx::synchronize().map_err(driver_err("waiting for the device"))?;
        for (chunk, &page) in rows.chunks_mut(page_bytes).zip(&self.host_table[first..]) {
            // SAFETY: the slot's reserved pages (one per chunk: its length is within them)
            // lie in the pool; the chunk holds at most one page's rows.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_sync(
                    chunk,
                    self.pool.ptr() + (page as usize * page_bytes) as u64,
                )
            }
            .map_err(driver_err("copying rows from the device"))?;
        }
        Ok(rows)
    }

    /// Reads the device-side lengths back into the host's view (after device appends).
    pub fn refresh_lengths(&mut self) -> Result<()> {
        let lens = self.lens.to_vec()?;
        for (h, d) in self.host_lens.iter_mut().zip(lens) {
            *h = d as usize;
        }
        Ok(())
    }

    /// Gives `slot` `len` tokens of pseudo-random rows (values in [-1, 1), seeded),
    /// generated on the device: benchmark inputs without a host round trip.
    pub fn fill_synthetic(&mut self, slot: usize, len: usize, seed: u64) -> Result<()> {
        self.release(slot)?;
        self.reserve(slot, len)?;
        let page_bytes = (PAGE_SIZE * self.row_bytes()) as u64;
        let page_elems = (PAGE_SIZE * self.row_width()) as u64;
        let (rows, slice, row_bytes) = (
            PAGE_SIZE as u64,
            self.config.slice_width as i32,
            self.row_bytes() as i32,
        );
        let row0 = slot * self.config.max_pages_per_slot;
        for &page in &self.host_table[row0..row0 + len.div_ceil(PAGE_SIZE)] {
            let ptr = self.pool.ptr() + page as u64 * page_bytes;
            let seed = seed ^ ((page as u64) << 32);
            let scale = 1.0f32;
            self.device.bind()?;
            // SAFETY: each launch writes exactly one page of the pool.
            unsafe {
                if self.dtype == DType::Fp8E4m3 {
                    let mut args = [
                        arg(&ptr),
                        arg(&rows),
                        arg(&slice),
                        arg(&row_bytes),
                        arg(&seed),
                        arg(&scale),
                    ];
                    self.kernels.fill_fp8.launch(
                        (64, 1, 1),
                        128,
                        0,
                        self.stream.raw(),
                        &mut args,
                    )?
                } else {
                    let mut args = [arg(&ptr), arg(&page_elems), arg(&seed), arg(&scale)];
                    self.kernels.fill_bf16.launch(
                        (64, 1, 1),
                        256,
                        0,
                        self.stream.raw(),
                        &mut args,
                    )?
                }
            };
        }
        self.stream.synchronize()?;
        self.host_lens[slot] = len;
        self.lens_upload(slot)
    }
}
