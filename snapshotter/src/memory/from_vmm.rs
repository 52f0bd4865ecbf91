//! Diff layers from what a VMM in another process writes out: its dump of dirty pages, or
//! its whole memory as a stream compared with the parent's.

use super::*;

/// A page-granular diff layer over `parent`, staged from the VMM's dump of the pages written
/// since the parent was saved (control request `save_dirty_memory`: a little-endian u64 count,
/// that many u32 page indices in ascending order, then the pages). Fails unless the whole dump
/// is well-formed.
///
/// With `only_changed`, pages equal to the parent's are dropped when stored: a VMM restored
/// from `parent` reports every page its guest touched since, also the ones it only read,
/// because KVM marks a page dirty when it first maps it writable, and a lazily restored page
/// is first mapped then.
pub fn stage_pages_from(
    parent: &MemoryImage,
    mut r: impl Read,
    only_changed: bool,
) -> Result<Staged, MemoryError> {
    let bad = |what: String| MemoryError::Invalid(format!("dirty-page dump: {what}"));
    let total_pages = parent.size / PAGE as u64;
    let mut n = [0u8; 8];
    r.read_exact(&mut n)
        .map_err(|e| bad(format!("header: {e}")))?;
    let n = u64::from_le_bytes(n);
    if n > total_pages {
        return Err(bad(format!("{n} pages in an image of {total_pages}")));
    }
    let mut idx = vec![0u8; n as usize * 4];
    r.read_exact(&mut idx)
        .map_err(|e| bad(format!("page list: {e}")))?;
    let pages: Vec<u32> = idx
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    if pages.windows(2).any(|w| w[0] >= w[1])
        || pages.last().is_some_and(|&p| p as u64 >= total_pages)
    {
        return Err(bad("page indices out of order or beyond the image".into()));
    }
    let mut data = vec![0u8; pages.len() * PAGE as usize];
    r.read_exact(&mut data)
        .map_err(|e| bad(format!("page data: {e}")))?;
    Ok(Staged {
        size: parent.size,
        chunk_size: parent.chunk_size,
        kind: StagedKind::Diff {
            parent: parent.clone(),
            data,
            pages,
            only_changed,
        },
    })
}

/// A page-granular diff layer over `parent` from a stream of the whole memory: every chunk is
/// hashed and compared with the parent's, and the pages of the chunks that differ are compared
/// with the parent's bytes, so it is exact without any dirty log (the CLI path, where the VMM
/// runs in another process). Returns the image and the number of changed pages.
pub fn capture_diff_from(
    store: &Store,
    parent: &MemoryImage,
    mut r: impl Read,
) -> Result<(MemoryImage, u64), MemoryError> {
    let src = ImageSource::open(store, parent)?;
    let cs = parent.chunk_size as usize;
    let mut buf = vec![0u8; cs];
    let mut old = vec![0u8; cs];
    let mut pages = Vec::new();
    let mut data = Vec::new();
    for idx in 0..src.chunks() {
        let len = (parent.size as usize - idx * cs).min(cs);
        r.read_exact(&mut buf[..len]).map_err(|e| {
            MemoryError::Invalid(format!("memory stream ended at chunk {idx}: {e}"))
        })?;
        let same = match src.chunk_id(idx) {
            Some(None) => buf[..len].iter().all(|&b| b == 0),
            Some(Some(id)) => kiln_blockstore::Digest::of(&buf[..len]) == id,
            None => false, // patched by page layers: compare the bytes below
        };
        if same {
            continue;
        }
        src.read_chunk(idx, &mut old[..len])
            .map_err(|e| MemoryError::Invalid(e.to_string()))?;
        for (p, (new, was)) in buf[..len]
            .chunks(PAGE as usize)
            .zip(old[..len].chunks(PAGE as usize))
            .enumerate()
        {
            if new != was {
                pages.push(((idx * cs) / PAGE as usize + p) as u32);
                data.extend_from_slice(new);
            }
        }
    }
    let mut layers = parent.layers.clone();
    layers.push(put_page_layer(store, parent.chunk_size, &data, &pages)?);
    Ok((
        MemoryImage {
            size: parent.size,
            chunk_size: parent.chunk_size,
            layers,
        },
        pages.len() as u64,
    ))
}
