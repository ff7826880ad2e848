//! Shard files read from disk: copied into memory (the safe default) or mapped read-only
//! (zero-copy, for files nothing else can truncate). The one place the crate maps files.

use super::format::ShardHeader;
use crate::error::{Error, Result};
use memmap2::Mmap;
use std::io::Read;
use std::path::Path;

/// A shard file's bytes.
enum Image {
    /// Read into memory the crate owns: nothing done to the file afterwards reaches it.
    Copied(Vec<u8>),
    /// A read-only mapping: a truncation of the file makes a later read of its lost pages
    /// raise SIGBUS, which kills the process.
    Mapped(Mmap),
}

/// A shard file whose metadata is validated ([`ShardHeader::parse`]).
pub struct ShardFile {
    image: Image,
    header: ShardHeader,
}

impl ShardFile {
    /// Reads the whole file into memory and checks its data checksum. Afterwards the
    /// file may be truncated, rewritten or removed without effect on this copy; a change
    /// while it is being read is caught (a short read, a length or checksum mismatch)
    /// and reported, never a signal: `read(2)` past a new end of file returns 0 where a
    /// mapping would fault.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let at = |e: Error| e.context(format!("shard file {}", path.display()));
        let mut file = crate::files::open_regular(path).map_err(at)?;
        let len = file.metadata().map_err(|e| at(e.into()))?.len();
        let len = usize::try_from(len)
            .map_err(|_| at(Error::invalid(format!("{len} bytes do not fit in memory"))))?;
        let mut bytes = Vec::new();
        bytes.try_reserve_exact(len).map_err(|_| {
            at(Error::invalid(format!(
                "cannot allocate {len} bytes to copy the file into memory"
            )))
        })?;
        // `take(len + 1)`: a file that grew while being read shows as one byte too many.
        let got = (&mut file)
            .take(len as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| at(e.into()))?;
        if got != len {
            return Err(at(Error::corrupt(format!(
                "the file changed size while it was read ({len} bytes at the start, {got} read)"
            ))));
        }
        let header = ShardHeader::parse(&bytes).map_err(at)?;
        header.verify_data(&bytes).map_err(at)?;
        Ok(ShardFile {
            image: Image::Copied(bytes),
            header,
        })
    }

    /// Maps the file read-only and validates its metadata; the data stays on disk until
    /// read, and its checksum is not checked (see [`verify_data`](Self::verify_data)).
    ///
    /// # Safety
    /// The file must not be truncated while this `ShardFile` (or a cache holding it)
    /// lives: reading a page past the new end raises SIGBUS, and the process dies. It
    /// should not be rewritten in place either (its rows would change under the reader;
    /// replacing it by rename is fine, the mapping keeps the old file). Use it for files
    /// nothing else writes, such as files the engine itself exported to a directory only
    /// it can write.
    pub unsafe fn map(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let at = |e: Error| e.context(format!("shard file {}", path.display()));
        let file = crate::files::open_regular(path).map_err(at)?;
        // SAFETY: read-only, only ever read through `&[u8]`; the caller guarantees that
        // the file is neither truncated nor rewritten while mapped.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| at(e.into()))?;
        let header = ShardHeader::parse(&map).map_err(at)?;
        Ok(ShardFile {
            image: Image::Mapped(map),
            header,
        })
    }

    pub fn header(&self) -> &ShardHeader {
        &self.header
    }

    /// Checks the data checksum: reads the whole image.
    pub fn verify_data(&self) -> Result<()> {
        self.header.verify_data(self.as_ref())
    }
}

impl AsRef<[u8]> for ShardFile {
    fn as_ref(&self) -> &[u8] {
        match &self.image {
            Image::Copied(bytes) => bytes,
            Image::Mapped(map) => map,
        }
    }
}
