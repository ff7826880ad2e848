//! How the crate opens the files it reads and creates the files it writes, in one place.

use crate::error::{Error, ErrorKind, Result};
use std::fs::{File, OpenOptions, Permissions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use tempfile::NamedTempFile;

/// Opens `path` for reading, refusing anything that is not a regular file. Errors do
/// not name the path: callers say which file it was.
///
/// The file is opened non-blocking and checked with `fstat` on the open descriptor (no
/// window for the path to be swapped between the check and the open): opening a FIFO
/// without a writer would otherwise block forever, and a directory or device would fail
/// later with an error that names neither. `O_NONBLOCK` has no effect on reads of regular
/// files.
pub(crate) fn open_regular(path: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "a directory"
        } else {
            "not a regular file but a FIFO, socket or device"
        };
        return Err(Error::new(
            ErrorKind::Io,
            format!("{what}, and libtpla reads regular files only"),
        ));
    }
    Ok(file)
}

/// A uniquely named temporary file in `dir`, to be renamed over its destination once
/// complete. It is created with mode 0666 filtered by the process umask, as `open(2)`
/// creates ordinary files, so that a decode node running as another user can read what
/// a prefill node wrote (tempfile's default, 0600, would hide it).
pub(crate) fn temp_file_in(dir: &Path, prefix: &str) -> std::io::Result<NamedTempFile> {
    tempfile::Builder::new()
        .prefix(prefix)
        .permissions(Permissions::from_mode(0o666))
        .tempfile_in(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn fifos_and_directories_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let e = open_regular(&fifo).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.message().contains("not a regular file"), "{e}");
        let e = open_regular(dir.path()).unwrap_err();
        assert!(e.message().contains("a directory"), "{e}");
    }

    #[test]
    fn temporary_files_follow_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: umask only swaps the process mask; it is restored below.
        let old = unsafe { libc::umask(0o022) };
        let temp = temp_file_in(dir.path(), ".t-");
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let mode = temp
            .unwrap()
            .as_file()
            .metadata()
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
    }
}
