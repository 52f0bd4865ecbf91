//! Bundles: one remote object per push holding the frames of the chunks that push uploaded,
//! so a host that lacks most of a blob fetches a few large byte ranges instead of one object
//! per chunk (a checkpoint's memory is chunked per 4 KiB page: 8,450 GETs for 32 MiB).
//!
//! A blob's chunks that an earlier push uploaded are in that push's bundle: a bundle also names
//! up to [`MAX_REFS`] other bundles holding more of its blob's chunks (a sandbox paused twice:
//! the second checkpoint's bundle holds its changed pages and names the first's), as far as
//! the pushing store knows (it records which bundle holds which chunk as it pushes and reads
//! them). A reader follows these one level deep.
//!
//! A bundle only accelerates: every chunk in it is also its own object, pushed before it, and
//! every frame read from it is checked against its chunk id like any other fetch. A missing,
//! truncated or lying bundle costs time (the reader fetches chunk by chunk), never a wrong byte.
//!
//! ```text
//! frames, concatenated
//! | count x (32-byte chunk id | frame length u32 LE)
//! | refs x 32-byte blob id (other bundles)
//! | refs u32 LE | count u32 LE | version u32 LE (=1) | "KILNBNDL"
//! ```
//! The index is at the end so a push streams the frames without knowing their lengths first;
//! a frame's offset is the sum of the lengths before it, so the index cannot point outside the
//! frames, and its lengths must add up to the object's size exactly.

use crate::id::{BlobId, ChunkId, Digest};

const MAGIC: &[u8; 8] = b"KILNBNDL";
const VERSION: u32 = 1;
/// Bytes of the trailer (refs, count, version, magic).
const TRAILER: u64 = 20;
/// Bytes of one index entry.
const ENTRY: u64 = 36;
/// Other bundles one bundle may name.
pub(crate) const MAX_REFS: usize = 16;

/// A push uploads a bundle when it uploads at least this many chunks (below, the GETs it
/// saves a reader are few, and overlapped anyway).
pub(crate) const MIN_CHUNKS: usize = 64;
/// A reader lacking at least this many of a blob's chunks looks for its bundle first.
pub(crate) const MIN_TO_READ: usize = 16;
/// A reader skips bundles whose index is longer (1.8 million chunks).
pub(crate) const MAX_TAIL: u64 = 64 << 20;
/// The most chunks a bundle's index can list within [`MAX_TAIL`].
pub(crate) const MAX_CHUNKS: usize = ((MAX_TAIL - TRAILER) / ENTRY) as usize;
/// A reader coalesces neighbouring frames into ranges of about this size...
const RANGE_BYTES: u64 = 4 << 20;
/// ...reading over a gap of frames it already has when the gap is at most this long (cheaper
/// than another request).
const MAX_GAP: u64 = 64 << 10;

/// Why a bundle cannot be used (the reader then fetches chunk by chunk).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum BadBundle {
    #[error("it ends without a bundle trailer")]
    NoTrailer,
    #[error("it is of version {0}, this kiln reads version {VERSION}")]
    Version(u32),
    #[error("its index claims {claims} chunks, at most {max} can be")]
    TooMany { claims: u64, max: u64 },
    #[error("it names {0} other bundles, at most {MAX_REFS} can be")]
    TooManyRefs(u64),
    #[error("its index is {need} bytes long, more than was read")]
    Incomplete { need: u64 },
    #[error("its index lists {index} bytes of frames, the object holds {object}")]
    Size { index: u64, object: u64 },
}

/// The index and trailer for frames of `entries` (chunk id, frame length), in order, naming
/// the other bundles `refs` (at most [`MAX_REFS`] are kept).
pub(crate) fn index_bytes(entries: &[(ChunkId, u32)], refs: &[BlobId]) -> Vec<u8> {
    let refs = &refs[..refs.len().min(MAX_REFS)];
    let mut out =
        Vec::with_capacity(entries.len() * ENTRY as usize + refs.len() * 32 + TRAILER as usize);
    for (id, len) in entries {
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&len.to_le_bytes());
    }
    for r in refs {
        out.extend_from_slice(r.as_bytes());
    }
    out.extend_from_slice(&(refs.len() as u32).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(MAGIC);
    out
}

/// How many bytes from a bundle's end hold the index of a bundle of at most `max_chunks`.
pub(crate) fn tail_len(max_chunks: usize) -> u64 {
    (TRAILER + 32 * MAX_REFS as u64).saturating_add(ENTRY.saturating_mul(max_chunks as u64))
}

/// A bundle's index: where each chunk's frame is, and the other bundles it names.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Index {
    pub(crate) entries: Vec<Entry>,
    pub(crate) refs: Vec<BlobId>,
}

/// Where one chunk's frame is in a bundle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) id: ChunkId,
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

