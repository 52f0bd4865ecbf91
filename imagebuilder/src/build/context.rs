//! The build context and paths in a stage's root: hashing trees, resolving and globbing
//! paths, `.dockerignore`, directories made inside the root without following its links.

use crate::error::{IoCtx, Result};
use crate::layer::{self, ApplyOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Content hash of a file or a directory tree (names, types, modes, contents; not times).
pub(super) fn tree_hash(p: &Path) -> Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let host = p.join(&rel);
        let m = std::fs::symlink_metadata(&host).ctx("lstat", &host)?;
        h.update(rel.as_os_str().as_encoded_bytes());
        h.update(&m.mode().to_le_bytes());
        if m.is_dir() {
            let mut names: Vec<_> = std::fs::read_dir(&host)
                .ctx("read dir", &host)?
                .filter_map(|e| e.ok().map(|e| e.file_name()))
                .collect();
            names.sort();
            // Reversed so the stack pops them in order.
            for n in names.into_iter().rev() {
                stack.push(rel.join(n));
            }
        } else if m.file_type().is_symlink() {
            let t = std::fs::read_link(&host).ctx("readlink", &host)?;
            h.update(t.as_os_str().as_encoded_bytes());
        } else if m.is_file() {
            h.update(hash_file(&host)?.as_bytes());
        }
    }
    Ok(h.finalize())
}

pub(super) fn hash_file(p: &Path) -> Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    let f = std::fs::File::open(p).ctx("open", p)?;
    h.update_reader(f).ctx("read", p)?;
    Ok(h.finalize())
}

/// `path` made absolute against `cwd`, normalised (no `.`/`..`, no trailing slash).
pub(super) fn resolve_in(cwd: &str, path: &str) -> String {
    let full = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{}/{path}", cwd.trim_end_matches('/'))
    };
    let mut parts: Vec<&str> = Vec::new();
    for c in full.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// A context-relative source path, or None if it leaves the context.
pub(super) fn clean_rel(s: &str) -> Option<PathBuf> {
    let mut parts: Vec<&str> = Vec::new();
    for c in s.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.iter().collect())
}

/// Expands `*`/`?` in the last component of a source path.
pub(super) fn expand_glob(root: &Path, rel: &Path) -> Vec<PathBuf> {
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !name.contains(['*', '?']) {
        return if std::fs::symlink_metadata(root.join(rel)).is_ok() {
            vec![rel.to_path_buf()]
        } else {
            Vec::new()
        };
    }
    let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut out: Vec<PathBuf> = std::fs::read_dir(root.join(&parent))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| wildcard(&name, n))
                .map(|n| parent.join(n))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

pub(super) fn wildcard(pat: &str, s: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (pat.chars().collect(), s.chars().collect());
    fn m(p: &[char], s: &[char]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some('*'), _) => m(&p[1..], s) || (!s.is_empty() && m(p, &s[1..])),
            (Some('?'), Some(_)) => m(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => m(&p[1..], &s[1..]),
            _ => false,
        }
    }
    m(&p, &s)
}

/// Matches path components against pattern components (`**` = any number of components).
pub(super) fn glob_match(pat: &[String], path: &[String]) -> bool {
    match (pat.first(), path.first()) {
        (None, None) => true,
        (Some(p), _) if p == "**" => {
            glob_match(&pat[1..], path) || (!path.is_empty() && glob_match(pat, &path[1..]))
        }
        (Some(p), Some(c)) => wildcard(p, c) && glob_match(&pat[1..], &path[1..]),
        _ => false,
    }
}

pub(super) fn read_dockerignore(context: &Path) -> Vec<(bool, Vec<String>)> {
    let Ok(text) = std::fs::read_to_string(context.join(".dockerignore")) else {
        return Vec::new();
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (neg, p) = match l.strip_prefix('!') {
                Some(p) => (true, p.trim()),
                None => (false, l),
            };
            let comps = p
                .split('/')
                .filter(|c| !c.is_empty() && *c != ".")
                .map(String::from)
                .collect();
            (neg, comps)
        })
        .collect()
}

/// Whether the absolute in-image path `abs` is a directory reached through directories only
/// (a symlink on the way would resolve on the host, so it does not count).
pub(super) fn real_dir_in(root: &Path, abs: &str) -> bool {
    let mut p = root.to_path_buf();
    for c in abs.split('/').filter(|c| !c.is_empty()) {
        p.push(c);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            _ => return false,
        }
    }
    true
}

/// `mkdir -p` of an absolute in-image path, never following symlinks out of the root.
pub(super) fn mkdir_in_root(root: &Path, abs: &str) -> Result<()> {
    let mut t = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    h.set_mtime(0);
    let p = abs.trim_start_matches('/');
    if p.is_empty() {
        return Ok(());
    }
    let target = root.join(p);
    if std::fs::symlink_metadata(&target)
        .map(|m| m.is_dir())
        .unwrap_or(false)
    {
        return Ok(());
    }
    t.append_data(&mut h, format!("{p}/"), std::io::empty())
        .ctx("write", "mkdir tar")?;
    let bytes = t.into_inner().ctx("finish", "mkdir tar")?;
    layer::apply_layer(root, &bytes[..], &ApplyOptions::default())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_globs() {
        assert_eq!(resolve_in("/app", "sub/../x"), "/app/x");
        assert_eq!(resolve_in("/app", "/etc/"), "/etc");
        assert!(clean_rel("../x").is_none());
        assert!(wildcard("*.txt", "a.txt") && !wildcard("*.txt", "a.rs"));
        let p = |s: &str| s.split('/').map(String::from).collect::<Vec<_>>();
        assert!(glob_match(&p("**/*.log"), &p("a/b/c.log")));
        assert!(!glob_match(&p("*.log"), &p("a/c.log")));
    }
}
