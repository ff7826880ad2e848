//! Run-time compilation of the kernels with NVRTC, for the device's own architecture,
//! with an on-disk cache of the resulting cubins.
//!
//! The cache key is the source text, the options, the target architecture and the
//! NVRTC version; the full key is stored in the file and compared on load, so a hash
//! collision or a stale file means a recompile, never a wrong kernel.

use crate::error::{Error, ErrorKind, Result};
use cudarc::nvrtc::{result, sys};
use std::ffi::CString;
use std::path::{Path, PathBuf};

/// Where compiled kernels are kept: `$TPLA_CACHE_DIR`, else `$XDG_CACHE_HOME/tpla`,
/// else `$HOME/.cache/tpla`; `None` when none of these is set (no disk cache).
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("TPLA_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("tpla"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("tpla"))
}

/// The NVRTC library's version, or an `Unsupported` error when libnvrtc is absent.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    // cudarc panics on first use when the library is absent: look before touching it.
    // SAFETY: only tries to dlopen libnvrtc by its usual names.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::unsupported(
            "the NVRTC library (libnvrtc.so) was not found: the CUDA backend compiles its \
             kernels at run time and needs it (add its directory to LD_LIBRARY_PATH)",
        ));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-pointers to live integers.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| {
            Error::new(
                ErrorKind::Backend,
                format!("NVRTC: reading its version: {e}"),
            )
        })?;
    Ok((major, minor))
}

/// How one module was obtained: compiled now or read from the disk cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Compiled,
    DiskCache,
}

/// Compiles `source` for `sm_{cc}` (`sm_{cc}a` with `arch_specific`: the instructions
/// of that one architecture, such as Hopper's wgmma) with `options` (the architecture
/// option is added here) and returns the cubin, through the disk cache in `cache_dir`
/// when given.
pub fn compile_cubin(
    source: &str,
    name: &str,
    options: &[String],
    cc: (i32, i32),
    arch_specific: bool,
    cache_dir: Option<&Path>,
) -> Result<(Vec<u8>, Origin)> {
    let version = nvrtc_version()?;
    let arch = format!(
        "--gpu-architecture=sm_{}{}{}",
        cc.0,
        cc.1,
        if arch_specific { "a" } else { "" }
    );
    let mut all = vec![arch];
    all.extend(options.iter().cloned());
    let key = format!(
        "tpla-kernel-v1 nvrtc={}.{} source={:016x} len={} options={}",
        version.0,
        version.1,
        fnv1a(source.as_bytes()),
        source.len(),
        all.join(" ")
    );
    let file = cache_dir.map(|d| d.join(format!("{name}-{:016x}.cubin", fnv1a(key.as_bytes()))));
    if let Some(cubin) = file.as_deref().and_then(|f| read_cached(f, &key)) {
        return Ok((cubin, Origin::DiskCache));
    }
    let (cubin, _log) = compile(source, name, &all)?;
    if let Some(f) = &file {
        // A cache that cannot be written costs a recompile next time, nothing more.
        let _ = write_cached(f, &key, &cubin);
    }
    Ok((cubin, Origin::Compiled))
}

/// Compiles `source` with exactly `options`; returns the cubin and NVRTC's log.
pub(super) fn compile(source: &str, name: &str, options: &[String]) -> Result<(Vec<u8>, String)> {
    let backend = |what: &str, e: result::NvrtcError| {
        Error::new(ErrorKind::Backend, format!("NVRTC: {what}: {e}"))
    };
    let src = CString::new(source).map_err(|_| Error::invalid("kernel source holds a NUL byte"))?;
    let cname = CString::new(format!("{name}.cu")).expect("no NUL in kernel names");
    let prog =
        result::create_program(&src, Some(&cname)).map_err(|e| backend("creating a program", e))?;
    let log = |prog| {
        // SAFETY: prog is live (called before destroy_program).
        unsafe { result::get_program_log(prog) }
            .map(|l| {
                let bytes: Vec<u8> = l.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            })
            .unwrap_or_default()
    };
    // SAFETY: prog is live until destroy_program below, on every path.
    let out = unsafe {
        match result::compile_program(prog, options) {
            Ok(()) => {
                let mut size = 0usize;
                sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .and_then(|()| {
                        let mut buf = vec![0u8; size];
                        sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut _)
                            .result()
                            .map(|()| (buf, log(prog)))
                    })
                    .map_err(|e| backend("reading the compiled cubin", e))
            }
            Err(e) => {
                let log = log(prog);
                Err(Error::new(
                    ErrorKind::Backend,
                    format!(
                        "NVRTC could not compile {name}.cu ({e}) with options [{}]; log:\n{log}",
                        options.join(" ")
                    ),
                ))
            }
        }
    };
    // SAFETY: prog came from create_program and is destroyed once.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

fn read_cached(file: &Path, key: &str) -> Option<Vec<u8>> {
    let data = std::fs::read(file).ok()?;
    let header_len = key.len() + 1;
    if data.len() > header_len && data[..key.len()] == *key.as_bytes() && data[key.len()] == b'\n' {
        Some(data[header_len..].to_vec())
    } else {
        None
    }
}

fn write_cached(file: &Path, key: &str, cubin: &[u8]) -> std::io::Result<()> {
    let dir = file.parent().expect("cache files live in a directory");
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        file.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("kernel"),
        std::process::id()
    ));
    let mut data = Vec::with_capacity(key.len() + 1 + cubin.len());
    data.extend_from_slice(key.as_bytes());
    data.push(b'\n');
    data.extend_from_slice(cubin);
    std::fs::write(&tmp, &data)?;
    std::fs::rename(&tmp, file)
}

/// 64-bit FNV-1a: a stable hash for cache file names (the full key is checked on load).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_files_round_trip_and_reject_other_keys() {
        let dir = std::env::temp_dir().join(format!("tpla-kcache-{}", std::process::id()));
        let f = dir.join("k.cubin");
        write_cached(&f, "key one", b"\x7fELF-bytes").unwrap();
        assert_eq!(read_cached(&f, "key one").unwrap(), b"\x7fELF-bytes");
        assert!(read_cached(&f, "key two").is_none());
        assert!(read_cached(&dir.join("missing"), "key one").is_none());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
    }
}
