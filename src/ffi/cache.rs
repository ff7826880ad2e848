//! Rank caches: created in memory, shard images registered from files or buffers.

use super::context::tpla_context;
use super::sequence::tpla_sequence_sharding;
use super::{
    guard, guard_value, hand_out, handle, handle_mut, input, to_f64, to_usize, tpla_status,
    versioned, versioned_out, write_out, Failure, Outcome, Versioned,
};
use crate::cache::{RankCache, ShardSpec};
use crate::decode::RankContext;
use crate::dtype::DType;
use std::ffi::{c_char, c_void, OsStr};
use std::os::unix::ffi::OsStrExt;

/// One rank's paged slice cache: every layer of a model for a set of sequences (DESIGN.md
/// 3.2, 3.5). Modifying calls need exclusive use; decode steps only read it and may run
/// concurrently with each other, never with a modification.
pub struct tpla_cache {
    pub(super) cache: RankCache,
}

/// Options of `tpla_cache_create`.
#[repr(C)]
pub struct tpla_cache_options {
    /// sizeof(tpla_cache_options).
    pub struct_size: usize,
    /// A `tpla_dtype` for the cached rows.
    pub dtype: u32,
    /// Tokens per page (1 to 65536); TPLA_DEFAULT_PAGE_SIZE is the usual choice. Shard
    /// files registered later must have the same page size.
    pub page_size: u32,
    /// Pages of the pool, allocated now. One page holds `page_size` tokens of one
    /// sequence in every layer; registered shard images need no pool pages until their
    /// sequences grow past their last full page.
    pub capacity_pages: usize,
}

// SAFETY: repr(C), first field `struct_size: usize`.
unsafe impl Versioned for tpla_cache_options {
    const NAME: &'static str = "tpla_cache_options";
}

/// Tokens per cache page unless the caller chooses otherwise.
pub const TPLA_DEFAULT_PAGE_SIZE: u32 = 64;

/// Creates an empty cache for the rank of `ctx`: its geometry, latent group, layer count
/// and the transform of every layer come from the context, so every layer of `ctx` must
/// have weights. The cache does not refer to `ctx` afterwards; destroy it with
/// `tpla_cache_destroy`.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_WRONG_STRUCT_SIZE or
/// TPLA_STATUS_INVALID_ARGUMENT (unknown dtype, page size, a layer without weights,
/// a pool too large to allocate). Reads `ctx` only.
///
/// # Safety
/// `ctx` is NULL or a live context; `options` is NULL or a valid `tpla_cache_options`;
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_cache_create(
    ctx: *const tpla_context,
    options: *const tpla_cache_options,
    out: *mut *mut tpla_cache,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let c = &unsafe { handle(ctx, "ctx") }?.ctx;
        // SAFETY: caller contract.
        let o = unsafe { versioned(options, "options") }?;
        // SAFETY: caller contract.
        unsafe { hand_out(out, || new_cache(cache_spec(c, o)?, o)) }
    })
}

/// The spec of a cache of `c`'s rank with `o`'s element type and page size.
fn cache_spec(c: &RankContext, o: &tpla_cache_options) -> Outcome<ShardSpec> {
    Ok(ShardSpec::new(
        *c.dims(),
        c.plan(),
        DType::from_code(o.dtype)?,
        to_usize(o.page_size),
        c.transform_ids()?,
    )?)
}

/// An empty cache of `spec` with `o`'s pool pages.
fn new_cache(spec: ShardSpec, o: &tpla_cache_options) -> Outcome<tpla_cache> {
    Ok(tpla_cache {
        cache: RankCache::new(spec, o.capacity_pages)?,
    })
}