/// Reads the index from `tail`, the last bytes of a bundle of `size` bytes. A bundle listing
/// more than `max_chunks` chunks is refused before anything is allocated for it; a tail too
/// short for the index it ends with is [`BadBundle::Incomplete`] (read that many and retry).
pub(crate) fn parse_index(tail: &[u8], size: u64, max_chunks: usize) -> Result<Index, BadBundle> {
    let t = tail.len();
    if t < TRAILER as usize || &tail[t - 8..] != MAGIC {
        return Err(BadBundle::NoTrailer);
    }
    let word = |at: usize| u32::from_le_bytes(tail[at..at + 4].try_into().expect("4 bytes"));
    let version = word(t - 12);
    if version != VERSION {
        return Err(BadBundle::Version(version));
    }
    let count = word(t - 16) as u64;
    if count > max_chunks as u64 {
        return Err(BadBundle::TooMany {
            claims: count,
            max: max_chunks as u64,
        });
    }
    let nrefs = word(t - 20) as u64;
    if nrefs > MAX_REFS as u64 {
        return Err(BadBundle::TooManyRefs(nrefs));
    }
    let index = TRAILER + count * ENTRY + nrefs * 32;
    if index > size {
        return Err(BadBundle::Size {
            index,
            object: size,
        });
    }
    if index > t as u64 {
        return Err(BadBundle::Incomplete { need: index });
    }
    let frames = size - index;
    let body = &tail[t - index as usize..t - TRAILER as usize];
    let (table, refs) = body.split_at((count * ENTRY) as usize);
    let mut entries = Vec::with_capacity(count as usize);
    let mut offset = 0u64;
    for e in table.chunks_exact(ENTRY as usize) {
        let len = u32::from_le_bytes(e[32..36].try_into().expect("4 bytes"));
        entries.push(Entry {
            id: Digest(e[..32].try_into().expect("32 bytes")),
            offset,
            len,
        });
        offset += len as u64; // at most 2^32 entries of < 2^32 bytes: no overflow
    }
    if offset != frames {
        return Err(BadBundle::Size {
            index: offset,
            object: frames,
        });
    }
    let refs = refs
        .chunks_exact(32)
        .map(|r| Digest(r.try_into().expect("32 bytes")))
        .collect();
    Ok(Index { entries, refs })
}

/// One byte range to read from a bundle and the frames in it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Range {
    pub(crate) start: u64,
    pub(crate) len: u64,
    /// The frames wanted from it, offsets relative to `start`.
    pub(crate) frames: Vec<Entry>,
}

