//! Decode schedules: the split-KV plan of one batch step as plain `i32` words, computed
//! once per step from the sequence lengths (FlashMLA's `get_mla_metadata` idea) into
//! memory the caller owns, and reused by every layer of the step.
//!
//! Every schedule starts with a header of [`HEADER_WORDS`] words:
//! `[MAGIC, kind, batch, heads, words used, three backend words]`. The body is the
//! backend's: the default (kind [`KIND_LENGTHS`]) records the lengths, the CPU backend its
//! work items. A backend checks the header, and its body against the lengths of the
//! step, before it follows a schedule, so a stale or foreign one is an error rather
//! than a wrong answer.

use super::{LatentShape, RowSource};
use crate::error::{Error, Result};

/// Words of the header every schedule starts with.
pub const HEADER_WORDS: usize = 8;
/// First word of every schedule ("TPLS").
pub const MAGIC: i32 = 0x5450_4C53;
/// The default schedule: the lengths of the batch.
pub const KIND_LENGTHS: i32 = 1;
/// The CPU backend's work items.
pub const KIND_CPU: i32 = 2;

/// A schedule's header fields after the magic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: i32,
    pub batch: usize,
    pub heads: usize,
    /// Words of the schedule in use, header included.
    pub words: usize,
    /// Backend-defined.
    pub extra: [i32; 3],
}

fn to_word(value: usize, what: &str) -> Result<i32> {
    i32::try_from(value)
        .map_err(|_| Error::invalid(format!("{what} {value} does not fit a schedule word")))
}

/// Writes `header` into the first words of `out`, which must hold `header.words`.
pub fn write_header(header: &Header, out: &mut [i32]) -> Result<()> {
    if out.len() < header.words || header.words < HEADER_WORDS {
        return Err(Error::invalid(format!(
            "the schedule needs {} words, the buffer holds {}",
            header.words,
            out.len()
        )));
    }
    out[..HEADER_WORDS].copy_from_slice(&[
        MAGIC,
        header.kind,
        to_word(header.batch, "batch")?,
        to_word(header.heads, "heads")?,
        to_word(header.words, "schedule length")?,
        header.extra[0],
        header.extra[1],
        header.extra[2],
    ]);
    Ok(())
}

/// Reads and checks the header of `schedule` for a step of `kind`, `batch` sequences
/// and `shape`; returns it with the words in use (`schedule[..header.words]`).
pub fn read_header(
    schedule: &[i32],
    kind: i32,
    batch: usize,
    shape: LatentShape,
) -> Result<Header> {
    let stale = |why: String| {
        Error::invalid(format!(
            "the decode plan does not fit this step: {why} (plan again when the batch or \
             its lengths change)"
        ))
    };
    if schedule.len() < HEADER_WORDS || schedule[0] != MAGIC {
        return Err(stale("it is not a plan (no plan header)".into()));
    }
    let word = |i: usize| usize::try_from(schedule[i]).unwrap_or(usize::MAX);
    let header = Header {
        kind: schedule[1],
        batch: word(2),
        heads: word(3),
        words: word(4),
        extra: [schedule[5], schedule[6], schedule[7]],
    };
    if header.kind != kind {
        return Err(stale(format!(
            "it was made by another backend (kind {}, expected {kind})",
            header.kind
        )));
    }
    if header.batch != batch || header.heads != shape.heads {
        return Err(stale(format!(
            "it was made for {} sequences of {} heads, the step has {batch} of {}",
            header.batch, header.heads, shape.heads
        )));
    }
    if header.words < HEADER_WORDS || header.words > schedule.len() {
        return Err(stale(format!(
            "it claims {} words, the buffer holds {}",
            header.words,
            schedule.len()
        )));
    }
    Ok(header)
}

/// Words of the default schedule.
pub fn lengths_len(_shape: LatentShape, batch: usize) -> usize {
    HEADER_WORDS.saturating_add(batch)
}

/// The default schedule: the header and the lengths.
pub fn write_lengths(shape: LatentShape, lens: &[usize], out: &mut [i32]) -> Result<()> {
    let header = Header {
        kind: KIND_LENGTHS,
        batch: lens.len(),
        heads: shape.heads,
        words: lengths_len(shape, lens.len()),
        extra: [0; 3],
    };
    write_header(&header, out)?;
    for (o, &len) in out[HEADER_WORDS..header.words].iter_mut().zip(lens) {
        *o = to_word(len, "sequence length")?;
    }
    Ok(())
}

/// Checks a default schedule against the lengths of `seqs` in `cache`.
pub fn check_lengths(
    cache: &dyn RowSource,
    shape: LatentShape,
    seqs: &[u32],
    schedule: &[i32],
) -> Result<()> {
    let header = read_header(schedule, KIND_LENGTHS, seqs.len(), shape)?;
    if header.words != lengths_len(shape, seqs.len()) {
        return Err(Error::invalid(
            "the decode plan's length is not its batch's",
        ));
    }
    for (b, (&seq, &planned)) in seqs.iter().zip(&schedule[HEADER_WORDS..]).enumerate() {
        let len = cache.seq_len(seq)?;
        if usize::try_from(planned).ok() != Some(len) {
            return Err(Error::invalid(format!(
                "the decode plan does not fit this step: it was made for length {planned} \
                 of batch entry {b}, which holds {len} tokens (plan again when the lengths \
                 change)"
            )));
        }
    }
    Ok(())
}