/// Creates an empty cache for rank (i, j) of a hybrid deployment (`tpla_hybrid_plan`):
/// latent group i, the group of `ctx` (created with the plan's `context_plan`), of the
/// tokens that `sharding` puts on sequence shard `shard` (j). Such a cache registers only
/// the shard files of its own rank (`tpla_export_create_sequence_shards`: another shard,
/// shard count or interleave is TPLA_STATUS_MISMATCH), takes appends by position only
/// (`tpla_cache_append_rows_at`, `tpla_context_append_token_at`) and is decoded by
/// `tpla_context_decode_sequence_shard`. `sharding.shards` 1 makes a plain cache.
///
/// Returns as `tpla_cache_create`, and TPLA_STATUS_INVALID_ARGUMENT (sharding) or
/// TPLA_STATUS_OUT_OF_RANGE (shard not below sharding.shards).
///
/// # Safety
/// As `tpla_cache_create`.
#[no_mangle]
pub unsafe extern "C" fn tpla_cache_create_sequence_shard(
    ctx: *const tpla_context,
    options: *const tpla_cache_options,
    sharding: tpla_sequence_sharding,
    shard: u32,
    out: *mut *mut tpla_cache,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let c = &unsafe { handle(ctx, "ctx") }?.ctx;
        // SAFETY: caller contract.
        let o = unsafe { versioned(options, "options") }?;
        let sharding = sharding.to_rust()?;
        // SAFETY: caller contract.
        unsafe {
            hand_out(out, || {
                new_cache(
                    cache_spec(c, o)?.with_sequence_shard(sharding, to_usize(shard))?,
                    o,
                )
            })
        }
    })
}

/// Writes the sequence sharding of `cache` to `*sharding` (shards 1, interleave 1 for a
/// cache of every token) and its sequence shard to `*shard`.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT. Reads `cache`.
///
/// # Safety
/// `cache` is NULL or live; the out pointers are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_cache_sequence_shard(
    cache: *const tpla_cache,
    sharding: *mut tpla_sequence_sharding,
    shard: *mut u32,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let spec = unsafe { handle(cache, "cache") }?.cache.spec();
        let sh = spec.sequence_sharding();
        // at most 64 shards, 2^20 tokens
        let value = tpla_sequence_sharding {
            shards: sh.shards as u32,
            interleave: sh.interleave as u32,
        };
        if shard.is_null() {
            return Err(Failure::null("shard"));
        }
        // SAFETY: caller contract.
        unsafe { write_out(sharding, value, "sharding") }?;
        // SAFETY: caller contract.
        unsafe { write_out(shard, spec.sequence_shard() as u32, "shard") }
    })
}

/// Destroys a cache, releasing its pool, its file mappings and its registered buffers
/// (calling their release callbacks); NULL is a no-op.
///
/// # Safety
/// `cache` is NULL or a cache not yet destroyed and not in use by another thread.
#[no_mangle]
pub unsafe extern "C" fn tpla_cache_destroy(cache: *mut tpla_cache) {
    // SAFETY: caller contract.
    guard_value((), || unsafe { super::destroy(cache) })
}

/// Starts an empty sequence `seq`.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT or TPLA_STATUS_INVALID_ARGUMENT (the id is already
/// in the cache). Modifies `cache`.
///
/// # Safety
/// `cache` is NULL or a live cache not used by another thread during the call.
#[no_mangle]
pub unsafe extern "C" fn tpla_cache_add_sequence(cache: *mut tpla_cache, seq: u32) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let c = unsafe { handle_mut(cache, "cache") }?;
        Ok(c.cache.add_sequence(seq)?)
    })
}

/// Drops sequence `seq`, returning its pool pages; a registered image is released when
/// its last sequence is freed.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT or TPLA_STATUS_OUT_OF_RANGE (unknown id). Modifies
/// `cache`.
///
/// # Safety
/// `cache` is NULL or a live cache not used by another thread during the call.
#[no_mangle]
pub unsafe extern "C" fn tpla_cache_free_sequence(cache: *mut tpla_cache, seq: u32) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let c = unsafe { handle_mut(cache, "cache") }?;
        Ok(c.cache.free_sequence(seq)?)
    })
}

/// Writes the number of cached tokens of `seq` in `layer` to `*len`.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT or TPLA_STATUS_OUT_OF_RANGE (unknown seq, layer).
/// Reads `cache`.
///
/// # Safety
/// `cache` is NULL or a live cache; `len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_cache_seq_len(
    cache: *const tpla_cache,
    seq: u32,
    layer: u32,
    len: *mut usize,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let c = unsafe { handle(cache, "cache") }?;
        let n = c.cache.seq_len(seq, to_usize(layer))?;
        // SAFETY: caller contract.
        unsafe { write_out(len, n, "len") }
    })
}

