//! A shard file mapped read-only: the one place the crate maps files.

use super::format::ShardHeader;
use crate::error::{Error, Result};
use memmap2::Mmap;
use std::fs::File;
use std::path::Path;

/// A shard file mapped read-only, its metadata validated ([`ShardHeader::parse`]).
/// Opening it reads the header and tables only; the data stays on disk until read.
///
/// The file must not be truncated or rewritten in place while mapped (shard writers
/// replace files by rename, which leaves a mapping intact).
pub struct ShardFile {
    map: Mmap,
    header: ShardHeader,
}

impl ShardFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let at = |e: Error| e.context(format!("shard file {}", path.display()));
        let file = File::open(path).map_err(|e| at(e.into()))?;
        // SAFETY: the mapping is read-only and only ever read through `&[u8]`. The one
        // hazard, another process truncating or rewriting the file while it is mapped,
        // is excluded by the contract above.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| at(e.into()))?;
        let header = ShardHeader::parse(&map).map_err(at)?;
        Ok(ShardFile { map, header })
    }

    pub fn header(&self) -> &ShardHeader {
        &self.header
    }

    /// Checks the data checksum: reads the whole file.
    pub fn verify_data(&self) -> Result<()> {
        self.header.verify_data(&self.map)
    }
}

impl AsRef<[u8]> for ShardFile {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}
