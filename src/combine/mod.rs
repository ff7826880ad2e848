//! Combining the ranks' partial outputs (the TPLA all-reduce, DESIGN 3.2).
//!
//! Three ways, one contract: afterwards every rank's buffer holds the sum over ranks.
//! - [`all_reduce_in_process`]: several ranks in one process.
//! - An engine's own communicator: any `FnMut(&mut [f32]) -> Result<()>` (the C ABI
//!   wraps a callback into one) given to [`all_reduce_with`].
//! - NCCL on GPUs (feature `nccl`): [`nccl`].
//!
//! Sequence shards merge their partial outputs by their log-sum-exps first:
//! [`sequence`] (on the CPU), `sequence_device` (on the GPU, feature `cuda`) and
//! `sequence_engine` (the same on an engine's own device buffers).

use crate::error::{Error, Result};

#[cfg(feature = "nccl")]
pub mod nccl;
pub mod sequence;
#[cfg(feature = "cuda")]
pub mod sequence_device;
#[cfg(feature = "cuda")]
pub mod sequence_engine;

/// Sums `buffers` element-wise, in rank order, and writes the sum into each of them, so
/// every rank ends with bit-identical values.
pub fn all_reduce_in_process(buffers: &mut [&mut [f32]]) -> Result<()> {
    let Some(first) = buffers.first() else {
        return Err(Error::invalid("an all-reduce needs at least one buffer"));
    };
    let n = first.len();
    if let Some(bad) = buffers.iter().position(|b| b.len() != n) {
        return Err(Error::invalid(format!(
            "rank {bad}'s buffer holds {} values, rank 0's holds {n}",
            buffers[bad].len()
        )));
    }
    for i in 0..n {
        let sum: f32 = buffers.iter().map(|b| b[i]).sum();
        for b in buffers.iter_mut() {
            b[i] = sum;
        }
    }
    Ok(())
}

/// Hands this rank's partial outputs to an engine's communicator, which must replace
/// them in place by the sum over ranks; its error is returned as it is.
pub fn all_reduce_with<F>(buffer: &mut [f32], mut communicator: F) -> Result<()>
where
    F: FnMut(&mut [f32]) -> Result<()>,
{
    communicator(buffer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_gets_the_sum() {
        let mut a = vec![1.0, 2.0, 3.0];
        let mut b = vec![10.0, 20.0, 30.0];
        let mut c = vec![0.5, 0.25, -3.0];
        all_reduce_in_process(&mut [&mut a, &mut b, &mut c]).unwrap();
        assert_eq!(a, vec![11.5, 22.25, 30.0]);
        assert_eq!(a, b);
        assert_eq!(a, c);
        let mut short = vec![1.0];
        assert!(all_reduce_in_process(&mut [&mut a, &mut short]).is_err());
        assert!(all_reduce_in_process(&mut []).is_err());
    }

    #[test]
    fn a_communicator_error_is_returned() {
        let mut a = vec![1.0f32; 4];
        all_reduce_with(&mut a, |b| {
            b.iter_mut().for_each(|x| *x *= 2.0);
            Ok(())
        })
        .unwrap();
        assert_eq!(a, vec![2.0; 4]);
        let e = all_reduce_with(&mut a, |_| {
            Err(Error::new(crate::ErrorKind::Backend, "link down"))
        });
        assert_eq!(e.unwrap_err().message(), "link down");
    }
}
