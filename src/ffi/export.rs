//! The prefill side: cut a full-width latent cache into the g shard images.

use super::context::{tpla_dims, tpla_transform};
use super::sequence::tpla_sequence_sharding;
use super::{
    c_string, check_disjoint, guard, guard_value, hand_out, handle, handle_mut, input, span,
    to_f64, to_usize, tpla_status, versioned, write_out, Failure, Outcome, Versioned,
};
use crate::attention::reference::rotated_latents;
use crate::cache::{ExportPlan, ShardFileWriter, ShardWriter, TransformId};
use crate::dtype::DType;
use crate::geometry::SequenceSharding;
use crate::transform::Transform;
use std::ffi::{c_char, OsStr};
use std::io::Cursor;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// Options of an export (`tpla_export_create`, `tpla_export_image_len`). The library
/// copies what it needs during the call.
#[repr(C)]
pub struct tpla_export_options {
    /// sizeof(tpla_export_options).
    pub struct_size: usize,
    pub dims: tpla_dims,
    /// Latent groups g (1, 2, 4, 8): one shard image per group.
    pub groups: u32,
    /// A `tpla_dtype` for the rows.
    pub dtype: u32,
    /// Tokens per page; the decode caches must use the same.
    pub page_size: u32,
    /// The transform of every layer, [layers]: the ones the decode contexts use.
    pub transforms: *const *const tpla_transform,
    pub layers: usize,
    /// Sequence ids, [sequences], distinct.
    pub seq_ids: *const u32,
    /// Tokens of each sequence, [sequences].
    pub seq_lens: *const u64,
    pub sequences: usize,
    /// Shard file of each group, [path_count] with path_count == groups; or NULL with
    /// path_count 0 to export into `buffers`. Unused by `tpla_export_image_len`.
    pub paths: *const *const c_char,
    pub path_count: usize,
    /// Caller buffers of `buffer_len` bytes each, one per group, [buffer_count]; or NULL
    /// with buffer_count 0 to export into `paths`. Unused by `tpla_export_image_len`.
    pub buffers: *const *mut u8,
    pub buffer_count: usize,
    /// Bytes of each buffer: exactly what `tpla_export_image_len` says.
    pub buffer_len: usize,
}

// SAFETY: repr(C), first field `struct_size: usize`.
unsafe impl Versioned for tpla_export_options {
    const NAME: &'static str = "tpla_export_options";
}

enum Sink {
    Files(ShardFileWriter),
    /// Borrows the caller's buffers, which the export contract keeps valid and
    /// untouched until `tpla_export_finish` or `tpla_export_destroy`.
    Buffers(ShardWriter<Cursor<&'static mut [u8]>>),
}

/// An export in progress: the prefill's rows streamed, layer by layer and sequence by
/// sequence, into the g shard images. Use it from one thread at a time.
pub struct tpla_export {
    transforms: Vec<Transform>,
    /// None once finished (or after a failed finish).
    sink: Option<Sink>,
}

/// The plan and the layer transforms an options struct describes.
///
/// # Safety
/// `o`'s arrays hold their counts; `o.transforms` entries are NULL or live transforms.
unsafe fn plan(
    o: &tpla_export_options,
    sharding: SequenceSharding,
) -> Outcome<(ExportPlan, Vec<Transform>)> {
    // SAFETY: caller contract.
    let (handles, ids, lens) = unsafe {
        (
            input(o.transforms, o.layers, "options->transforms")?,
            input(o.seq_ids, o.sequences, "options->seq_ids")?,
            input(o.seq_lens, o.sequences, "options->seq_lens")?,
        )
    };
    let dims = o.dims.to_rust()?;
    let transforms = handles
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let what = format!("options->transforms[{i}]");
            // SAFETY: caller contract.
            let t = &unsafe { handle(t, &what) }?.transform;
            if t.dim() != dims.d_c {
                return Err(Failure::from(crate::Error::mismatch(format!(
                    "{what} is {} wide, the latent width d_c is {}",
                    t.dim(),
                    dims.d_c
                ))));
            }
            Ok(t.clone())
        })
        .collect::<Outcome<Vec<_>>>()?;
    let sequences = ids
        .iter()
        .zip(lens)
        .map(|(&id, &len)| {
            // The format can hold an empty sequence, but the C contract (and the CLI)
            // refuses it: an export of nothing is a caller's mistake.
            if len == 0 {
                return Err(Failure::invalid(format!(
                    "sequence {id} has no tokens: an export holds prefilled sequences only"
                )));
            }
            usize::try_from(len)
                .map(|len| (id, len))
                .map_err(|_| Failure::invalid(format!("sequence {id}: {len} tokens is too many")))
        })
        .collect::<Outcome<Vec<_>>>()?;
    let ids = transforms
        .iter()
        .map(|t| TransformId {
            code: t.kind().code(),
            fingerprint: t.fingerprint(),
        })
        .collect();
    let plan = ExportPlan::hybrid(
        dims,
        to_usize(o.groups),
        sharding,
        DType::from_code(o.dtype)?,
        to_usize(o.page_size),
        ids,
        &sequences,
    )?;
    Ok((plan, transforms))
}

