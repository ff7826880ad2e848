//! Once a context has reserved a batch size (and run a first step, on which the backend's
//! worker threads finish starting), libtpla allocates nothing in a decode step on engine
//! memory. A counting global allocator sees every allocation of the process; this binary
//! holds this one test so that nothing else allocates meanwhile. What it still sees is the
//! thread pool's: rayon's job injector (crossbeam) allocates a block per 63 jobs handed to
//! the pool, and a CPU step hands it two, so about one allocation per 30 steps. The test
//! therefore bounds allocations per step far below one: any allocation of libtpla's own
//! in a step would make it at least one per step.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use tpla::attention::cpu::CpuBackend;
use tpla::decode::{Outputs, Queries, RankContext, RankLayer};
use tpla::engine::{BlockTable, PagedCache, PagedLayout, PagedStep};
use tpla::transform::Transform;
use tpla::{DType, ModelDims, ShardPlan};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, counting calls that allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded contract.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn a_reserved_engine_decode_step_allocates_nothing() {
    let d = ModelDims::new(8, 128, 32, 32, 24, 0.15).unwrap();
    let plan = ShardPlan::new(&d, 2, 0).unwrap();
    let (h, w, rw) = (plan.heads, plan.slice_width, plan.row_width(&d));
    let weights = |n: usize| (0..n).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect();
    let layer = RankLayer::from_f32(
        weights(h * w * d.d_n),
        weights(h * w * d.d_v),
        1.0,
        Transform::identity(d.d_c).unwrap(),
        0.5,
    )
    .unwrap();
    let mut ctx = RankContext::new(d, plan, 1, Box::new(CpuBackend::new(2).unwrap())).unwrap();
    ctx.install(0, layer).unwrap();
    let max_batch = 6;
    // a batch too large to address, or to allocate, is an error, not an abort
    assert_eq!(
        ctx.reserve(usize::MAX).unwrap_err().kind(),
        tpla::ErrorKind::InvalidArgument
    );
    assert_eq!(
        ctx.reserve(1 << 40).unwrap_err().kind(),
        tpla::ErrorKind::OutOfCapacity
    );
    ctx.reserve(max_batch).unwrap();

    let (page, width) = (16, 80);
    let mut first_step = true;
    for dtype in [DType::Bf16, DType::F32, DType::Fp8E4m3] {
        let layout = PagedLayout {
            dtype,
            row_width: rw,
            rope_width: d.d_r,
            page_size: page,
            page_stride: page * dtype.row_bytes(rw - d.d_r, d.d_r),
            pages: max_batch * width,
        };
        // finite values of every type: small f32s; bf16 pairs; e4m3 codes, and scales
        // and bf16 keys read from the same words (all finite)
        let words: Vec<u32> = (0..layout.extent().unwrap() / 4)
            .map(|i| match dtype {
                DType::F32 => (0.001 * (i % 13) as f32).to_bits(),
                _ => 0x3c00_3c00 + (i % 5) as u32,
            })
            .collect();
        for batch in [1, 3, max_batch] {
            // mixed lengths, long enough to be split, one padding entry; batches grow, so
            // only the reserve can have sized the buffers of the later ones
            let lens: Vec<i32> = (0..batch as i32)
                .map(|b| [1200, 37, 0, 640, 5, 64][b as usize])
                .collect();
            let table: Vec<i32> = (0..(batch * width) as i32).rev().collect();
            let mut schedule = vec![0; ctx.decode_plan_len(batch)];
            ctx.decode_plan(&lens, &mut schedule).unwrap();
            let q = vec![0.1f32; batch * h * rw];
            let mut heads = vec![0.0; batch * h * d.d_v];
            let (mut out, mut lse) = (vec![0.0; batch * h * w], vec![0.0; batch * h]);
            let step = PagedStep {
                cache: PagedCache::new(layout, bytemuck::cast_slice(&words)).unwrap(),
                block_table: BlockTable::new(&table, batch, width).unwrap(),
                seq_lens: &lens,
                plan: &schedule,
                softmax_scale: None,
                mu: None,
            };
            if first_step {
                ctx.decode_paged(0, &step, Queries::Joined(&q), Outputs::Heads(&mut heads))
                    .unwrap();
                first_step = false;
            }
            const STEPS: usize = 20;
            let before = ALLOCATIONS.load(Ordering::SeqCst);
            for _ in 0..STEPS {
                ctx.decode_paged(0, &step, Queries::Joined(&q), Outputs::Heads(&mut heads))
                    .unwrap();
                let latent = Outputs::Latent {
                    out: &mut out,
                    lse: &mut lse,
                };
                ctx.decode_paged(0, &step, Queries::Joined(&q), latent)
                    .unwrap();
            }
            let allocated = ALLOCATIONS.load(Ordering::SeqCst) - before;
            assert!(
                allocated * 10 <= 2 * STEPS,
                "{dtype:?} batch {batch}: {allocated} allocations in {} decode calls",
                2 * STEPS
            );
            assert!(heads.iter().all(|v| v.is_finite()));
        }
    }
}
