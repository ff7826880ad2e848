//! NCCL all-reduce (feature `nccl`): one GPU (a one-rank communicator), and two GPUs in
//! one process (grouped calls from one thread, and one thread per GPU). Each test skips,
//! saying why, where the GPUs or libnccl are missing.

#![cfg(feature = "nccl")]

use std::sync::Arc;
use tpla::attention::cuda::{CudaDevice, DeviceBuffer, Stream};
use tpla::combine::nccl::{all_reduce_across, check_library, version, Communicator, UniqueId};
use tpla::ErrorKind;

/// `count` GPUs and libnccl, or None after saying what is missing.
fn devices(count: usize) -> Option<Vec<Arc<CudaDevice>>> {
    if let Err(e) = check_library() {
        eprintln!("skipping: {e}");
        return None;
    }
    let mut out = Vec::new();
    for i in 0..count {
        match CudaDevice::open(i) {
            Ok(d) => out.push(d),
            Err(e) => {
                eprintln!("skipping: needs {count} GPU(s): {e}");
                return None;
            }
        }
    }
    eprintln!("NCCL {}", version().unwrap());
    Some(out)
}

fn values(rank: usize, layer: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (rank * 1000 + layer * 100) as f32 + i as f32 * 0.5)
        .collect()
}

fn sum_over(ranks: usize, layer: usize, n: usize) -> Vec<f32> {
    let mut s = vec![0.0f32; n];
    for r in 0..ranks {
        for (a, b) in s.iter_mut().zip(values(r, layer, n)) {
            *a += b;
        }
    }
    s
}

#[test]
fn a_one_rank_communicator_leaves_the_values() {
    let Some(devs) = devices(1) else { return };
    let n = 1000;
    let stream = Stream::new(&devs[0]).unwrap();
    let mut comms = Communicator::init_all(&devs).unwrap();
    let mut buf = DeviceBuffer::from_host(&devs[0], &values(0, 0, n)).unwrap();
    comms[0].all_reduce(&mut [&mut buf], &stream).unwrap();
    stream.synchronize().unwrap();
    assert_eq!(buf.to_vec().unwrap(), values(0, 0, n));
    drop(comms.pop());
    // the same through a unique id, as separate processes would
    let id = UniqueId::new().unwrap();
    let again = UniqueId::from_bytes(id.as_bytes()).unwrap();
    let comm = Communicator::init_rank(&again, 1, 0, &devs[0]).unwrap();
    assert_eq!((comm.rank(), comm.ranks()), (0, 1));
    comm.all_reduce(&mut [&mut buf], &stream).unwrap();
    stream.synchronize().unwrap();
    assert_eq!(buf.to_vec().unwrap(), values(0, 0, n));
    // bad arguments are errors, not crashes
    let twice = [devs[0].clone(), devs[0].clone()];
    assert_eq!(
        Communicator::init_all(&twice).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        Communicator::init_rank(&id, 2, 2, &devs[0])
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidArgument
    );
    assert!(comm.all_reduce(&mut [], &stream).is_err());
}

#[test]
fn two_gpus_sum_layers_in_one_group_and_across_threads() {
    let Some(devs) = devices(2) else { return };
    let n = 3001;
    // one thread drives both GPUs: two layers per GPU, one group call
    let comms = Communicator::init_all(&devs).unwrap();
    let streams: Vec<Stream> = devs.iter().map(|d| Stream::new(d).unwrap()).collect();
    let bufs: Vec<Vec<DeviceBuffer<f32>>> = (0..2)
        .map(|r| {
            (0..2)
                .map(|l| DeviceBuffer::from_host(&devs[r], &values(r, l, n)).unwrap())
                .collect()
        })
        .collect();
    let mut calls = Vec::new();
    for ((comm, stream), layers) in comms.iter().zip(&streams).zip(&bufs) {
        for b in layers {
            calls.push((comm, b.ptr(), b.len(), stream.raw()));
        }
    }
    // SAFETY: every buffer lives on its communicator's device until the syncs below.
    unsafe { all_reduce_across(&calls).unwrap() };
    for (r, (stream, layers)) in streams.iter().zip(&bufs).enumerate() {
        stream.synchronize().unwrap();
        for (l, b) in layers.iter().enumerate() {
            assert_eq!(b.to_vec().unwrap(), sum_over(2, l, n), "{r} {l}");
        }
    }
    // a buffer of the other GPU is refused
    let mut foreign = DeviceBuffer::from_host(&devs[1], &values(0, 0, 4)).unwrap();
    assert_eq!(
        comms[0]
            .all_reduce(&mut [&mut foreign], &streams[0])
            .unwrap_err()
            .kind(),
        ErrorKind::Mismatch
    );
    drop(comms);
    // one thread per GPU, joined through a unique id
    let id = UniqueId::new().unwrap();
    let handles: Vec<_> = devs
        .iter()
        .cloned()
        .enumerate()
        .map(|(r, dev)| {
            std::thread::spawn(move || {
                let comm = Communicator::init_rank(&id, 2, r, &dev).unwrap();
                let stream = Stream::new(&dev).unwrap();
                let mut a = DeviceBuffer::from_host(&dev, &values(r, 0, n)).unwrap();
                let mut b = DeviceBuffer::from_host(&dev, &values(r, 1, n)).unwrap();
                comm.all_reduce(&mut [&mut a, &mut b], &stream).unwrap();
                stream.synchronize().unwrap();
                (a.to_vec().unwrap(), b.to_vec().unwrap())
            })
        })
        .collect();
    for h in handles {
        let (a, b) = h.join().unwrap();
        assert_eq!(a, sum_over(2, 0, n));
        assert_eq!(b, sum_over(2, 1, n));
    }
}