/// Writes the size in bytes of each shard image of the export `options` describes
/// (all groups have the same size) to `*len`; `paths` and `buffers` are ignored.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_WRONG_STRUCT_SIZE,
/// TPLA_STATUS_INVALID_ARGUMENT (dims, groups, dtype, page size, layer count, duplicate
/// or empty sequences) or TPLA_STATUS_MISMATCH (a transform whose width is not d_c).
/// Thread-safe.
///
/// # Safety
/// `options` is NULL or a valid `tpla_export_options` whose arrays hold their counts;
/// `len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_export_image_len(
    options: *const tpla_export_options,
    len: *mut usize,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let o = unsafe { versioned(options, "options") }?;
        // SAFETY: caller contract.
        let (plan, _) = unsafe { plan(o, SequenceSharding::NONE) }?;
        // SAFETY: caller contract.
        unsafe { write_out(len, plan.image_len(), "len") }
    })
}

/// Writes the size in bytes of rank `rank`'s shard image of the export of `options`
/// cut by `sharding` too (`tpla_export_create_sequence_shards`; rank `r = i * shards +
/// j`, latent group i, sequence shard j; the shards hold different token counts);
/// `paths` and `buffers` are ignored.
///
/// Returns as `tpla_export_image_len`, and TPLA_STATUS_INVALID_ARGUMENT (sharding) or
/// TPLA_STATUS_OUT_OF_RANGE (rank not below groups * shards). Thread-safe.
///
/// # Safety
/// As `tpla_export_image_len`.
#[no_mangle]
pub unsafe extern "C" fn tpla_export_image_len_of(
    options: *const tpla_export_options,
    sharding: tpla_sequence_sharding,
    rank: u32,
    len: *mut usize,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let o = unsafe { versioned(options, "options") }?;
        // SAFETY: caller contract.
        let (plan, _) = unsafe { plan(o, sharding.to_rust()?) }?;
        let n = plan.image_len_of(to_usize(rank)).ok_or_else(|| {
            crate::Error::out_of_range(format!(
                "rank {rank} is out of range for an export of {} ranks",
                plan.ranks()
            ))
        })?;
        // SAFETY: caller contract.
        unsafe { write_out(len, n, "len") }
    })
}

/// Starts an export cut by latent group and by sequence shard: `groups * shards` shard
/// files, `options->paths[r]` for rank `r = i * shards + j`, holding latent slice i of
/// the tokens of each sequence whose interleave block falls on sequence shard j (in
/// position order; a sequence shorter than the blocks before shard j has none there).
/// The files are version 2 of the shard format when shards > 1 and register only into
/// the cache of their rank (`tpla_cache_create_sequence_shard`). Only files: buffers
/// would differ in size (`tpla_export_image_len_of`). Otherwise as `tpla_export_create`
/// (push every token of each sequence; each rank gets its own).
///
/// Returns as `tpla_export_create`, and TPLA_STATUS_INVALID_ARGUMENT (sharding, buffers
/// given, path count not groups * shards).
///
/// # Safety
/// As `tpla_export_create`.
#[no_mangle]
pub unsafe extern "C" fn tpla_export_create_sequence_shards(
    options: *const tpla_export_options,
    sharding: tpla_sequence_sharding,
    out: *mut *mut tpla_export,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let o = unsafe { versioned(options, "options") }?;
        if o.buffer_count != 0 || !o.buffers.is_null() {
            return Err(Failure::invalid(
                "an export cut by sequence shard writes files (options->paths): its \
                 images differ in size",
            ));
        }
        // SAFETY: caller contract.
        let (plan, transforms) = unsafe { plan(o, sharding.to_rust()?) }?;
        // SAFETY: caller contract.
        let paths = unsafe { input(o.paths, o.path_count, "options->paths") }?;
        if paths.len() != plan.ranks() {
            return Err(Failure::invalid(format!(
                "options->path_count is {}, an export of {} latent groups x {} sequence \
                 shards needs {}",
                paths.len(),
                plan.groups(),
                plan.sequence_sharding().shards,
                plan.ranks()
            )));
        }
        // SAFETY: caller contract.
        let paths = unsafe { file_paths(paths) }?;
        let sink = Sink::Files(ShardFileWriter::create(&plan, &paths)?);
        // SAFETY: caller contract.
        unsafe {
            hand_out(out, || {
                Ok(tpla_export {
                    transforms,
                    sink: Some(sink),
                })
            })
        }
    })
}

