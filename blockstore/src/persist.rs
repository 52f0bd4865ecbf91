//! Background persistence of chunks fetched from the remote.
//!
//! A durable write costs ~8 ms on this machine's disk (fdatasync + rename + dir fsync); paying
//! it inside a lazy read would double the latency of an S3 fetch. So reads hand verified frames
//! to this thread and return at once; it writes them in batches (one pack per batch).
//! Until written, a chunk is served from the memory cache or fetched again: nothing is lost but
//! time. Dropping the store waits for the queue to drain.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Receiver, Sender};
use tracing::warn;

use crate::fsutil::FileLock;
use crate::id::ChunkId;
use crate::local::LocalTier;

type Job = (ChunkId, Vec<u8>);

/// Up to this many bytes of queued frames go into one pack.
const BATCH_BYTES: usize = 32 << 20;

pub(crate) struct Persister {
    tx: Mutex<Option<Sender<Job>>>,
    handle: Mutex<Option<JoinHandle<()>>>,
    pending: Arc<(Mutex<usize>, Condvar)>,
    local: LocalTier,
    lock_path: PathBuf,
}

impl Persister {
    pub(crate) fn new(local: LocalTier, lock_path: PathBuf) -> Persister {
        Persister {
            tx: Mutex::new(None),
            handle: Mutex::new(None),
            pending: Arc::default(),
            local,
            lock_path,
        }
    }

    /// Queue a verified frame for durable storage in the local tier.
    pub(crate) fn submit(&self, id: ChunkId, frame: Vec<u8>) {
        let mut tx = self.tx.lock().unwrap();
        if tx.is_none() {
            let (t, rx) = unbounded();
            let (local, lock, pending) = (
                self.local.clone(),
                self.lock_path.clone(),
                self.pending.clone(),
            );
            let h = std::thread::Builder::new()
                .name("kiln-persist".into())
                .spawn(move || run(rx, local, lock, pending))
                .expect("spawn persister thread");
            *self.handle.lock().unwrap() = Some(h);
            *tx = Some(t);
        }
        *self.pending.0.lock().unwrap() += 1;
        let _ = tx.as_ref().unwrap().send((id, frame));
    }

    /// Block until every submitted frame is written.
    pub(crate) fn wait(&self) {
        let (m, cv) = &*self.pending;
        let mut n = m.lock().unwrap();
        while *n > 0 {
            n = cv.wait(n).unwrap();
        }
    }
}

impl Drop for Persister {
    fn drop(&mut self) {
        self.tx.lock().unwrap().take();
        if let Some(h) = self.handle.lock().unwrap().take() {
            let _ = h.join();
        }
    }
}

fn run(rx: Receiver<Job>, local: LocalTier, lock: PathBuf, pending: Arc<(Mutex<usize>, Condvar)>) {
    while let Ok(first) = rx.recv() {
        // Whatever queued up meanwhile goes into one pack (one fdatasync): a whole checkpoint
        // fetched at once (8,450 pages) is written as a few packs, not 33 (~8 ms each here).
        let mut bytes = first.1.len();
        let mut batch = vec![first];
        while bytes < BATCH_BYTES {
            let Ok(job) = rx.try_recv() else { break };
            bytes += job.1.len();
            batch.push(job);
        }
        let n = batch.len();
        if let Err(e) = write_batch(&local, &lock, &batch) {
            warn!("could not keep fetched chunks locally (they will be fetched again): {e}");
        }
        let (m, cv) = &*pending;
        *m.lock().unwrap() -= n;
        cv.notify_all();
    }
}

fn write_batch(local: &LocalTier, lock: &std::path::Path, batch: &[Job]) -> crate::Result<()> {
    // Shared gc lock: gc must not delete our pack in tmp/ or race its rename.
    let _g = FileLock::acquire(lock, false)?;
    local.store(batch)?;
    Ok(())
}
