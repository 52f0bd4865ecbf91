//! Memory images against the real block store and real userfaultfd: capture, lazy restore,
//! diff chains, and damaged stores.

use kiln_blockstore::Store;
use kiln_snapshotter::lazy::{FatalHook, LazyMemory, LazyOptions};
use kiln_snapshotter::memory::{self, DirtyPages, HostRegion, ImageSource};
use kiln_snapshotter::Mapping;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// Guest-like memory: random pages, zero stretches, and repeated pages.
fn fill(m: &Mapping, seed: u64) {
    // SAFETY: the test owns the mapping exclusively.
    let s = unsafe { m.as_mut_slice() };
    let mut r = xorshift(seed);
    for (i, page) in s.chunks_mut(4096).enumerate() {
        match i % 16 {
            0..=8 => page.iter_mut().for_each(|b| *b = r() as u8),
            9 => page.fill(0xab),
            _ => page.fill(0),
        }
    }
}

fn region(m: &Mapping) -> HostRegion {
    HostRegion {
        host_addr: m.as_ptr(),
        size: m.len(),
    }
}

fn no_fatal() -> FatalHook {
    Arc::new(|m: &str| panic!("page handler failed: {m}"))
}

fn restore(store: &Store, img: &memory::MemoryImage) -> LazyMemory {
    let src = ImageSource::open(store, img).unwrap();
    LazyMemory::new(
        Arc::new(src),
        LazyOptions {
            on_fatal: no_fatal(),
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn full_capture_restores_identically_and_stores_no_zero_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    // Two regions, as a VM with memory above the MMIO gap has.
    let (a, b) = (
        Mapping::anonymous(8 * MIB).unwrap(),
        Mapping::anonymous(4 * MIB).unwrap(),
    );
    fill(&a, 1);
    fill(&b, 2);
    // A fully zero MiB in the middle of region a costs nothing.
    // SAFETY: exclusive test mapping.
    unsafe { a.as_mut_slice()[2 * MIB..3 * MIB].fill(0) };
    // SAFETY: nothing writes the mappings during capture.
    let img = unsafe { memory::capture_full(&store, &[region(&a), region(&b)]) }.unwrap();
    assert_eq!(img.size, 12 * MIB as u64);
    let stat = store.stat(&img.layers[0].blob).unwrap();
    assert!(stat.zero_chunks >= 16, "zero chunks stored: {stat:?}");

    let mem = restore(&store, &img);
    // SAFETY: exclusive.
    let got = unsafe { mem.mapping().as_slice() };
    // SAFETY: exclusive.
    let (ea, eb) = unsafe { (a.as_slice(), b.as_slice()) };
    assert!(got[..8 * MIB] == *ea, "region a differs after restore");
    assert!(got[8 * MIB..] == *eb, "region b differs after restore");
    let st = mem.stats();
    assert_eq!(
        st.demand_chunks as usize,
        12 * MIB / memory::MEMORY_CHUNK_SIZE as usize
    );
    assert!(st.zero_chunks >= 16);
}

/// The staged capture (copy while paused, store later) stores exactly what the streamed one
/// does: same blob id, over regions whose boundary falls inside a chunk and a short last chunk.
#[test]
fn staged_capture_stores_the_same_image_as_streaming() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let (a, b) = (
        Mapping::anonymous(5 * MIB + 12 * 1024).unwrap(),
        Mapping::anonymous(3 * MIB - 4096).unwrap(),
    );
    fill(&a, 3);
    fill(&b, 4);
    // SAFETY: exclusive test mappings.
    unsafe { a.as_mut_slice()[MIB..2 * MIB].fill(0) };
    let regions = [region(&a), region(&b)];
    // SAFETY: nothing writes the mappings during capture.
    let staged = unsafe { memory::stage_full(&regions) }.unwrap();
    assert!(
        staged.bytes() < 8 * MIB,
        "zero chunks are not copied: {}",
        staged.bytes()
    );
    // The staged copy is independent of the live memory from here on.
    let want: Vec<u8> = unsafe { [a.as_slice(), b.as_slice()].concat() };
    fill(&a, 99);
    let img = staged.store(&store).unwrap();
    // SAFETY: restore the live memory, then capture it streamed.
    unsafe { a.as_mut_slice().copy_from_slice(&want[..a.len()]) };
    let streamed = unsafe { memory::capture_full(&store, &regions) }.unwrap();
    assert_eq!(img, streamed);
    // The same bytes through a stream (the CLI's FIFO), staged: the same image again, and a
    // short stream is an error before anything is stored.
    let from_stream = memory::stage_stream(want.len() as u64, &want[..]).unwrap();
    assert_eq!(from_stream.store(&store).unwrap(), img);
    assert!(memory::stage_stream(want.len() as u64, &want[..want.len() - 1]).is_err());
    let mem = restore(&store, &img);
    // SAFETY: exclusive.
    assert!(unsafe { mem.mapping().as_slice() } == &want[..]);
}

/// Copying another process's memory (here our own, through process_vm_readv) stores the same
/// image as capturing it directly: untouched pages of plain anonymous memory are skipped, and
/// memory a userfaultfd handler fills lazily is read, never taken for zeros.
#[test]
fn staged_from_a_process_matches_and_never_skips_lazy_memory() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let pid = std::process::id() as i32;
    // Plain anonymous memory: data in the first 3 MiB, the rest never touched.
    let m = Mapping::anonymous(8 * MIB).unwrap();
    // SAFETY: exclusive test mapping.
    unsafe { m.as_mut_slice()[..3 * MIB].fill(0x5a) };
    let regions = [(m.as_ptr() as u64, m.len() as u64)];
    let img = memory::stage_process(pid, &regions)
        .unwrap()
        .store(&store)
        .unwrap();
    // SAFETY: nothing writes the mapping meanwhile.
    assert_eq!(
        img,
        unsafe { memory::capture_full(&store, &[region(&m)]) }.unwrap()
    );
    // The same bytes served lazily by userfaultfd: pagemap shows them missing, yet they are
    // not zero; the copy must fault them in.
    let lazy = restore(&store, &img);
    let regions = [(lazy.host_addr() as u64, lazy.len() as u64)];
    let again = memory::stage_process(pid, &regions)
        .unwrap()
        .store(&store)
        .unwrap();
    assert_eq!(again, img, "lazily restored memory copied exactly");
}