/// `options->paths` as paths (each a NUL-terminated C string, named by its index in
/// errors).
///
/// # Safety
/// Every pointer is NULL or a NUL-terminated string.
unsafe fn file_paths(paths: &[*const c_char]) -> Outcome<Vec<PathBuf>> {
    paths
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            // SAFETY: caller contract.
            let p = unsafe { c_string(p, &format!("options->paths[{i}]")) }?;
            Ok(PathBuf::from(OsStr::from_bytes(p.to_bytes())))
        })
        .collect()
}

/// Starts an export into the files `options->paths` (written to temporary files and
/// renamed into place by `tpla_export_finish`) or the caller's `options->buffers`
/// (which must stay valid and must not be touched until `tpla_export_finish` returns or
/// the export is destroyed). Then call `tpla_export_push` once per (layer, sequence),
/// layer-major, sequences in the order of `options->seq_ids`, and `tpla_export_finish`.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_WRONG_STRUCT_SIZE,
/// TPLA_STATUS_INVALID_ARGUMENT (as `tpla_export_image_len`; neither or both of paths
/// and buffers; path or buffer count not equal to groups; two paths naming one file;
/// wrong buffer_len), TPLA_STATUS_MISMATCH (as `tpla_export_image_len`) or
/// TPLA_STATUS_IO. Thread-safe.
///
/// # Safety
/// `options` is NULL or a valid `tpla_export_options` whose arrays hold their counts
/// (paths NUL-terminated; buffers writable for `buffer_len` bytes each, disjoint, and
/// kept as said above); `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_export_create(
    options: *const tpla_export_options,
    out: *mut *mut tpla_export,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let o = unsafe { versioned(options, "options") }?;
        // SAFETY: caller contract.
        let (plan, transforms) = unsafe { plan(o, SequenceSharding::NONE) }?;
        // SAFETY: caller contract.
        let (paths, buffers) = unsafe {
            (
                input(o.paths, o.path_count, "options->paths")?,
                input(o.buffers, o.buffer_count, "options->buffers")?,
            )
        };
        let sink = match (paths.is_empty(), buffers.is_empty()) {
            (false, true) => {
                // SAFETY: caller contract.
                let paths = unsafe { file_paths(paths) }?;
                Sink::Files(ShardFileWriter::create(&plan, &paths)?)
            }
            (true, false) => {
                let spans: Vec<_> = buffers
                    .iter()
                    .map(|&b| span(b, o.buffer_len, "an export buffer"))
                    .collect();
                check_disjoint(&spans, &[])?;
                let views = buffers
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| {
                        // SAFETY: caller contract: writable, disjoint (checked above),
                        // untouched until the export ends; 'static stands for that.
                        unsafe { super::output(b, o.buffer_len, &format!("options->buffers[{i}]")) }
                    })
                    .collect::<Outcome<Vec<&'static mut [u8]>>>()?;
                Sink::Buffers(ShardWriter::to_buffers(&plan, views)?)
            }
            _ => {
                return Err(Failure::invalid(
                    "give either paths (path_count = groups) or buffers (buffer_count = \
                     groups), not both or neither",
                ))
            }
        };
        // SAFETY: caller contract.
        unsafe {
            hand_out(out, || {
                Ok(tpla_export {
                    transforms,
                    sink: Some(sink),
                })
            })
        }
    })
}

const FINISHED: &str = "the export is already finished";

fn active(e: &mut tpla_export) -> Outcome<&mut Sink> {
    e.sink.as_mut().ok_or_else(|| Failure::invalid(FINISHED))
}

