//! Storing memory images: a full capture or a page-granular diff straight from a paused VM's
//! regions, and the page layers every diff path stores.

use super::*;

/// Stores all of guest memory as a new single-layer image.
///
/// # Safety
/// Every region must stay mapped, readable and unmodified (VM paused) during the call.
pub unsafe fn capture_full(
    store: &Store,
    regions: &[HostRegion],
) -> Result<MemoryImage, MemoryError> {
    let size = total(regions);
    let opts = PutOptions {
        chunk_size: Some(MEMORY_CHUNK_SIZE),
        ..Default::default()
    };
    let cs = MEMORY_CHUNK_SIZE as usize;
    let blob = if regions.iter().all(|r| r.size % cs == 0) {
        // Every chunk lies inside one region: the store reads it in place.
        let mut starts = Vec::new(); // (first chunk, region)
        let mut first = 0;
        for r in regions {
            starts.push((first, r));
            first += r.size / cs;
        }
        store.put_chunks(size, &opts, |i| {
            let (first, r) = starts[starts.partition_point(|(f, _)| *f <= i) - 1];
            // SAFETY: chunk i - first lies inside region r, which our caller keeps mapped and
            // unmodified during this call.
            Some(unsafe { std::slice::from_raw_parts(r.host_addr.add((i - first) * cs), cs) })
        })?
    } else {
        store.put_reader(
            RegionReader {
                regions,
                region: 0,
                off: 0,
            },
            &opts,
        )?
    };
    Ok(MemoryImage {
        size,
        chunk_size: MEMORY_CHUNK_SIZE,
        layers: vec![Layer {
            blob,
            runs: None,
            unit: None,
        }],
    })
}

/// Stores the dirty pages as a new page-granular layer on top of `parent`.
///
/// # Safety
/// As for [`capture_full`].
pub unsafe fn capture_diff(
    store: &Store,
    parent: &MemoryImage,
    regions: &[HostRegion],
    dirty: &DirtyPages,
) -> Result<MemoryImage, MemoryError> {
    // SAFETY: forwarded contract.
    unsafe { stage_diff(parent, regions, dirty) }?.store(store)
}

pub(super) fn is_zero(b: &[u8]) -> bool {
    // SAFETY: any initialized bytes are valid u64s.
    let (pre, mid, post) = unsafe { b.align_to::<u64>() };
    pre.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0)
}

/// Stores `data` (the pages `pages`, back to back) as a page-granular layer.
pub(super) fn put_page_layer(
    store: &Store,
    chunk_size: u32,
    data: &[u8],
    pages: &[u32],
) -> Result<Layer, MemoryError> {
    let opts = PutOptions {
        chunk_size: Some(chunk_size),
        ..Default::default()
    };
    Ok(Layer {
        blob: store.put_bytes(data, &opts)?,
        runs: Some(to_runs(pages)),
        unit: Some(PAGE),
    })
}
