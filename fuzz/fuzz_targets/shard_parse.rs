//! Fuzzes shard image parsing and registration: any input is refused with an error or
//! parses into a header that re-encodes to the same metadata bytes and registers into a
//! cache whose every row can be read. A crash, an out-of-bounds read or a failed
//! assertion is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tpla::attention::reference::gather_rows;
use tpla::cache::{RankCache, ShardHeader};
use tpla::ErrorKind;

#[path = "../../tests/cache_support/reseal.rs"]
mod reseal;

fuzz_target!(|data: &[u8]| {
    check(data);
    // The same bytes with their checksums recomputed, so that mutations reach the field
    // checks behind them.
    let mut resealed = data.to_vec();
    reseal::reseal(&mut resealed);
    if resealed != data {
        check(&resealed);
    }
});

fn check(image: &[u8]) {
    let header = match ShardHeader::parse(image) {
        Ok(h) => h,
        Err(e) => {
            assert!(matches!(e.kind(), ErrorKind::CorruptFile | ErrorKind::Unsupported));
            assert!(!e.message().is_empty());
            return;
        }
    };
    assert_eq!(header.encode(), image[..header.data_offset()]);
    let _ = header.verify_data(image);

    // A pool of no pages: registration takes none, and an append must fail cleanly.
    let spec = header.spec().clone();
    let mut cache = RankCache::new(spec.clone(), 0).unwrap();
    let ids = cache
        .register_buffer(image.to_vec())
        .expect("a parsed image registers into a cache of its own spec");
    for layer in 0..spec.layers() {
        let view = cache.layer(layer).unwrap();
        for (&id, e) in ids.iter().zip(header.sequences()) {
            let rows = gather_rows(&view, id, spec.slice_width()).unwrap();
            assert_eq!(rows.len(), e.len * spec.row_width());
        }
    }
    if let Some(&id) = ids.first() {
        let row = vec![0.5; spec.row_width()];
        // at the next position this shard holds (the sequence's length without
        // sequence sharding)
        let next = spec
            .sequence_sharding()
            .position_of(spec.sequence_shard(), header.sequences()[0].len as u64);
        let err = cache.append_rows_at(id, 0, next, &row).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::OutOfCapacity);
        assert_eq!(cache.seq_len(id, 0).unwrap(), header.sequences()[0].len);
    }
}