/// Ranges covering the frames of `entries` that `want` accepts: in bundle order, neighbours
/// coalesced (over gaps up to [`MAX_GAP`]) into ranges of about [`RANGE_BYTES`].
pub(crate) fn plan(entries: &[Entry], mut want: impl FnMut(&Entry) -> bool) -> Vec<Range> {
    let mut out: Vec<Range> = Vec::new();
    for e in entries.iter().filter(|e| e.len > 0) {
        if !want(e) {
            continue;
        }
        let end = e.offset + e.len as u64;
        match out.last_mut() {
            Some(r)
                if e.offset >= r.start + r.len
                    && e.offset - (r.start + r.len) <= MAX_GAP
                    && end - r.start <= RANGE_BYTES =>
            {
                r.frames.push(Entry {
                    offset: e.offset - r.start,
                    ..*e
                });
                r.len = end - r.start;
            }
            _ => out.push(Range {
                start: e.offset,
                len: e.len as u64,
                frames: vec![Entry { offset: 0, ..*e }],
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(frames: &[Vec<u8>]) -> (Vec<u8>, Vec<ChunkId>) {
        let ids: Vec<ChunkId> = frames.iter().map(|f| Digest::of(f)).collect();
        let mut out: Vec<u8> = frames.concat();
        let entries: Vec<(ChunkId, u32)> = ids
            .iter()
            .zip(frames)
            .map(|(id, f)| (*id, f.len() as u32))
            .collect();
        out.extend(index_bytes(&entries, &[]));
        (out, ids)
    }

    #[test]
    fn index_round_trips_and_plans_coalesced_ranges() {
        let frames: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 1000 + i as usize]).collect();
        let (b, ids) = bundle(&frames);
        let tail = &b[b.len() - tail_len(10) as usize..];
        let entries = parse_index(tail, b.len() as u64, 10).unwrap().entries;
        assert_eq!(entries.len(), 10);
        for (e, f) in entries.iter().zip(&frames) {
            assert_eq!(&b[e.offset as usize..][..e.len as usize], &f[..]);
        }
        // A tail longer than needed (the whole object) reads the same.
        assert_eq!(
            parse_index(&b, b.len() as u64, 100).unwrap().entries,
            entries
        );
        // Too short a tail asks for more.
        let need = b.len() as u64 - 10 * 1000 - 45;
        assert_eq!(
            parse_index(&b[b.len() - 100..], b.len() as u64, 10),
            Err(BadBundle::Incomplete { need })
        );
        // Wanting 0, 1, 2, 5 and 9: one range (the gaps are small).
        let wanted = [0, 1, 2, 5, 9].map(|i| ids[i]);
        let ranges = plan(&entries, |e| wanted.contains(&e.id));
        assert_eq!(ranges.len(), 1);
        let r = &ranges[0];
        assert_eq!(r.frames.len(), 5);
        for f in &r.frames {
            let i = ids.iter().position(|id| *id == f.id).unwrap();
            let at = (r.start + f.offset) as usize;
            assert_eq!(&b[at..at + f.len as usize], &frames[i][..]);
        }
    }

    #[test]
    fn refs_round_trip_and_at_most_max_refs_are_written() {
        let frame = vec![7u8; 100];
        let id = Digest::of(&frame);
        let refs: Vec<BlobId> = (0..20u8).map(|i| Digest::of(&[i])).collect();
        let mut b = frame.clone();
        b.extend(index_bytes(&[(id, 100)], &refs));
        let ix = parse_index(&b, b.len() as u64, 1).unwrap();
        assert_eq!(
            ix.entries,
            vec![Entry {
                id,
                offset: 0,
                len: 100
            }]
        );
        assert_eq!(ix.refs, refs[..MAX_REFS]);
        // A bundle of references only.
        let b = index_bytes(&[], &refs[..2]);
        let ix = parse_index(&b, b.len() as u64, 0).unwrap();
        assert!(ix.entries.is_empty());
        assert_eq!(ix.refs, refs[..2]);
    }

    #[test]
    fn ranges_split_at_their_size_and_at_large_gaps() {
        let e = |i: u64, offset: u64, len: u32| Entry {
            id: Digest::of(&i.to_le_bytes()),
            offset,
            len,
        };
        let mb = 1 << 20;
        let entries = [
            e(0, 0, mb),
            e(1, mb as u64, mb),
            e(2, 2 * mb as u64, mb),
            e(3, 3 * mb as u64, mb),
            e(4, 4 * mb as u64, mb), // would make the range 5 MiB: a new one
            e(5, 5 * mb as u64, 100),
            e(6, 5 * mb as u64 + 100, mb), // skipped: a 1 MiB gap ends the range
            e(7, 6 * mb as u64 + 100, 10),
        ];
        let ranges = plan(&entries, |x| x.id != entries[6].id);
        let shape: Vec<(u64, u64, usize)> = ranges
            .iter()
            .map(|r| (r.start, r.len, r.frames.len()))
            .collect();
        assert_eq!(
            shape,
            vec![
                (0, 4 * mb as u64, 4),
                (4 * mb as u64, mb as u64 + 100, 2),
                (6 * mb as u64 + 100, 10, 1)
            ]
        );
    }

    #[test]
    fn damaged_indexes_are_refused_without_panics_or_huge_allocations() {
        let frames: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 500]).collect();
        let (b, _) = bundle(&frames);
        let n = b.len();
        let size = n as u64;
        // Truncated: the trailer is gone.
        assert_eq!(
            parse_index(&b[..n - 5], size - 5, 4),
            Err(BadBundle::NoTrailer)
        );
        assert_eq!(parse_index(&[], 0, 4), Err(BadBundle::NoTrailer));
        // A huge count is refused before any allocation.
        let mut huge = b.clone();
        huge[n - 16..n - 12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            parse_index(&huge, size, 4),
            Err(BadBundle::TooMany {
                claims: u32::MAX as u64,
                max: 4
            })
        );
        // A count the object cannot hold.
        assert!(matches!(
            parse_index(&huge, size, u32::MAX as usize),
            Err(BadBundle::Size { .. })
        ));
        let mut refs = b.clone();
        refs[n - 20..n - 16].copy_from_slice(&17u32.to_le_bytes());
        assert_eq!(parse_index(&refs, size, 4), Err(BadBundle::TooManyRefs(17)));
        // Lengths that point past the end.
        let mut long = b.clone();
        let first_len = n - 20 - 4 * 36 + 32;
        long[first_len..first_len + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            parse_index(&long, size, 4),
            Err(BadBundle::Size { .. })
        ));
        // An object larger than the index says (frames missing from the index).
        assert!(matches!(
            parse_index(&b, size + 1, 4),
            Err(BadBundle::Size { .. })
        ));
        let mut v = b.clone();
        v[n - 12] = 9;
        assert_eq!(parse_index(&v, size, 4), Err(BadBundle::Version(9)));
        // Any tail of any length, any claimed size: an answer, never a panic.
        let mut x = 1u64;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut t = b.clone();
            t[(x % n as u64) as usize] ^= (x >> 32) as u8 | 1;
            let cut = (x >> 8) as usize % n;
            let _ = parse_index(&t[cut..], (x >> 16) % (2 * size), (x >> 24) as usize % 8);
        }
    }
}
