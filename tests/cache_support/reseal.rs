//! Recomputes the header and table checksums of a (mutated) shard image, so that a test
//! or the fuzzer reaches the field validation behind them. Offsets per
//! docs/shard-format.md; tables outside the image are left alone.

fn u32_at(b: &[u8], off: usize) -> usize {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap()) as usize
}

fn u64_at(b: &[u8], off: usize) -> usize {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap()) as usize
}

pub fn reseal(image: &mut [u8]) {
    if image.len() < 128 {
        return;
    }
    let (layers, seqs) = (u32_at(image, 60), u32_at(image, 64));
    let (lt, st) = (u64_at(image, 88), u64_at(image, 96));
    let within = |start: usize, count: usize, entry: usize| {
        count
            .checked_mul(entry)
            .and_then(|n| n.checked_add(start))
            .filter(|&end| end <= image.len())
    };
    if let (Some(lt_end), Some(st_end)) = (within(lt, layers, 16), within(st, seqs, 24)) {
        let crc = crc32c::crc32c_append(crc32c::crc32c(&image[lt..lt_end]), &image[st..st_end]);
        image[68..72].copy_from_slice(&crc.to_le_bytes());
    }
    // version 2 (a sequence shard) checksums its sequence-shard block too
    let header_end = if u32_at(image, 8) == 2 && image.len() >= 144 {
        144
    } else {
        128
    };
    let crc = crc32c::crc32c(&image[16..header_end]);
    image[12..16].copy_from_slice(&crc.to_le_bytes());
}