/// The CLI's diff (a memory stream, no dirty log) finds exactly the changed pages, also over a
/// parent whose chunks are patched by a page-granular layer.
#[test]
fn streamed_diff_stores_exactly_the_changed_pages() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let m = Mapping::anonymous(4 * MIB).unwrap();
    fill(&m, 5);
    // SAFETY: exclusive test mapping, nothing writes it during captures.
    let base = unsafe { memory::capture_full(&store, &[region(&m)]) }.unwrap();
    let s = unsafe { m.as_mut_slice() };
    let mut dirty = DirtyPages::new((4 * MIB / 4096) as u64);
    for p in [3usize, 17, 18, 700] {
        s[p * 4096 + 100] ^= 0xff;
        dirty.set(p as u64);
    }
    let gen1 = unsafe { memory::capture_diff(&store, &base, &[region(&m)], &dirty) }.unwrap();
    let want1 = s.to_vec();
    // Change pages in chunks gen1 patched (page 3's chunk) and elsewhere; rewrite page 17
    // with its own bytes (not a change).
    s[4 * 4096] ^= 1;
    s[900 * 4096 + 5] ^= 1;
    s[1000 * 4096..1001 * 4096].fill(0);
    let (gen2, changed) = memory::capture_diff_from(&store, &gen1, &s[..]).unwrap();
    assert_eq!(changed, 3, "pages 4, 900, 1000");
    assert_eq!(
        gen2.layers.last().unwrap().runs,
        Some(vec![[4, 1], [900, 1], [1000, 1]])
    );
    let want2 = s.to_vec();
    fill(&m, 1234);
    for (img, want) in [(&gen1, &want1), (&gen2, &want2)] {
        let mem = restore(&store, img);
        // SAFETY: exclusive.
        assert!(unsafe { mem.mapping().as_slice() } == &want[..]);
    }
}

#[test]
fn diff_chain_of_three_restores_each_generation_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let m = Mapping::anonymous(16 * MIB).unwrap();
    fill(&m, 7);
    // SAFETY: VM-less capture of a mapping nobody writes meanwhile.
    let mut img = unsafe { memory::capture_full(&store, &[region(&m)]) }.unwrap();
    let mut generations = vec![(img.clone(), unsafe { m.as_slice() }.to_vec())];
    let mut r = xorshift(99);
    let pages = (16 * MIB / 4096) as u64;
    for gen in 0..3 {
        let mut dirty = DirtyPages::new(pages);
        // ~1% of pages written, plus one page zeroed (a chunk may become all-zero too).
        for _ in 0..(pages / 100) {
            let p = r() % pages;
            // SAFETY: exclusive.
            let s = unsafe { m.as_mut_slice() };
            s[(p as usize) * 4096 + (r() % 4096) as usize] ^= 0x5a;
            dirty.set(p);
        }
        let z = (gen * 37 + 5) as u64;
        // SAFETY: exclusive.
        unsafe { m.as_mut_slice()[z as usize * 4096..(z as usize + 1) * 4096].fill(0) };
        dirty.set(z);
        // SAFETY: as above.
        img = unsafe { memory::capture_diff(&store, &img, &[region(&m)], &dirty) }.unwrap();
        let layer = img.layers.last().unwrap();
        assert_eq!(
            store.stat(&layer.blob).unwrap().size,
            dirty.count() * 4096,
            "diff layer holds only the dirty pages"
        );
        assert_eq!(layer.unit, Some(memory::PAGE));
        generations.push((img.clone(), unsafe { m.as_slice() }.to_vec()));
    }
    assert_eq!(img.layers.len(), 4);
    // Scribble over the live memory so nothing can come from it by accident.
    fill(&m, 12345);
    for (i, (img, want)) in generations.iter().enumerate() {
        let mem = restore(&store, img);
        // SAFETY: exclusive.
        let got = unsafe { mem.mapping().as_slice() };
        assert!(got == &want[..], "generation {i} differs after restore");
    }
    // The record round-trips through JSON.
    let json = serde_json::to_string(&img).unwrap();
    assert_eq!(
        serde_json::from_str::<memory::MemoryImage>(&json).unwrap(),
        img
    );
}

