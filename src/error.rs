//! One error type for the whole crate. Every error carries a kind (which the C ABI maps
//! to a `tpla_status`) and a sentence saying what is wrong.

use std::fmt;

/// What went wrong, coarsely: the C ABI returns one status per kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// An argument is out of its valid range or inconsistent with another.
    InvalidArgument,
    /// A valid request this build or this machine does not support.
    Unsupported,
    /// An operating-system I/O failure.
    Io,
    /// A file is truncated, corrupted or hostile.
    CorruptFile,
    /// A file or buffer belongs to another geometry, transform, group or element type.
    Mismatch,
    /// A fixed-size pool is full.
    OutOfCapacity,
    /// A sequence id or position does not exist.
    OutOfRange,
    /// The accelerator runtime failed (driver, compiler, communicator).
    Backend,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::CorruptFile, message)
    }
    pub fn mismatch(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Mismatch, message)
    }
    pub fn out_of_range(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::OutOfRange, message)
    }
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    pub fn message(&self) -> &str {
        &self.message
    }
    /// Prefixes the message with where the error happened ("layer 3: ...").
    pub fn context(self, what: impl fmt::Display) -> Self {
        Error {
            kind: self.kind,
            message: format!("{what}: {}", self.message),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::new(ErrorKind::Io, e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Error>;
