//! Reading memory images: which layer serves each chunk and page (the page source of lazy
//! restores, forks and materialized files).

use super::*;

/// A memory image opened for reading: which layer and position serve each chunk, and which
/// pages of page-granular layers lie over it.
pub struct ImageSource {
    image: MemoryImage,
    readers: Vec<BlobReader>,
    /// Per chunk: (layer, chunk position inside that layer's blob) of its chunk-granular base.
    map: Vec<(u16, u32)>,
    /// Per chunk with pages from page-granular layers: (page within the chunk, layer, page
    /// position inside that layer's blob), the topmost layer's entry for each page.
    patches: HashMap<u32, Vec<(u16, u16, u32)>>,
}

impl ImageSource {
    /// Opens every layer (manifests only; data is read on demand) and checks the layers fit.
    pub fn open(store: &Store, image: &MemoryImage) -> Result<ImageSource, MemoryError> {
        let cs = image.chunk_size as u64;
        if image.chunk_size == 0 || !cs.is_multiple_of(4096) || !image.size.is_multiple_of(4096) {
            return Err(MemoryError::Invalid(format!(
                "chunk size {} / size {} not page multiples",
                image.chunk_size, image.size
            )));
        }
        if image.layers.len() >= u16::MAX as usize {
            return Err(MemoryError::Invalid(format!(
                "{} layers is too many",
                image.layers.len()
            )));
        }
        let nchunks = image.size.div_ceil(cs) as usize;
        let chunk_len = |i: u32| (image.size - i as u64 * cs).min(cs);
        let mut map = vec![(u16::MAX, 0u32); nchunks];
        let mut patches: HashMap<u32, Vec<(u16, u16, u32)>> = HashMap::new();
        let mut readers = Vec::new();
        for (li, layer) in image.layers.iter().enumerate() {
            let r = store.open_blob(&layer.blob)?;
            if r.manifest().chunk_size != image.chunk_size {
                return Err(MemoryError::Invalid(format!(
                    "layer {li} ({}) has chunk size {}, image says {}",
                    layer.blob,
                    r.manifest().chunk_size,
                    image.chunk_size
                )));
            }
            let unit = layer.unit.unwrap_or(image.chunk_size);
            let paged = unit != image.chunk_size;
            if paged && (unit != PAGE || layer.runs.is_none()) {
                return Err(MemoryError::Invalid(format!(
                    "layer {li} ({}) has unit {unit}: only {PAGE}-byte pages or whole chunks of \
                     a diff are supported",
                    layer.blob
                )));
            }
            let units = if paged {
                image.size / PAGE as u64
            } else {
                nchunks as u64
            };
            let expect = match &layer.runs {
                None => {
                    for (i, m) in map.iter_mut().enumerate() {
                        *m = (li as u16, i as u32);
                    }
                    patches.clear();
                    image.size
                }
                Some(runs) => {
                    let mut bytes = 0;
                    let mut prev: Option<u32> = None;
                    for (pos, c) in from_runs(runs).enumerate() {
                        if c as u64 >= units || prev.is_some_and(|p| p >= c) {
                            return Err(MemoryError::Invalid(format!(
                                "layer {li} lists unit {c} out of order or beyond the image"
                            )));
                        }
                        prev = Some(c);
                        if paged {
                            let per = image.chunk_size / PAGE;
                            let (chunk, page) = (c / per, (c % per) as u16);
                            let v = patches.entry(chunk).or_default();
                            v.retain(|p| p.0 != page);
                            v.push((page, li as u16, pos as u32));
                            bytes += PAGE as u64;
                        } else {
                            map[c as usize] = (li as u16, pos as u32);
                            patches.remove(&c);
                            bytes += chunk_len(c);
                        }
                    }
                    bytes
                }
            };
            if r.len() != expect {
                return Err(MemoryError::Invalid(format!(
                    "layer {li} ({}) holds {} bytes, expected {expect}",
                    layer.blob,
                    r.len()
                )));
            }
            readers.push(r);
        }
        if let Some(i) = map.iter().position(|m| m.0 == u16::MAX) {
            return Err(MemoryError::Invalid(format!("no layer holds chunk {i}")));
        }
        Ok(ImageSource {
            image: image.clone(),
            readers,
            map,
            patches,
        })
    }

    pub fn image(&self) -> &MemoryImage {
        &self.image
    }

    /// The id of chunk `index` (`Some(None)` = all zeros), or `None` if pages of
    /// page-granular layers lie over it (it has no single stored id).
    pub fn chunk_id(&self, index: usize) -> Option<Option<kiln_blockstore::ChunkId>> {
        if self.patches.contains_key(&(index as u32)) {
            return None;
        }
        let (l, pos) = self.map[index];
        Some(self.readers[l as usize].manifest().chunks[pos as usize])
    }

    /// Number of chunks.
    pub fn chunks(&self) -> usize {
        self.map.len()
    }

    fn read_at(
        &self,
        layer: u16,
        off: u64,
        buf: &mut [u8],
        index: usize,
    ) -> Result<(), SourceError> {
        let r = &self.readers[layer as usize];
        match r.read_at(off, buf) {
            Ok(n) if n == buf.len() => Ok(()),
            Ok(n) => Err(SourceError {
                index,
                reason: format!("blob {} ended after {n} of {} bytes", r.id(), buf.len()),
            }),
            Err(e) => Err(SourceError {
                index,
                reason: e.to_string(),
            }),
        }
    }
}

impl PageSource for ImageSource {
    fn chunk_size(&self) -> usize {
        self.image.chunk_size as usize
    }

    fn len(&self) -> u64 {
        self.image.size
    }

    fn chunk_is_zero(&self, index: usize) -> bool {
        matches!(self.chunk_id(index), Some(None))
    }

    fn read_chunk(&self, index: usize, buf: &mut [u8]) -> Result<(), SourceError> {
        let (l, pos) = self.map[index];
        if self.readers[l as usize].manifest().chunks[pos as usize].is_none() {
            buf.fill(0);
        } else {
            let off = pos as u64 * self.image.chunk_size as u64;
            self.read_at(l, off, buf, index)?;
        }
        for &(page, l, pos) in self.patches.get(&(index as u32)).into_iter().flatten() {
            let at = page as usize * PAGE as usize;
            let Some(dst) = buf.get_mut(at..at + PAGE as usize) else {
                continue; // beyond a short final chunk's buffer: not part of the image
            };
            self.read_at(l, pos as u64 * PAGE as u64, dst, index)?;
        }
        Ok(())
    }
}