/// Flips bytes in the middle and at the end of a chunk's stored frame.
fn flip_frame(loc: &kiln_blockstore::ChunkLocation) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&loc.path)
        .unwrap();
    for at in [loc.offset + loc.len / 2, loc.offset + loc.len - 1] {
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0xff], at).unwrap();
    }
}

/// A damaged store gives a clear error naming the chunk, the memory is fenced off, and the
/// thread that touched it gets EFAULT (as a vCPU's KVM_RUN would) instead of wrong bytes.
fn damaged_store_case(damage: impl Fn(&Store, &[kiln_blockstore::ChunkId]), expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let sdir = dir.path().join("store");
    let m = Mapping::anonymous(4 * MIB).unwrap();
    // SAFETY: exclusive.
    unsafe { m.as_mut_slice() }
        .chunks_mut(4096)
        .enumerate()
        .for_each(|(i, p)| p.fill(i as u8 | 1));
    let img = {
        let store = Store::open(&sdir).unwrap();
        // SAFETY: exclusive.
        unsafe { memory::capture_full(&store, &[region(&m)]) }.unwrap()
    };
    {
        let store = Store::open(&sdir).unwrap();
        let blob = store.open_blob(&img.layers[0].blob).unwrap();
        let ids: std::collections::BTreeSet<_> = blob.manifest().chunks.iter().flatten().collect();
        damage(&store, &ids.into_iter().copied().collect::<Vec<_>>());
    }
    let store = Store::open(&sdir).unwrap(); // fresh: no chunk in its memory cache
    let src = ImageSource::open(&store, &img).unwrap();
    let fired = Arc::new(Mutex::new(None::<String>));
    let f2 = fired.clone();
    let mem = LazyMemory::new(
        Arc::new(src),
        LazyOptions {
            on_fatal: Arc::new(move |m: &str| *f2.lock().unwrap() = Some(m.to_string())),
            ..Default::default()
        },
    )
    .unwrap();
    let addr = mem.host_addr() as usize;
    let mut p = [0i32; 2];
    // SAFETY: a pipe into a local array.
    assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
    // SAFETY: the kernel reads 4096 bytes of the mapping (alive until mem drops).
    let r = unsafe { libc::write(p[1], addr as *const libc::c_void, 4096) };
    let errno = std::io::Error::last_os_error().raw_os_error();
    // SAFETY: closing our pipe.
    unsafe {
        libc::close(p[0]);
        libc::close(p[1]);
    }
    assert_eq!(
        (r, errno),
        (-1, Some(libc::EFAULT)),
        "touching damaged memory must fail"
    );
    let t = Instant::now();
    while fired.lock().unwrap().is_none() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let msg = fired.lock().unwrap().clone().expect("fatal hook ran");
    assert!(
        msg.contains("chunk 0") && msg.contains(expect),
        "unclear error: {msg}"
    );
}

#[test]
fn corrupt_chunk_is_a_clear_error_and_no_wrong_memory() {
    damaged_store_case(
        |store, ids| {
            for id in ids {
                flip_frame(&store.local_chunk(id).unwrap());
            }
        },
        "chunk",
    );
}

#[test]
fn missing_chunk_is_a_clear_error_and_no_wrong_memory() {
    damaged_store_case(
        |store, ids| assert_eq!(store.evict_local(ids).unwrap(), ids.len() as u64),
        "missing",
    );
}

#[test]
fn inconsistent_images_are_rejected_before_any_restore() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let m = Mapping::anonymous(MIB).unwrap();
    fill(&m, 3);
    // SAFETY: exclusive.
    let img = unsafe { memory::capture_full(&store, &[region(&m)]) }.unwrap();
    let mut bad = img.clone();
    bad.size *= 2;
    let err = ImageSource::open(&store, &bad)
        .err()
        .expect("wrong size accepted");
    assert!(err.to_string().contains("bytes"), "{err}");
    let mut bad = img.clone();
    bad.layers.push(memory::Layer {
        blob: img.layers[0].blob,
        runs: Some(vec![[3, 2]]),
        unit: None,
    });
    assert!(
        ImageSource::open(&store, &bad).is_err(),
        "diff layer of the wrong size accepted"
    );
    let mut bad = img.clone();
    bad.layers[0].blob = kiln_blockstore::Digest::of(b"nothing");
    assert!(ImageSource::open(&store, &bad).is_err());
}
