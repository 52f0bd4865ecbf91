//! Lazy guest memory: an anonymous mapping registered with userfaultfd whose pages are filled on
//! first touch from a [`PageSource`] (a memory blob in the block store), one chunk at a time,
//! while a background thread prefetches a recorded working set.
//!
//! Failure policy: if a chunk cannot be served (missing in the store and the remote, corrupt,
//! I/O error) or the handler thread dies, the whole range is made inaccessible (PROT_NONE) and
//! every waiting thread is woken, so faulting accesses fail (EFAULT from KVM_RUN or a syscall,
//! SIGSEGV from plain user code) instead of hanging or seeing made-up memory; then the
//! configured fatal hook runs (the VMM's default: exit the process with an error).

use crate::mapping::{Mapping, PAGE_SIZE};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use userfaultfd::{Event, Uffd, UffdBuilder};

/// Something that holds a memory image cut into equal chunks (the last may be short).
pub trait PageSource: Send + Sync + 'static {
    /// Bytes per chunk: a multiple of the page size.
    fn chunk_size(&self) -> usize;
    /// Bytes in the image.
    fn len(&self) -> u64;
    /// Whether the image is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether chunk `index` is all zeros (then it is never read).
    fn chunk_is_zero(&self, index: usize) -> bool;
    /// Reads chunk `index` into `buf` (exactly the chunk's bytes), verified.
    fn read_chunk(&self, index: usize, buf: &mut [u8]) -> Result<(), SourceError>;
}

/// A chunk could not be read.
#[derive(Debug, thiserror::Error)]
#[error("memory chunk {index} unavailable: {reason}")]
pub struct SourceError {
    pub index: usize,
    pub reason: String,
}

/// Why lazy memory could not be set up or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error("userfaultfd: {0}")]
    Uffd(#[from] userfaultfd::Error),
    #[error("mapping guest memory: {0}")]
    Map(#[source] std::io::Error),
    #[error("memory image chunk size {0} is not a positive multiple of the page size")]
    ChunkSize(usize),
    #[error("page handler stopped: {0}")]
    Fatal(String),
}

/// What happens after the handler failed and the memory was fenced off.
pub type FatalHook = Arc<dyn Fn(&str) + Send + Sync>;

/// The fatal hook a VMM process wants: say why on stderr and exit non-zero, so nothing waits
/// on memory that will never arrive.
pub fn exit_process_hook() -> FatalHook {
    Arc::new(|msg: &str| {
        tracing::error!("guest memory page handler failed: {msg}");
        eprintln!("kiln: guest memory page handler failed: {msg}");
        std::process::exit(75);
    })
}

/// How to restore.
#[derive(Clone)]
pub struct LazyOptions {
    /// Chunks to load in the background right away, in this order (a recorded working set).
    pub prefetch: Vec<u32>,
    /// After the working set, keep loading every remaining chunk in the background.
    pub prefetch_all: bool,
    /// Record the chunks the guest touches on demand (to store as the next working set).
    pub record: bool,
    /// Runs once after a fatal handler error (memory already fenced off).
    pub on_fatal: FatalHook,
}

impl Default for LazyOptions {
    fn default() -> Self {
        LazyOptions {
            prefetch: Vec::new(),
            prefetch_all: false,
            record: false,
            on_fatal: exit_process_hook(),
        }
    }
}

/// Counters of what the handler did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LazyStats {
    /// Chunks filled because a thread touched them.
    pub demand_chunks: u64,
    /// Chunks filled by the prefetcher.
    pub prefetched_chunks: u64,
    /// Zero chunks filled with the zero page.
    pub zero_chunks: u64,
    /// Bytes copied into guest memory.
    pub bytes_copied: u64,
    /// Total nanoseconds spent serving demand faults (read + copy).
    pub demand_nanos: u64,
}

const MISSING: u8 = 0;
const LOADING: u8 = 1;
const DONE: u8 = 2;

struct Shared {
    uffd: Uffd,
    source: Arc<dyn PageSource>,
    base: usize,
    len: usize,
    chunk: usize,
    state: Vec<AtomicU8>,
    stop: AtomicBool,
    failed: Mutex<Option<String>>,
    recording: Mutex<Option<Vec<u32>>>,
    on_fatal: FatalHook,
    demand_chunks: AtomicU64,
    prefetched_chunks: AtomicU64,
    zero_chunks: AtomicU64,
    bytes_copied: AtomicU64,
    demand_nanos: AtomicU64,
}