/// Writes the ids of the cached sequences, ascending, to `ids` (room for `capacity`
/// ids) and their number to `*count`. With `ids` NULL and `capacity` 0 it only counts.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT or TPLA_STATUS_BUFFER_TOO_SMALL (then `*count` holds
/// the number needed and `ids` is untouched). Reads `cache`.
///
/// # Safety
/// `cache` is NULL or a live cache; `ids` is NULL or writable for `capacity` ids;
/// `count` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_cache_sequence_ids(
    cache: *const tpla_cache,
    ids: *mut u32,
    capacity: usize,
    count: *mut usize,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let c = unsafe { handle(cache, "cache") }?;
        let mut all: Vec<u32> = c.cache.sequence_ids().collect();
        if ids.is_null() && capacity == 0 {
            // SAFETY: caller contract.
            return unsafe { write_out(count, all.len(), "count") };
        }
        all.sort_unstable();
        // SAFETY: caller contract.
        let room = unsafe { super::output(ids, capacity, "ids") }?;
        // SAFETY: caller contract; `count` is written before `room` is.
        unsafe { write_out(count, all.len(), "count") }?;
        if room.len() < all.len() {
            return Err(Failure::new(
                tpla_status::BufferTooSmall,
                format!(
                    "the cache holds {} sequences, ids has room for {capacity}",
                    all.len()
                ),
            ));
        }
        room[..all.len()].copy_from_slice(&all);
        Ok(())
    })
}

/// The state of a cache (`tpla_cache_get_info`).
#[repr(C)]
pub struct tpla_cache_info {
    /// Set by the caller to sizeof(tpla_cache_info) before the call.
    pub struct_size: usize,
    /// A `tpla_dtype`.
    pub dtype: u32,
    pub page_size: u32,
    pub layers: u32,
    pub groups: u32,
    pub group: u32,
    /// Values per cached token: d_c / groups + d_r.
    pub row_width: u32,
    pub capacity_pages: usize,
    pub free_pages: usize,
    pub sequences: usize,
    /// Shard images (files or buffers) some sequence still reads from.
    pub registered_images: usize,
}

// SAFETY: repr(C), first field `struct_size: usize`.
unsafe impl Versioned for tpla_cache_info {
    const NAME: &'static str = "tpla_cache_info";
}

/// Fills `*info` (whose struct_size the caller sets).
///
/// Returns TPLA_STATUS_NULL_ARGUMENT or TPLA_STATUS_WRONG_STRUCT_SIZE. Reads `cache`.
///
/// # Safety
/// `cache` is NULL or a live cache; `info` is NULL or a writable `tpla_cache_info`.
#[no_mangle]
pub unsafe extern "C" fn tpla_cache_get_info(
    cache: *const tpla_cache,
    info: *mut tpla_cache_info,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let c = &unsafe { handle(cache, "cache") }?.cache;
        // SAFETY: caller contract.
        let info = unsafe { versioned_out(info, "info") }?;
        let s = c.spec();
        // widths, page size and layer count are bounded far below u32::MAX (ShardSpec)
        let w = |v: usize| v as u32;
        *info = tpla_cache_info {
            struct_size: size_of::<tpla_cache_info>(),
            dtype: s.dtype().code(),
            page_size: w(s.page_size()),
            layers: w(s.layers()),
            groups: w(s.groups()),
            group: w(s.group()),
            row_width: w(s.row_width()),
            capacity_pages: c.capacity_pages(),
            free_pages: c.free_pages(),
            sequences: c.sequence_ids().count(),
            registered_images: c.registered_images(),
        };
        Ok(())
    })
}

/// Appends `rows_count / row_width` rows to `seq` in `layer`: rows already normalised,
/// rotated and cut to the rank's slice, [tokens][slice_width + d_r] (latent slice first,
/// then the RoPE key), rounded to the cache's dtype (TPLA_DTYPE_FP8_E4M3: each block of
/// 128 latent values scaled by its largest magnitude over 448, then rounded to e4m3; the
/// RoPE key to bf16). For a prefill done on the decode
/// rank itself; decode-time tokens go through `tpla_context_append_token`. On error the
/// cache is unchanged.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_INVALID_ARGUMENT (not whole rows,
/// values the dtype cannot hold: non-finite, or beyond f16's 65504 or bf16's 3.4e38, the
/// latter for FP8 too), TPLA_STATUS_OUT_OF_RANGE (seq, layer) or
/// TPLA_STATUS_OUT_OF_CAPACITY. Modifies `cache`.
///
/// # Safety
/// `cache` is NULL or a live cache not used by another thread during the call; `rows`
/// is NULL or readable for `rows_count` floats.
#[no_mangle]
pub unsafe extern "C" fn tpla_cache_append_rows(
    cache: *mut tpla_cache,
    seq: u32,
    layer: u32,
    rows: *const f32,
    rows_count: usize,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let c = unsafe { handle_mut(cache, "cache") }?;
        // SAFETY: caller contract.
        let rows = unsafe { input(rows, rows_count, "rows") }?;
        Ok(c.cache.append_rows(seq, to_usize(layer), &to_f64(rows))?)
    })
}

