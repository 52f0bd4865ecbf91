//! File metadata as envd keeps it: `user.e2b.<key>` extended attributes, read through a path
//! (symlinks followed, as envd's reads) or an open file, written on an open file.

use crate::protocol::METADATA_XATTR_PREFIX;
use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// What the attributes are read from.
#[derive(Clone, Copy)]
pub enum On<'a> {
    File(&'a File),
    Path(&'a CStr),
}

/// Whether `e` says the file system keeps no xattrs (envd's `IsXattrUnsupported`).
pub fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTSUP))
}

/// Runs a size-query-then-fill xattr call (`listxattr`, `getxattr`) until the buffer is big
/// enough (the attributes may grow between the two calls).
fn sized(mut call: impl FnMut(*mut libc::c_void, usize) -> isize) -> io::Result<Vec<u8>> {
    loop {
        let n = call(std::ptr::null_mut(), 0);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; n as usize];
        let got = call(buf.as_mut_ptr().cast(), buf.len());
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(e);
        }
    }
}

fn list(on: On) -> io::Result<Vec<Vec<u8>>> {
    let raw = sized(|buf, len| match on {
        // SAFETY: buf is null with len 0 or points to len writable bytes; the fd is open.
        On::File(f) => unsafe { libc::flistxattr(f.as_raw_fd(), buf.cast(), len) },
        // SAFETY: as above; the path is NUL-terminated.
        On::Path(p) => unsafe { libc::listxattr(p.as_ptr(), buf.cast(), len) },
    })?;
    Ok(raw
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

fn get(on: On, name: &CStr) -> io::Result<Vec<u8>> {
    sized(|buf, len| match on {
        // SAFETY: buf is null with len 0 or points to len writable bytes; name is
        // NUL-terminated; the fd is open.
        On::File(f) => unsafe { libc::fgetxattr(f.as_raw_fd(), name.as_ptr(), buf, len) },
        // SAFETY: as above; the path is NUL-terminated.
        On::Path(p) => unsafe { libc::getxattr(p.as_ptr(), name.as_ptr(), buf, len) },
    })
}

/// The metadata of a file: its `user.e2b.*` attributes, prefix stripped; names or values that
/// are not UTF-8 are left out (envd's `ReadMetadata`). Empty when the file system keeps none.
pub fn read(on: On) -> io::Result<BTreeMap<String, String>> {
    let names = match list(on) {
        Ok(n) => n,
        Err(e) if unsupported(&e) => return Ok(BTreeMap::new()),
        Err(e) => return Err(e),
    };
    let mut out = BTreeMap::new();
    for name in names {
        let Some(key) = name.strip_prefix(METADATA_XATTR_PREFIX.as_bytes()) else {
            continue;
        };
        let Ok(key) = String::from_utf8(key.to_vec()) else {
            continue;
        };
        let cname = CString::new(name).expect("xattr names have no NUL");
        let value = match get(on, &cname) {
            Ok(v) => v,
            // Removed meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => continue,
            Err(e) => return Err(e),
        };
        if let Ok(v) = String::from_utf8(value) {
            out.insert(key, v);
        }
    }
    Ok(out)
}

fn name_of(key: &str) -> io::Result<CString> {
    CString::new(format!("{METADATA_XATTR_PREFIX}{key}"))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "metadata key holds a NUL"))
}

/// Replaces an open file's metadata with `want` (envd's `WriteMetadata`): keys not in it are
/// removed, the others set.
pub fn replace(f: &File, want: &BTreeMap<String, String>) -> io::Result<()> {
    for name in list(On::File(f))? {
        let Some(key) = name.strip_prefix(METADATA_XATTR_PREFIX.as_bytes()) else {
            continue;
        };
        if std::str::from_utf8(key).is_ok_and(|k| want.contains_key(k)) {
            continue;
        }
        let cname = CString::new(name).expect("xattr names have no NUL");
        // SAFETY: a NUL-terminated name; the fd is open.
        if unsafe { libc::fremovexattr(f.as_raw_fd(), cname.as_ptr()) } < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENODATA) {
                return Err(e);
            }
        }
    }
    for (k, v) in want {
        let name = name_of(k)?;
        // SAFETY: a NUL-terminated name and v.len() readable bytes; the fd is open.
        let r =
            unsafe { libc::fsetxattr(f.as_raw_fd(), name.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