/// Guest memory filled lazily from a [`PageSource`]. Dropping it stops the handler threads and
/// unmaps the memory (only after the VM using it is gone).
pub struct LazyMemory {
    // Field order matters: threads are joined (in Drop) before the mapping goes away.
    shared: Arc<Shared>,
    wake_fd: OwnedFd,
    threads: Vec<std::thread::JoinHandle<()>>,
    mapping: Mapping,
}

impl LazyMemory {
    /// Maps `source.len()` bytes, registers them with a new userfaultfd and starts the handler
    /// thread (and the prefetcher if `opts.prefetch` is non-empty or `prefetch_all`).
    pub fn new(source: Arc<dyn PageSource>, opts: LazyOptions) -> Result<LazyMemory, LazyError> {
        let chunk = source.chunk_size();
        if chunk == 0 || !chunk.is_multiple_of(PAGE_SIZE) {
            return Err(LazyError::ChunkSize(chunk));
        }
        let mapping = Mapping::anonymous(source.len() as usize).map_err(LazyError::Map)?;
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()?;
        uffd.register(mapping.as_ptr() as *mut libc::c_void, mapping.len())?;
        let nchunks = mapping.len().div_ceil(chunk);
        let shared = Arc::new(Shared {
            uffd,
            source,
            base: mapping.as_ptr() as usize,
            len: mapping.len(),
            chunk,
            state: (0..nchunks).map(|_| AtomicU8::new(MISSING)).collect(),
            stop: AtomicBool::new(false),
            failed: Mutex::new(None),
            recording: Mutex::new(opts.record.then(Vec::new)),
            on_fatal: opts.on_fatal.clone(),
            demand_chunks: AtomicU64::new(0),
            prefetched_chunks: AtomicU64::new(0),
            zero_chunks: AtomicU64::new(0),
            bytes_copied: AtomicU64::new(0),
            demand_nanos: AtomicU64::new(0),
        });
        // SAFETY: eventfd has no memory preconditions; the fd is owned right below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(LazyError::Map(std::io::Error::last_os_error()));
        }
        // SAFETY: efd is a fresh descriptor we own.
        let wake_fd = unsafe { OwnedFd::from_raw_fd(efd) };
        let mut threads = Vec::new();
        let s = shared.clone();
        let wfd = wake_fd.as_raw_fd();
        threads.push(
            std::thread::Builder::new()
                .name("kiln-uffd".into())
                .spawn(move || guarded(&s, || serve_faults(&s, wfd)))
                .map_err(LazyError::Map)?,
        );
        if !opts.prefetch.is_empty() || opts.prefetch_all {
            // Several prefetchers share one cursor over the list (kept in touch order): from
            // a local store one would do, but each chunk from S3 is a round trip (~1-2 ms on
            // loopback), so they overlap their fetches as `Store::prefetch` does.
            let list: Arc<Vec<u32>> = Arc::new(if opts.prefetch_all {
                (0..nchunks as u32).collect()
            } else {
                opts.prefetch.clone()
            });
            let cursor = Arc::new(AtomicUsize::new(0));
            for k in 0..PREFETCH_THREADS.min(list.len()) {
                let (s, list, cursor) = (shared.clone(), list.clone(), cursor.clone());
                threads.push(
                    std::thread::Builder::new()
                        .name("kiln-prefetch".into())
                        .spawn(move || guarded(&s, || prefetch(&s, &list, &cursor, k > 0)))
                        .map_err(LazyError::Map)?,
                );
            }
        }
        Ok(LazyMemory {
            shared,
            wake_fd,
            threads,
            mapping,
        })
    }

    /// Host address of the first byte of guest memory (as the blob lays it out).
    pub fn host_addr(&self) -> *mut u8 {
        self.mapping.as_ptr()
    }

    /// Bytes mapped (the image length rounded up to a page).
    pub fn len(&self) -> usize {
        self.mapping.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mapping.is_empty()
    }

    /// The underlying mapping.
    pub fn mapping(&self) -> &Mapping {
        &self.mapping
    }

    /// Why the handler stopped, if it failed.
    pub fn failure(&self) -> Option<String> {
        self.shared.failed.lock().unwrap().clone()
    }

    /// Stops recording and returns the chunks touched on demand so far, in first-touch order.
    pub fn take_recorded(&self) -> Vec<u32> {
        self.shared
            .recording
            .lock()
            .unwrap()
            .take()
            .unwrap_or_default()
    }

    /// How many chunks are resident (filled by demand or prefetch).
    pub fn resident_chunks(&self) -> usize {
        self.shared
            .state
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) == DONE)
            .count()
    }

    pub fn stats(&self) -> LazyStats {
        let s = &self.shared;
        LazyStats {
            demand_chunks: s.demand_chunks.load(Ordering::Relaxed),
            prefetched_chunks: s.prefetched_chunks.load(Ordering::Relaxed),
            zero_chunks: s.zero_chunks.load(Ordering::Relaxed),
            bytes_copied: s.bytes_copied.load(Ordering::Relaxed),
            demand_nanos: s.demand_nanos.load(Ordering::Relaxed),
        }
    }

    /// Blocks until every chunk is resident (e.g. before handing the memory to something that
    /// cannot wait on faults), filling the rest from this thread.
    pub fn load_all(&self) -> Result<(), LazyError> {
        let mut buf = vec![0u8; self.shared.chunk];
        for idx in 0..self.shared.state.len() {
            if let Err(e) = fill_if_missing(&self.shared, idx, &mut buf, Filler::Prefetch) {
                fatal(&self.shared, e.clone());
                return Err(LazyError::Fatal(e));
            }
        }
        // Chunks another thread was loading finish on their own; wait for them.
        while self.resident_chunks() < self.shared.state.len() {
            if let Some(e) = self.failure() {
                return Err(LazyError::Fatal(e));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }
}

impl Drop for LazyMemory {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe {
            libc::write(
                self.wake_fd.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            );
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Runs a handler thread body; any error or panic fences the memory off and runs the hook.
fn guarded(s: &Arc<Shared>, body: impl FnOnce() -> Result<(), String>) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
    let err = match r {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e,
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            format!("handler thread panicked: {what}")
        }
    };
    fatal(s, err);
}

/// Reports, then fences the memory off (so no thread ever sees wrong bytes or waits forever).
fn fatal(s: &Shared, err: String) {
    {
        let mut f = s.failed.lock().unwrap();
        if f.is_some() {
            return;
        }
        *f = Some(err.clone());
    }
    s.stop.store(true, Ordering::SeqCst);
    // The hook first: a VMM exits here, while every thread that touched missing memory is
    // still parked in the kernel (so none of them crashes on the fence below first).
    (s.on_fatal)(&err);
    // SAFETY: changes protection of the range this LazyMemory mapped and still owns.
    unsafe {
        libc::mprotect(s.base as *mut libc::c_void, s.len, libc::PROT_NONE);
    }
    // Waiting threads re-fault, hit PROT_NONE and fail instead of sleeping.
    let _ = s.uffd.wake(s.base as *mut libc::c_void, s.len);
}

#[derive(Clone, Copy, PartialEq)]
enum Filler {
    Demand,
    Prefetch,
}

/// How long the handler keeps spinning after an event before sleeping in poll(): faults come
/// in bursts at restore and a spinning handler answers ~3x faster (design.md), but an idle VM
/// must not burn a core.
const SPIN: Duration = Duration::from_micros(500);

fn serve_faults(s: &Arc<Shared>, wake_fd: i32) -> Result<(), String> {
    let mut buf = vec![0u8; s.chunk];
    let mut last_event = Instant::now();
    loop {
        if s.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        match s.uffd.read_event() {
            Ok(Some(Event::Pagefault { addr, .. })) => {
                last_event = Instant::now();
                let a = addr as usize;
                if a < s.base || a >= s.base + s.len {
                    return Err(format!("fault outside guest memory at {a:#x}"));
                }
                let idx = (a - s.base) / s.chunk;
                let t0 = Instant::now();
                fill_if_missing(s, idx, &mut buf, Filler::Demand)?;
                s.demand_nanos
                    .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
            Ok(Some(other)) => {
                tracing::debug!("ignoring userfaultfd event {other:?}");
            }
            Ok(None) => {
                if last_event.elapsed() < SPIN {
                    std::hint::spin_loop();
                    continue;
                }
                let mut fds = [
                    libc::pollfd {
                        fd: s.uffd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: wake_fd,
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                // SAFETY: polls two descriptors we own, array lives across the call.
                let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
                if r < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(format!("poll on userfaultfd: {e}"));
                    }
                }
                if fds[0].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                    return Err("userfaultfd hung up".into());
                }
            }
            Err(e) => return Err(format!("reading userfaultfd: {e}")),
        }
    }
}

/// Prefetch threads per lazy memory (see `LazyMemory::new`). Measured over S3 on loopback
/// (snapshot_s3_restore, 266-chunk working set): 1, 4, 8, 16 threads finished the work in 410,
/// 286, 158, 234 ms; 16 also delayed the first reply (61 vs 14 ms).
const PREFETCH_THREADS: usize = 8;

/// Entries of a working set one prefetcher loads alone before the others join: the list is in
/// first-touch order, so these are what the guest needs first (up to its first reply), and
/// they come sooner without seven other fetches competing with them and with demand faults.
const PREFETCH_RAMP: usize = 16;

fn prefetch(
    s: &Arc<Shared>,
    list: &[u32],
    cursor: &AtomicUsize,
    helper: bool,
) -> Result<(), String> {
    let mut buf = vec![0u8; s.chunk];
    while helper && cursor.load(Ordering::Relaxed) < PREFETCH_RAMP.min(list.len()) {
        if s.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    loop {
        let Some(&idx) = list.get(cursor.fetch_add(1, Ordering::Relaxed)) else {
            return Ok(());
        };
        if s.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let idx = idx as usize;
        if idx >= s.state.len() {
            tracing::warn!("working set names chunk {idx} beyond the image; ignored");
            continue;
        }
        fill_if_missing(s, idx, &mut buf, Filler::Prefetch)?;
    }
}

/// Fills chunk `idx` unless another thread has or is doing so. Errors are fatal to the memory.
fn fill_if_missing(s: &Shared, idx: usize, buf: &mut [u8], who: Filler) -> Result<(), String> {
    let start = s.base + idx * s.chunk;
    let len = s.chunk.min(s.base + s.len - start);
    match s.state[idx].compare_exchange(MISSING, LOADING, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {}
        Err(DONE) => {
            // A fault raced with the fill; make sure its thread is not left asleep.
            if who == Filler::Demand {
                let _ = s.uffd.wake(start as *mut libc::c_void, len);
            }
            return Ok(());
        }
        // The other filler's UFFDIO_COPY wakes every thread waiting in the range.
        Err(_) => return Ok(()),
    }
    if s.source.chunk_is_zero(idx) {
        // SAFETY: [start, start+len) lies inside our registered mapping.
        match unsafe { s.uffd.zeropage(start as *mut libc::c_void, len, false) } {
            Ok(_) => {}
            Err(userfaultfd::Error::ZeropageFailed(e)) if e as i32 == libc::EEXIST => {
                zero_pages_one_by_one(s, start, len)?
            }
            Err(e) => return Err(format!("UFFDIO_ZEROPAGE chunk {idx}: {e}")),
        }
        s.zero_chunks.fetch_add(1, Ordering::Relaxed);
    } else {
        let src_len = (s.source.len() as usize)
            .saturating_sub(idx * s.chunk)
            .min(len);
        buf[src_len..len].fill(0);
        s.source
            .read_chunk(idx, &mut buf[..src_len])
            .map_err(|e| e.to_string())?;
        copy_in(s, buf.as_ptr(), start, len)
            .map_err(|e| format!("UFFDIO_COPY chunk {idx}: {e}"))?;
        s.bytes_copied.fetch_add(len as u64, Ordering::Relaxed);
    }
    // Bookkeeping first, then wake the waiters: anyone who sees the page sees the counters.
    s.state[idx].store(DONE, Ordering::Release);
    match who {
        Filler::Demand => {
            s.demand_chunks.fetch_add(1, Ordering::Relaxed);
            if let Some(r) = s.recording.lock().unwrap().as_mut() {
                r.push(idx as u32);
            }
        }
        Filler::Prefetch => {
            s.prefetched_chunks.fetch_add(1, Ordering::Relaxed);
        }
    }
    s.uffd
        .wake(start as *mut libc::c_void, len)
        .map_err(|e| format!("UFFDIO_WAKE chunk {idx}: {e}"))
}

/// Copies `len` bytes into the registered range, page by page around pages that are already
/// present (only possible if someone populated the range behind our back).
fn copy_in(s: &Shared, src: *const u8, dst: usize, len: usize) -> Result<(), userfaultfd::Error> {
    // SAFETY: src points to `len` readable bytes of our buffer; dst range is inside the mapping.
    match unsafe { s.uffd.copy(src as *const _, dst as *mut _, len, false) } {
        Ok(_) => Ok(()),
        Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {
            page_by_page(s, src, dst, len)
        }
        Err(userfaultfd::Error::PartiallyCopied(_)) => page_by_page(s, src, dst, len),
        Err(e) => Err(e),
    }
}

fn page_by_page(
    s: &Shared,
    src: *const u8,
    dst: usize,
    len: usize,
) -> Result<(), userfaultfd::Error> {
    for off in (0..len).step_by(PAGE_SIZE) {
        // SAFETY: as in copy_in, one page at a time.
        match unsafe {
            s.uffd.copy(
                src.add(off) as *const _,
                (dst + off) as *mut _,
                PAGE_SIZE,
                false,
            )
        } {
            Ok(_) => {}
            Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn zero_pages_one_by_one(s: &Shared, start: usize, len: usize) -> Result<(), String> {
    for off in (0..len).step_by(PAGE_SIZE) {
        // SAFETY: one page inside our registered mapping.
        match unsafe { s.uffd.zeropage((start + off) as *mut _, PAGE_SIZE, false) } {
            Ok(_) => {}
            Err(userfaultfd::Error::ZeropageFailed(e)) if e as i32 == libc::EEXIST => {}
            Err(e) => return Err(format!("UFFDIO_ZEROPAGE: {e}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A memory image held in a Vec, to exercise the handler without a store (the store-backed
    /// source is tested in tests/snapshot_memory.rs).
    struct VecSource {
        data: Vec<u8>,
        chunk: usize,
        broken: Option<usize>,
        reads: AtomicUsize,
    }

    impl PageSource for VecSource {
        fn chunk_size(&self) -> usize {
            self.chunk
        }
        fn len(&self) -> u64 {
            self.data.len() as u64
        }
        fn chunk_is_zero(&self, i: usize) -> bool {
            let end = ((i + 1) * self.chunk).min(self.data.len());
            self.data[i * self.chunk..end].iter().all(|&b| b == 0)
        }
        fn read_chunk(&self, i: usize, buf: &mut [u8]) -> Result<(), SourceError> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            if self.broken == Some(i) {
                return Err(SourceError {
                    index: i,
                    reason: "chunk missing".into(),
                });
            }
            buf.copy_from_slice(&self.data[i * self.chunk..i * self.chunk + buf.len()]);
            Ok(())
        }
    }

    fn image(len: usize, chunk: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        let mut x = 0x9e3779b97f4a7c15u64;
        for (i, c) in v.chunks_mut(chunk).enumerate() {
            if i % 3 == 1 {
                continue; // every third chunk stays zero
            }
            for b in c.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
        v
    }

    fn panic_hook() -> FatalHook {
        Arc::new(|m: &str| panic!("unexpected fatal: {m}"))
    }

    #[test]
    fn restores_exact_bytes_lazily_and_zero_chunks_cost_no_reads() {
        let chunk = 64 << 10;
        let data = image(8 << 20, chunk);
        let src = Arc::new(VecSource {
            data: data.clone(),
            chunk,
            broken: None,
            reads: 0.into(),
        });
        let mem = LazyMemory::new(
            src.clone(),
            LazyOptions {
                on_fatal: panic_hook(),
                record: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            mem.resident_chunks(),
            0,
            "nothing loaded before first touch"
        );
        // SAFETY: nobody else touches the mapping in this test.
        let got = unsafe { mem.mapping().as_slice() };
        assert_eq!(got[5 * chunk + 17], data[5 * chunk + 17]);
        assert_eq!(mem.resident_chunks(), 1);
        assert!(got == &data[..], "restored memory differs");
        let st = mem.stats();
        let nchunks = data.len() / chunk;
        assert_eq!(st.demand_chunks as usize, nchunks);
        let zeros = (0..nchunks).filter(|i| i % 3 == 1).count();
        assert_eq!(st.zero_chunks as usize, zeros);
        assert_eq!(src.reads.load(Ordering::Relaxed), nchunks - zeros);
        let rec = mem.take_recorded();
        assert_eq!(rec[0], 5, "first touch recorded first");
        assert_eq!(rec.len(), nchunks);
    }

    #[test]
    fn writes_after_restore_stick_and_image_may_end_mid_chunk() {
        let chunk = 16 << 10;
        let data = image(100 * 4096, chunk); // 25 chunks exactly; make the last one short:
        let data = data[..data.len() - 3 * 4096].to_vec();
        let src = Arc::new(VecSource {
            data: data.clone(),
            chunk,
            broken: None,
            reads: 0.into(),
        });
        let mem = LazyMemory::new(
            src,
            LazyOptions {
                on_fatal: panic_hook(),
                ..Default::default()
            },
        )
        .unwrap();
        // SAFETY: exclusive use in this test.
        let m = unsafe { mem.mapping().as_mut_slice() };
        m[4096 * 50] ^= 0xff; // a write fault first
        assert_eq!(m[4096 * 50], data[4096 * 50] ^ 0xff);
        m[4096 * 50] ^= 0xff;
        assert!(m[..data.len()] == data[..]);
    }

    #[test]
    fn prefetch_loads_working_set_before_touch() {
        let chunk = 64 << 10;
        let data = image(4 << 20, chunk);
        let src = Arc::new(VecSource {
            data: data.clone(),
            chunk,
            broken: None,
            reads: 0.into(),
        });
        let ws: Vec<u32> = vec![7, 3, 20, 40];
        let mem = LazyMemory::new(
            src,
            LazyOptions {
                prefetch: ws.clone(),
                on_fatal: panic_hook(),
                record: true,
                ..Default::default()
            },
        )
        .unwrap();
        let t = Instant::now();
        while mem.resident_chunks() < ws.len() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(mem.resident_chunks(), ws.len());
        // SAFETY: exclusive use.
        let m = unsafe { mem.mapping().as_slice() };
        for &i in &ws {
            let r = i as usize * chunk..(i as usize + 1) * chunk;
            assert!(m[r.clone()] == data[r]);
        }
        assert_eq!(
            mem.stats().demand_chunks,
            0,
            "prefetched chunks never fault"
        );
        assert!(mem.take_recorded().is_empty());
        mem.load_all().unwrap();
        assert!(m == &data[..]);
    }

    #[test]
    fn failing_chunk_fences_memory_and_wakes_the_faulting_thread() {
        let chunk = 64 << 10;
        let data = image(2 << 20, chunk);
        let src = Arc::new(VecSource {
            data,
            chunk,
            broken: Some(3),
            reads: 0.into(),
        });
        let fired = Arc::new(Mutex::new(None::<String>));
        let f = fired.clone();
        let mem = LazyMemory::new(
            src,
            LazyOptions {
                on_fatal: Arc::new(move |m: &str| *f.lock().unwrap() = Some(m.to_string())),
                ..Default::default()
            },
        )
        .unwrap();
        let addr = mem.host_addr() as usize + 3 * chunk;
        // A kernel-side read of the page (as KVM does for a vCPU) must fail, not hang.
        let h = std::thread::spawn(move || {
            let mut p = [0i32; 2];
            // SAFETY: plain pipe creation into a local array.
            assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
            // SAFETY: write reads 4096 bytes at addr, inside the mapping that outlives the join.
            let r = unsafe { libc::write(p[1], addr as *const libc::c_void, 4096) };
            let err = std::io::Error::last_os_error();
            // SAFETY: closing the pipe fds we created.
            unsafe {
                libc::close(p[0]);
                libc::close(p[1]);
            }
            (r, err.raw_os_error())
        });
        let (r, errno) = h.join().unwrap();
        assert_eq!((r, errno), (-1, Some(libc::EFAULT)));
        // The hook runs right after the waiters are woken.
        let t = Instant::now();
        while fired.lock().unwrap().is_none() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let msg = fired.lock().unwrap().clone().expect("fatal hook ran");
        assert!(msg.contains("chunk 3"), "{msg}");
        assert_eq!(mem.failure().as_deref(), Some(msg.as_str()));
    }

    #[test]
    fn rejects_chunk_sizes_that_are_not_pages() {
        let src = Arc::new(VecSource {
            data: vec![0; 8192],
            chunk: 1000,
            broken: None,
            reads: 0.into(),
        });
        assert!(matches!(
            LazyMemory::new(src, LazyOptions::default()),
            Err(LazyError::ChunkSize(1000))
        ));
    }
}