/// As `tpla_cache_append_rows`, with `position` the position in the sequence of the
/// first row: on a cache of sequence shard j (`tpla_cache_create_sequence_shard`) the
/// rows are the shard's next tokens, and a position another shard owns is
/// TPLA_STATUS_MISMATCH (`tpla_hybrid_owner_rank` names its rank), one that is not the
/// shard's next (a gap, a token twice) TPLA_STATUS_INVALID_ARGUMENT; on a cache of every
/// token `position` must be the sequence's length in `layer`. On error the cache is
/// unchanged.
///
/// Returns as `tpla_cache_append_rows`, and TPLA_STATUS_MISMATCH.
///
/// # Safety
/// As `tpla_cache_append_rows`.
#[no_mangle]
pub unsafe extern "C" fn tpla_cache_append_rows_at(
    cache: *mut tpla_cache,
    seq: u32,
    layer: u32,
    position: u64,
    rows: *const f32,
    rows_count: usize,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let c = unsafe { handle_mut(cache, "cache") }?;
        // SAFETY: caller contract.
        let rows = unsafe { input(rows, rows_count, "rows") }?;
        Ok(c.cache
            .append_rows_at(seq, to_usize(layer), position, &to_f64(rows))?)
    })
}

/// Registers the shard file at `path` (written by `tpla_export_*` or `tpla shard
/// export`): reads it into memory the cache owns, checks its data checksum and validates
/// it against the cache (geometry, group, dtype, page size, transform of every layer).
/// Its sequences join the cache with the ids of the file; their number is written to
/// `*sequences` when it is not NULL. Once this returns, nothing done to the file
/// (truncation, rewriting, removal) affects the cache; a change while it is being read is
/// reported as TPLA_STATUS_CORRUPT_FILE. The copy costs a read of the file and memory of
/// its size; `tpla_cache_register_file_mapped` is the zero-copy alternative for files
/// nothing else can truncate. Only regular files are read (a FIFO, directory or device is
/// TPLA_STATUS_IO, without blocking).
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_IO, TPLA_STATUS_CORRUPT_FILE,
/// TPLA_STATUS_MISMATCH (another geometry, group, dtype, page size or transform) or
/// TPLA_STATUS_INVALID_ARGUMENT (one of its sequence ids is already cached, a file too
/// large to copy). On error the cache is unchanged. Modifies `cache`.
///
/// # Safety
/// `cache` is NULL or a live cache not used by another thread during the call; `path`
/// is NULL or a NUL-terminated string; `sequences` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_cache_register_file(
    cache: *mut tpla_cache,
    path: *const c_char,
    sequences: *mut usize,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let c = unsafe { handle_mut(cache, "cache") }?;
        // SAFETY: caller contract.
        let path = OsStr::from_bytes(unsafe { super::c_string(path, "path") }?.to_bytes());
        let ids = c.cache.register_file(path)?;
        // SAFETY: caller contract.
        unsafe { write_count(sequences, ids.len()) }
    })
}

/// As `tpla_cache_register_file`, but zero-copy: maps the file read-only and reads its
/// rows in place, so registration costs time and memory in proportion to the metadata,
/// not the file (and the data checksum is not checked; `tpla shard inspect` does).
/// The file must not be truncated while any of its sequences is in the cache: a decode
/// step reading a page past the new end gets SIGBUS from the kernel, which kills the
/// process. Nor should it be rewritten in place (replacing it by rename is fine: the
/// mapping keeps the old file). Use it for files nothing but the engine writes.
///
/// Returns as `tpla_cache_register_file`. Modifies `cache`.
///
/// # Safety
/// As `tpla_cache_register_file`, and the file is kept as said above.
#[no_mangle]
pub unsafe extern "C" fn tpla_cache_register_file_mapped(
    cache: *mut tpla_cache,
    path: *const c_char,
    sequences: *mut usize,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let c = unsafe { handle_mut(cache, "cache") }?;
        // SAFETY: caller contract.
        let path = OsStr::from_bytes(unsafe { super::c_string(path, "path") }?.to_bytes());
        // SAFETY: the caller keeps the file as the contract above says.
        let ids = unsafe { c.cache.register_file_mapped(path) }?;
        // SAFETY: caller contract.
        unsafe { write_count(sequences, ids.len()) }
    })
}

