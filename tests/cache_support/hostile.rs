//! Shared by the hostile-image tests: tests/cache_hostile.rs (format version 1, a 128-byte
//! header) and tests/sequence_shard_hostile.rs (version 2, 144 bytes). Field edits, the
//! refusal assertions, and the sweeps over metadata bytes, cuts, extensions and edited
//! fields behind valid checksums. Offsets per docs/shard-format.md.

use super::reseal::reseal;
use super::rng;
use rand::Rng;
use std::collections::BTreeSet;
use tpla::attention::reference::gather_rows;
use tpla::cache::{RankCache, ShardHeader, ShardSpec};
use tpla::{Error, ErrorKind};

pub fn put32(img: &mut [u8], off: usize, v: u32) {
    img[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

pub fn put64(img: &mut [u8], off: usize, v: u64) {
    img[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

pub fn get64(img: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(img[off..off + 8].try_into().unwrap())
}

/// An edit of an image, before it is resealed.
pub type Edit = Box<dyn Fn(&mut Vec<u8>)>;
/// (what, edit, the error kind, a text its message must hold)
pub type Case = (&'static str, Edit, ErrorKind, &'static str);

/// An edit that writes `v` as the 4 bytes at `off`.
pub fn set32(off: usize, v: u32) -> impl Fn(&mut Vec<u8>) {
    move |i| put32(i, off, v)
}

/// An edit that writes `v` as the 8 bytes at `off`.
pub fn set64(off: usize, v: u64) -> impl Fn(&mut Vec<u8>) {
    move |i| put64(i, off, v)
}

/// A case refused as a corrupt file whose message holds `text`.
pub fn corrupt(
    what: &'static str,
    edit: impl Fn(&mut Vec<u8>) + 'static,
    text: &'static str,
) -> Case {
    (what, Box::new(edit), ErrorKind::CorruptFile, text)
}

/// A valid image and the layout it has: edits of it must all be refused.
pub struct Hostile {
    pub base: Vec<u8>,
    /// The spec of the rank the image was cut for (registration is tried against it).
    pub spec: ShardSpec,
    /// 128 (version 1) or 144 (version 2): where the layer table starts.
    pub header_len: usize,
    pub layers: usize,
    pub sequences: usize,
}

impl Hostile {
    /// The offset of the sequence table.
    pub fn seq_table(&self) -> usize {
        self.header_len + 16 * self.layers
    }

    /// The offset of sequence table entry `k`.
    pub fn seq_entry(&self, k: usize) -> usize {
        self.seq_table() + 24 * k
    }

    /// Where the tables end.
    pub fn tables_end(&self) -> usize {
        self.seq_entry(self.sequences)
    }

    pub fn header(&self) -> ShardHeader {
        ShardHeader::parse(&self.base).unwrap()
    }

    /// The error of a hostile image, from the parser and from registration alike.
    pub fn refused(&self, image: &[u8]) -> Error {
        let err = ShardHeader::parse(image).expect_err("a hostile image was accepted");
        let mut cache = RankCache::new(self.spec.clone(), 2).unwrap();
        let reg = cache.register_buffer(image.to_vec()).unwrap_err();
        assert_eq!(err, reg);
        assert_eq!(cache.sequence_ids().count(), 0);
        err
    }

    pub fn assert_refused(&self, image: &[u8], kind: ErrorKind, text: &str, what: &str) {
        let err = self.refused(image);
        assert_eq!(err.kind(), kind, "{what}: {err}");
        assert!(
            err.message().contains(text),
            "{what}: '{err}' lacks '{text}'"
        );
    }

    /// Every bit pattern flipped into every byte before the data is refused by the
    /// check that covers the byte: the magic, the version, the header checksum (over the
    /// whole header), the table checksum, or the zero padding.
    pub fn every_metadata_byte_is_checked(&self) {
        let data_offset = self.header().data_offset();
        assert_eq!(data_offset, 4096);
        for off in 0..data_offset {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut img = self.base.clone();
                img[off] ^= mask;
                let (kind, text) = match off {
                    0..=7 => (ErrorKind::CorruptFile, "magic".to_string()),
                    8..=11 => (ErrorKind::Unsupported, "version".to_string()),
                    o if o < self.header_len => {
                        (ErrorKind::CorruptFile, "header checksum".to_string())
                    }
                    o if o < self.tables_end() => {
                        (ErrorKind::CorruptFile, "table checksum".to_string())
                    }
                    o => (
                        ErrorKind::CorruptFile,
                        format!("padding byte at offset {o}"),
                    ),
                };
                self.assert_refused(&img, kind, &text, &format!("byte {off} ^ {mask:#x}"));
            }
        }
    }

    /// The image cut at each of `header_cuts`, at the ends of the tables, at every page
    /// boundary of the data, one byte short, and at 300 random places (from `seed`), is
    /// refused as truncated.
    pub fn truncations_are_refused(&self, header_cuts: &[usize], seed: u64) {
        let h = self.header();
        let stride = h.spec().page_stride();
        let mut cuts = header_cuts.to_vec();
        cuts.extend([
            self.seq_table(),
            self.tables_end() - 1,
            self.tables_end(),
            h.data_offset() - 1,
            h.data_offset(),
        ]);
        cuts.extend((1..self.layers * h.pages_per_layer()).map(|p| h.data_offset() + p * stride));
        cuts.push(self.base.len() - 1);
        let mut rng = rng(seed);
        cuts.extend((0..300).map(|_| rng.random_range(0..self.base.len())));
        for cut in cuts {
            self.assert_refused(
                &self.base[..cut],
                ErrorKind::CorruptFile,
                "truncated",
                &format!("cut at {cut}"),
            );
        }
    }

    /// The image with each of `extras` zero bytes appended is refused, naming how many.
    pub fn extensions_are_refused(&self, extras: &[usize]) {
        for &extra in extras {
            let mut img = self.base.clone();
            img.resize(self.base.len() + extra, 0);
            self.assert_refused(
                &img,
                ErrorKind::CorruptFile,
                &format!("{extra} unexpected bytes"),
                "extended",
            );
        }
    }

    /// Edits of the header fields both versions share: the version, the sequence count
    /// and the page count.
    pub fn shared_field_cases(&self) -> Vec<Case> {
        let seqs = self.sequences as u32;
        let p = self.header().pages_per_layer() as u64;
        vec![
            (
                "version 3",
                Box::new(set32(8, 3)),
                ErrorKind::Unsupported,
                "version 3",
            ),
            corrupt("sequences + 1", set32(64, seqs + 1), "sequence"),
            corrupt("pages huge", set64(72, u64::MAX), "overflows"),
            corrupt("pages + 1", set64(72, p + 1), "data length"),
        ]
    }

    /// Each case's edit, resealed (so that the checksums hold), is refused by name; the
    /// cases of `shared_field_cases` too.
    pub fn edits_are_refused(&self, cases: Vec<Case>) {
        for (what, edit, kind, text) in cases.into_iter().chain(self.shared_field_cases()) {
            let mut img = self.base.clone();
            edit(&mut img);
            reseal(&mut img);
            self.assert_refused(&img, kind, text, what);
        }
    }
}

/// A refusal of a randomly mutated image: a corrupt or unsupported file (`what` says
/// which round), noted in `messages` by the kind of failure, without the numbers.
pub fn note_refusal(messages: &mut BTreeSet<String>, e: &Error, what: &str) {
    assert!(
        matches!(e.kind(), ErrorKind::CorruptFile | ErrorKind::Unsupported),
        "{what}: {e}"
    );
    let words = e.message().split(|c: char| c.is_ascii_digit() || c == '(');
    messages.insert(words.take(2).collect::<String>());
}

/// An accepted (mutated) image `img` with header `h`: the header encodes back to the
/// image's metadata, and `cache` registers it and reads back every row it claims; `each`
/// sees the rows of each (layer, sequence). Returns the cache and the registered ids.
pub fn reads_back(
    h: &ShardHeader,
    img: &[u8],
    mut cache: RankCache,
    mut each: impl FnMut(&[f64]),
) -> (RankCache, Vec<u32>) {
    assert_eq!(h.encode(), img[..h.data_offset()], "parse is not injective");
    let ids = cache.register_buffer(img.to_vec()).unwrap();
    let spec = h.spec();
    for layer in 0..spec.layers() {
        let view = cache.layer(layer).unwrap();
        for (&id, e) in ids.iter().zip(h.sequences()) {
            let rows = gather_rows(&view, id, spec.slice_width()).unwrap();
            assert_eq!(rows.len(), e.len * spec.row_width());
            each(&rows);
        }
    }
    (cache, ids)
}