fn next_block(e: &tpla_export) -> Outcome<Option<(usize, u32)>> {
    match &e.sink {
        Some(Sink::Files(w)) => Ok(w.next_block()),
        Some(Sink::Buffers(w)) => Ok(w.next_block()),
        None => Err(Failure::invalid(FINISHED)),
    }
}

/// Tells which block the next `tpla_export_push` must carry: `*done` is set to true when
/// every block is written, otherwise to false with `*layer` and `*seq` set.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT or TPLA_STATUS_INVALID_ARGUMENT (the export is
/// finished). Reads `export_`.
///
/// # Safety
/// `export_` is NULL or a live export; the out pointers are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_export_next_block(
    export_: *const tpla_export,
    done: *mut bool,
    layer: *mut u32,
    seq: *mut u32,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let next = next_block(unsafe { handle(export_, "export") }?)?;
        // SAFETY: caller contract.
        unsafe {
            write_out(done, next.is_none(), "done")?;
            if let Some((l, s)) = next {
                // Layers are below MAX_LAYERS (4096).
                write_out(layer, l as u32, "layer")?;
                write_out(seq, s, "seq")?;
            }
        }
        Ok(())
    })
}

/// Writes the next (layer, sequence) block: `latents` are the sequence's pre-norm
/// latents a_t in that layer, [tokens][d_c]; `k_rope` its RoPE-rotated keys,
/// [tokens][d_r]. The export normalises, rotates by the layer's transform and cuts each
/// row into the g slices.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_INVALID_ARGUMENT (counts that do not
/// match the sequence's length, non-finite values or values the dtype cannot hold, named
/// by their index in `latents` or `k_rope`, every block already
/// written, finished export, an earlier failed write) or TPLA_STATUS_IO. Modifies
/// `export_`.
///
/// # Safety
/// `export_` is NULL or a live export not used by another thread during the call;
/// arrays hold their counts.
#[no_mangle]
pub unsafe extern "C" fn tpla_export_push(
    export_: *mut tpla_export,
    latents: *const f32,
    latents_count: usize,
    k_rope: *const f32,
    k_rope_count: usize,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let e = unsafe { handle_mut(export_, "export") }?;
        // SAFETY: caller contract.
        let (a, kr) = unsafe {
            (
                input(latents, latents_count, "latents")?,
                input(k_rope, k_rope_count, "k_rope")?,
            )
        };
        let Some((layer, _)) = next_block(e)? else {
            return Err(Failure::invalid(
                "every layer of every sequence is already written",
            ));
        };
        let t = &e.transforms[layer];
        // checked here: the rotation would spread a non-finite value over its row
        crate::decode::check_finite("latents", a)?;
        crate::decode::check_finite("k_rope", kr)?;
        if a.len() % t.dim() != 0 {
            return Err(Failure::invalid(format!(
                "latents holds {} values, not a whole number of {}-wide rows",
                a.len(),
                t.dim()
            )));
        }
        let rotated = rotated_latents(&to_f64(a), t);
        let rope = to_f64(kr);
        match active(e)? {
            Sink::Files(w) => w.push(&rotated, &rope)?,
            Sink::Buffers(w) => w.push(&rotated, &rope)?,
        }
        Ok(())
    })
}

/// Completes the export: writes the checksums; for files, syncs them and renames them
/// into place (a reader never sees a half-written shard). Afterwards the buffers or files
/// hold the shard images, and the export accepts only `tpla_export_destroy`. A failed
/// finish also ends the export (temporary files are removed).
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_INVALID_ARGUMENT (blocks missing,
/// already finished) or TPLA_STATUS_IO. Modifies `export_`.
///
/// # Safety
/// `export_` is NULL or a live export not used by another thread during the call.
#[no_mangle]
pub unsafe extern "C" fn tpla_export_finish(export_: *mut tpla_export) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let e = unsafe { handle_mut(export_, "export") }?;
        active(e)?;
        match e.sink.take().expect("checked active") {
            Sink::Files(w) => w.commit()?,
            Sink::Buffers(w) => drop(w.finish()?),
        }
        Ok(())
    })
}

/// Destroys an export; NULL is a no-op. An unfinished export into files removes its
/// temporary files and leaves the destinations untouched.
///
/// # Safety
/// `export_` is NULL or an export not yet destroyed and not in use by another thread.
#[no_mangle]
pub unsafe extern "C" fn tpla_export_destroy(export_: *mut tpla_export) {
    // SAFETY: caller contract.
    guard_value((), || unsafe { super::destroy(export_) })
}