/// Writes a registration's sequence count through `sequences` unless it is NULL.
///
/// # Safety
/// `sequences` is NULL or writable.
unsafe fn write_count(sequences: *mut usize, count: usize) -> Outcome {
    if sequences.is_null() {
        return Ok(());
    }
    // SAFETY: caller contract.
    unsafe { write_out(sequences, count, "sequences") }
}

/// Called once when a cache no longer reads a buffer given to
/// `tpla_cache_register_buffer`, with the `user` pointer given there. It may run on any
/// thread that frees the buffer's last sequence or destroys the cache.
pub type tpla_release_fn = Option<unsafe extern "C" fn(user: *mut c_void)>;

/// A caller's shard image the cache reads in place until it calls `release`.
struct BorrowedImage {
    data: *const u8,
    len: usize,
    release: tpla_release_fn,
    user: *mut c_void,
}

// SAFETY: the registration contract makes the image immutable and valid until released,
// so reading it from any thread is sound; `release` may be called from any thread.
unsafe impl Send for BorrowedImage {}
// SAFETY: as above: shared reads of immutable memory.
unsafe impl Sync for BorrowedImage {}

impl AsRef<[u8]> for BorrowedImage {
    fn as_ref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: non-NULL (checked at registration), valid and unchanged until release.
        unsafe { std::slice::from_raw_parts(self.data, self.len) }
    }
}

impl Drop for BorrowedImage {
    fn drop(&mut self) {
        if let Some(release) = self.release {
            // SAFETY: the caller's callback, called once with its own pointer.
            unsafe { release(self.user) };
        }
    }
}

/// Registers a shard image held in memory (for example filled by an export into
/// buffers and moved by the engine), read in place (zero-copy) like a mapped file. The image
/// must stay valid and unchanged until the cache calls `release(user)`, which it does
/// exactly once: when the image's last sequence is freed, when the cache is destroyed,
/// or before returning when registration fails or the image holds no sequence. With
/// `release` NULL the image must outlive the cache. The number of sequences is written
/// to `*sequences` when it is not NULL.
///
/// Returns as `tpla_cache_register_file` (TPLA_STATUS_CORRUPT_FILE for a bad image).
/// Modifies `cache`.
///
/// # Safety
/// `cache` is NULL or a live cache not used by another thread during the call; `image`
/// is NULL or readable for `image_len` bytes under the lifetime contract above;
/// `sequences` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_cache_register_buffer(
    cache: *mut tpla_cache,
    image: *const u8,
    image_len: usize,
    release: tpla_release_fn,
    user: *mut c_void,
    sequences: *mut usize,
) -> tpla_status {
    // Made before any check so that every failure path releases the image too.
    let borrowed = BorrowedImage {
        data: image,
        len: image_len,
        release,
        user,
    };
    guard(move || {
        // SAFETY: caller contract.
        let c = unsafe { handle_mut(cache, "cache") }?;
        // SAFETY: caller contract; checks NULL with a nonzero length and the size.
        unsafe { input(image, image_len, "image") }?;
        let ids = c.cache.register_buffer(borrowed)?;
        // SAFETY: caller contract.
        unsafe { write_count(sequences, ids.len()) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_page_size_is_the_caches() {
        assert_eq!(
            TPLA_DEFAULT_PAGE_SIZE as usize,
            crate::cache::DEFAULT_PAGE_SIZE
        );
    }

    #[test]
    fn thread_bound_is_the_cpu_backends() {
        assert_eq!(
            super::super::context::TPLA_MAX_THREADS as usize,
            crate::attention::cpu::MAX_THREADS
        );
    }

    #[test]
    fn register_buffer_releases_the_image_on_every_failure() {
        unsafe extern "C" fn count(user: *mut c_void) {
            // SAFETY: the test's own counter, touched by this thread only.
            unsafe { *user.cast::<u32>() += 1 };
        }
        let mut released = 0u32;
        let user = (&raw mut released).cast::<c_void>();
        let junk = [7u8; 256];
        // SAFETY: a NULL cache is refused before anything is read.
        let s = unsafe {
            tpla_cache_register_buffer(
                std::ptr::null_mut(),
                junk.as_ptr(),
                junk.len(),
                Some(count),
                user,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(s, tpla_status::NullArgument);
        assert_eq!(released, 1);
    }
}
