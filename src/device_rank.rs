//! One tensor-parallel rank on a GPU (feature `cuda`): the rank's slice cache of every
//! layer in device memory, the decode kernels, and the projection of the latent outputs
//! through `W'_UV` into the rank's partial head outputs (f32, on the device), which the
//! ranks then sum: [`crate::combine::nccl`] across GPUs, or
//! [`crate::combine::all_reduce_in_process`] after [`DeviceRank::download_partial`].
//!
//! The queries are the kernel's rows `[batch][heads][slice_width + d_r]` (the absorbed,
//! scaled latent query, then the scaled RoPE query), as
//! [`reference::rank_query`](crate::attention::reference::rank_query) builds them.

use crate::attention::cuda::{
    CUstream, CudaBackend, DecodePlan, DeviceBuffer, DeviceCache, DeviceCacheConfig,
    SequenceKernels, PAGE_SIZE,
};
use crate::attention::LatentShape;
use crate::cache::{RankCache, TransformId};
use crate::convert::RankWeights;
use crate::decode::RankContext;
use crate::error::{Error, ErrorKind, Result};
use crate::geometry::{HybridPlan, ModelDims, SequenceSharding, ShardPlan};
use cudarc::cublas::{result as blas, sys as blas_sys};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::Arc;

pub(crate) fn blas_err(what: &str) -> impl FnOnce(blas::CublasError) -> Error + '_ {
    move |e| Error::new(ErrorKind::Backend, format!("cuBLAS: {what} failed: {e}"))
}

/// A cuBLAS handle (the `W'_UV` projection is one strided batched product per step).
pub(crate) struct Blas(pub(crate) blas_sys::cublasHandle_t);

impl Blas {
    pub(crate) fn new(backend: &CudaBackend) -> Result<Self> {
        // SAFETY: only tries to dlopen libcublas.
        if !unsafe { blas_sys::is_culib_present() } {
            return Err(Error::unsupported(
                "the cuBLAS library (libcublas.so) was not found on the library path",
            ));
        }
        backend.device().bind()?;
        Ok(Blas(
            blas::create_handle().map_err(blas_err("creating a handle"))?,
        ))
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: destroyed once.
        let _ = unsafe { blas::destroy_handle(self.0) };
    }
}

/// What a device rank needs of a layer's weights.
struct LayerWeights {
    /// `[heads][slice_width][d_v]`
    w_uv: Vec<f32>,
    transform: TransformId,
}

struct DeviceLayer {
    cache: DeviceCache,
    /// `[heads][slice_width][d_v]`
    w_uv: DeviceBuffer<f32>,
}

/// One rank of a TPLA (or, with one group, MLA) layer stack on one GPU.
pub struct DeviceRank {
    backend: CudaBackend,
    dims: ModelDims,
    plan: ShardPlan,
    layers: Vec<DeviceLayer>,
    /// Sequence id -> device cache slot (the same in every layer).
    slots: HashMap<u32, usize>,
    max_len: usize,
    max_batch: usize,
    plans: HashMap<usize, DecodePlan>,
    slot_ids: DeviceBuffer<i32>,
    queries: DeviceBuffer<f32>,
    latent: DeviceBuffer<f32>,
    /// Per layer `[max_batch][heads]`: the log-sum-exps of the layer's last step.
    lses: Vec<DeviceBuffer<f32>>,
    /// Per layer `[max_batch][heads]` (f64): the shared logit bounds of merge (b), and
    /// the batch of the step that wrote them (none: that step computed none).
    bounds: Vec<DeviceBuffer<f64>>,
    bounds_batch: Vec<Option<usize>>,
    /// Per layer `[max_batch][heads][d_v]`.
    partials: Vec<DeviceBuffer<f32>>,
    /// The sequence shard this rank holds ([`SequenceSharding::NONE`] and 0: every token).
    sharding: SequenceSharding,
    shard: usize,
    /// Loaded with the rank when it is a sequence shard, else at its first merge.
    sequence_kernels: Option<Arc<SequenceKernels>>,
    /// Scratch of the merges, allocated at the first.
    merge: Option<MergeScratch>,
    blas: Blas,
}

/// A rank's buffers for the sequence-shard merges ([`crate::combine::sequence_device`]).
pub(crate) struct MergeScratch {
    /// `[shards][max_batch * heads]`: the group's gathered log-sum-exps (merge (a)
    /// through NCCL).
    #[cfg(feature = "nccl")]
    pub(crate) gathered: DeviceBuffer<f32>,
    /// `[max_batch * heads][d_v + 2]` f64: this rank's pack (merge (b) through NCCL).
    #[cfg(feature = "nccl")]
    pub(crate) packed: DeviceBuffer<f64>,
    /// The merge (b) kernels' error bits.
    pub(crate) error: DeviceBuffer<u32>,
}

impl MergeScratch {
    /// Whether the scratch serves `shards` shards of `rows` rows.
    fn fits(&self, shards: usize, rows: usize) -> bool {
        #[cfg(feature = "nccl")]
        return self.gathered.len() >= shards * rows;
        #[cfg(not(feature = "nccl"))]
        {
            // in process, only the error word: any scratch fits
            let _ = (shards, rows);
            true
        }
    }
}

// SAFETY: the rank's raw handles (streams, cuBLAS, modules) are used from one thread at a
// time (every method takes `&mut self` or only reads); CUDA and cuBLAS allow moving them
// between threads.
unsafe impl Send for DeviceRank {}

impl std::fmt::Debug for DeviceRank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceRank")
            .field("plan", &self.plan)
            .field("sharding", &self.sharding)
            .field("shard", &self.shard)
            .field("layers", &self.layers.len())
            .field("sequences", &self.slots.len())
            .finish()
    }
}

impl DeviceRank {
    /// Uploads sequences `seqs` of every layer of `cache` (a registered shard file, or a
    /// host cache) and the layers' `W'_UV` to the backend's GPU; steps then decode
    /// batches of at most `max_batch` of those sequences.
    pub fn upload(
        backend: CudaBackend,
        weights: &[RankWeights],
        cache: &RankCache,
        seqs: &[u32],
        max_batch: usize,
    ) -> Result<Self> {
        let first = weights
            .first()
            .ok_or_else(|| Error::invalid("a device rank needs at least one layer"))?;
        for (l, w) in weights.iter().enumerate() {
            if w.dims != first.dims || w.plan != first.plan {
                return Err(Error::mismatch(format!(
                    "layer {l}'s weights belong to another geometry or rank"
                )));
            }
        }
        let layers: Vec<LayerWeights> = weights
            .iter()
            .map(|w| LayerWeights {
                w_uv: w.w_uv.iter().map(|&v| v as f32).collect(),
                transform: TransformId {
                    code: w.transform_code,
                    fingerprint: w.transform_fingerprint,
                },
            })
            .collect();
        Self::upload_layers(
            backend, first.dims, first.plan, &layers, cache, seqs, max_batch,
        )
    }

    /// As [`Self::upload`], with the weights a [`RankContext`] holds (every layer must
    /// have them).
    pub fn from_context(
        backend: CudaBackend,
        context: &RankContext,
        cache: &RankCache,
        seqs: &[u32],
        max_batch: usize,
    ) -> Result<Self> {
        let layers = (0..context.layer_count())
            .map(|l| {
                let layer = context.layer(l)?;
                Ok(LayerWeights {
                    w_uv: layer.w_uv.clone(),
                    transform: layer.transform_id(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Self::upload_layers(
            backend,
            *context.dims(),
            *context.plan(),
            &layers,
            cache,
            seqs,
            max_batch,
        )
    }

    fn upload_layers(
        backend: CudaBackend,
        dims: ModelDims,
        plan: ShardPlan,
        weights: &[LayerWeights],
        cache: &RankCache,
        seqs: &[u32],
        max_batch: usize,
    ) -> Result<Self> {
        let spec = cache.spec();
        if spec.dims() != &dims || spec.groups() != plan.groups || spec.group() != plan.group {
            return Err(Error::mismatch(format!(
                "the cache holds latent group {} of {}, the weights are for group {} of {}",
                spec.group(),
                spec.groups(),
                plan.group,
                plan.groups
            )));
        }
        if spec.layers() != weights.len() {
            return Err(Error::mismatch(format!(
                "the cache has {} layers, the weights {}",
                spec.layers(),
                weights.len()
            )));
        }
        for (l, w) in weights.iter().enumerate() {
            if spec.transforms()[l] != w.transform {
                return Err(Error::mismatch(format!(
                    "layer {l} of the cache was rotated by another transform than its weights"
                )));
            }
        }
        if seqs.is_empty() {
            return Err(Error::invalid("a device rank needs at least one sequence"));
        }
        // A sequence shard may hold no token of a sequence (one shorter than the shards
        // or the interleave): its decode gives zero outputs and a log-sum-exp of -inf.
        let sharded = spec.is_sequence_shard();
        let mut max_len = 1;
        let mut pages = vec![0; weights.len()];
        for (l, layer_pages) in pages.iter_mut().enumerate() {
            for &s in seqs {
                let len = cache.seq_len(s, l)?;
                if len == 0 && !sharded {
                    return Err(Error::invalid(format!(
                        "sequence {s} has no tokens in layer {l}: decode needs at least one"
                    )));
                }
                max_len = max_len.max(len);
                *layer_pages += len.div_ceil(PAGE_SIZE);
            }
            *layer_pages = (*layer_pages).max(1);
        }
        let position = (spec.sequence_sharding(), spec.sequence_shard());
        let mut rank = Self::empty(backend, dims, plan, position, seqs, max_len, max_batch)?;
        for (l, w) in weights.iter().enumerate() {
            let mut dev = rank.new_layer_cache(pages[l])?;
            let view = cache.layer(l)?;
            for (slot, &s) in seqs.iter().enumerate() {
                dev.upload(slot, &view, s)?;
            }
            rank.layers.push(DeviceLayer {
                cache: dev,
                w_uv: DeviceBuffer::from_host(rank.backend.device(), &w.w_uv)?,
            });
        }
        Ok(rank)
    }

    /// A rank of `layers` layers whose caches hold `seqs.len()` sequences of `context`
    /// pseudo-random rows, generated on the device, and random `W'_UV`: benchmark inputs
    /// of any size without a host cache.
    pub fn synthetic(
        backend: CudaBackend,
        dims: ModelDims,
        plan: ShardPlan,
        layers: usize,
        sequences: usize,
        context: usize,
        seed: u64,
    ) -> Result<Self> {
        let hybrid = HybridPlan {
            latent: plan,
            sharding: SequenceSharding::NONE,
            shard: 0,
        };
        Self::synthetic_shard(backend, dims, &hybrid, layers, sequences, context, seed)
    }

    /// As [`Self::synthetic`] for rank `plan` of a hybrid deployment: each cache holds
    /// the rank's share of sequences of `context` tokens
    /// ([`SequenceSharding::tokens_on`]), which may be none.
    pub fn synthetic_shard(
        backend: CudaBackend,
        dims: ModelDims,
        plan: &HybridPlan,
        layers: usize,
        sequences: usize,
        context: usize,
        seed: u64,
    ) -> Result<Self> {
        if layers == 0 || sequences == 0 || context == 0 {
            return Err(Error::invalid(
                "a synthetic rank needs at least one layer, sequence and token",
            ));
        }
        let sharding = SequenceSharding::new(plan.sharding.shards, plan.sharding.interleave)?;
        let held = sharding.tokens_on(plan.shard, context as u64)? as usize;
        let latent = plan.latent;
        latent.check_belongs_to(&dims)?;
        let seqs: Vec<u32> = (0..sequences as u32).collect();
        let position = (sharding, plan.shard);
        let mut rank = Self::empty(
            backend,
            dims,
            latent,
            position,
            &seqs,
            held.max(1),
            sequences,
        )?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let bound = (3.0 / latent.slice_width as f32).sqrt();
        for l in 0..layers {
            let mut dev = rank.new_layer_cache((sequences * held.div_ceil(PAGE_SIZE)).max(1))?;
            for slot in 0..sequences {
                dev.fill_synthetic(slot, held, seed ^ (((l * sequences + slot) as u64) << 8))?;
            }
            let w_uv: Vec<f32> = (0..latent.heads * latent.slice_width * dims.d_v)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            rank.layers.push(DeviceLayer {
                cache: dev,
                w_uv: DeviceBuffer::from_host(rank.backend.device(), &w_uv)?,
            });
        }
        Ok(rank)
    }

    fn empty(
        backend: CudaBackend,
        dims: ModelDims,
        plan: ShardPlan,
        (sharding, shard): (SequenceSharding, usize),
        seqs: &[u32],
        max_len: usize,
        max_batch: usize,
    ) -> Result<Self> {
        sharding.check_shard(shard)?;
        if max_batch == 0 || max_batch > 65535 {
            return Err(Error::invalid(format!(
                "decode batch must be 1 to 65535, got {max_batch}"
            )));
        }
        let mut slots = HashMap::new();
        for (slot, &s) in seqs.iter().enumerate() {
            if slots.insert(s, slot).is_some() {
                return Err(Error::invalid(format!("sequence {s} is listed twice")));
            }
        }
        let shape = LatentShape {
            heads: plan.heads,
            slice_width: plan.slice_width,
            d_r: dims.d_r,
        };
        // Checks the shape against the kernels before anything is allocated.
        backend.kernels(shape.heads, shape.slice_width, shape.d_r)?;
        let sequence_kernels = if sharding.shards > 1 {
            Some(backend.sequence_kernels()?)
        } else {
            None
        };
        let dev = backend.device().clone();
        let (h, w) = (plan.heads, plan.slice_width);
        Ok(DeviceRank {
            blas: Blas::new(&backend)?,
            slot_ids: DeviceBuffer::new(&dev, max_batch)?,
            queries: DeviceBuffer::new(&dev, max_batch * h * shape.row_width())?,
            latent: DeviceBuffer::new(&dev, max_batch * h * w)?,
            lses: Vec::new(),
            bounds: Vec::new(),
            bounds_batch: Vec::new(),
            partials: Vec::new(),
            sharding,
            shard,
            sequence_kernels,
            merge: None,
            backend,
            dims,
            plan,
            layers: Vec::new(),
            slots,
            max_len,
            max_batch,
            plans: HashMap::new(),
        })
    }

    fn new_layer_cache(&mut self, pages: usize) -> Result<DeviceCache> {
        let len = self.max_batch * self.plan.heads * self.dims.d_v;
        let rows = self.max_batch * self.plan.heads;
        let dev = self.backend.device();
        self.partials.push(DeviceBuffer::new(dev, len)?);
        self.lses.push(DeviceBuffer::new(dev, rows)?);
        self.bounds.push(DeviceBuffer::new(dev, rows)?);
        self.bounds_batch.push(None);
        self.backend.new_cache(DeviceCacheConfig {
            slice_width: self.plan.slice_width,
            pages,
            slots: self.slots.len(),
            max_pages_per_slot: self.max_len.div_ceil(PAGE_SIZE),
        })
    }

    pub fn backend(&self) -> &CudaBackend {
        &self.backend
    }
    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }
    pub fn dims(&self) -> &ModelDims {
        &self.dims
    }
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }
    /// The stream [`Self::decode`] runs on (the backend's).
    pub fn stream(&self) -> CUstream {
        self.backend.stream()
    }
    /// The largest batch of one step.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }
    /// Sequences on the device.
    pub fn sequences(&self) -> usize {
        self.slots.len()
    }
    /// Values per query row: `slice_width + d_r`.
    pub fn query_width(&self) -> usize {
        self.plan.slice_width + self.dims.d_r
    }
    /// Values of a step's partial outputs for `batch` queries: `batch * heads * d_v`.
    pub fn partial_len(&self, batch: usize) -> usize {
        batch * self.plan.heads * self.dims.d_v
    }

    /// Layer `layer`'s partial head outputs `[max_batch][heads][d_v]` (f32, device); a
    /// step of batch `b` writes the first `b * heads * d_v` values.
    pub fn partial(&self, layer: usize) -> Result<&DeviceBuffer<f32>> {
        per_layer(&self.partials, layer)
    }

    /// Mutable access to layer `layer`'s partial outputs (to poison them in tests, or to
    /// hand them to [`Communicator::all_reduce`](crate::combine::nccl::Communicator::all_reduce)).
    pub fn partial_mut(&mut self, layer: usize) -> Result<&mut DeviceBuffer<f32>> {
        per_layer_mut(&mut self.partials, layer)
    }

    /// How the deployment spreads a sequence's tokens over sequence shards (from the
    /// uploaded cache; [`SequenceSharding::NONE`] when the rank holds every token).
    pub fn sequence_sharding(&self) -> SequenceSharding {
        self.sharding
    }
    /// The sequence shard this rank holds (0 without sequence sharding).
    pub fn sequence_shard(&self) -> usize {
        self.shard
    }
    /// Whether the rank holds one sequence shard of several (then it decodes with
    /// [`Self::decode_sequence_shard`] and merges with
    /// [`crate::combine::sequence_device`]).
    pub fn is_sequence_shard(&self) -> bool {
        self.sharding.shards > 1
    }
    /// The rank's place in a hybrid deployment of `plan().groups` latent groups times
    /// its sequence shards.
    pub fn hybrid_plan(&self) -> HybridPlan {
        HybridPlan {
            latent: self.plan,
            sharding: self.sharding,
            shard: self.shard,
        }
    }

    /// Layer `layer`'s log-sum-exps `[max_batch][heads]` (f32, device) of its last step:
    /// per head, of the scores over the rank's tokens; -inf where a sequence shard holds
    /// no token of the entry.
    pub fn lse(&self, layer: usize) -> Result<&DeviceBuffer<f32>> {
        per_layer(&self.lses, layer)
    }

    /// Mutable access to layer `layer`'s log-sum-exps (to poison them in tests).
    pub fn lse_mut(&mut self, layer: usize) -> Result<&mut DeviceBuffer<f32>> {
        per_layer_mut(&mut self.lses, layer)
    }

    /// Layer `layer`'s shared logit bounds `[max_batch][heads]` (f64, device), written
    /// by [`Self::decode_sequence_shard`] with a RoPE key norm bound.
    pub fn logit_bounds(&self, layer: usize) -> Result<&DeviceBuffer<f64>> {
        per_layer(&self.bounds, layer)
    }

    /// The batch of layer `layer`'s last step when that step wrote logit bounds.
    pub(crate) fn bounds_batch(&self, layer: usize) -> Option<usize> {
        self.bounds_batch.get(layer).copied().flatten()
    }

    /// The sequence-merge kernels and scratch for `shards` shards (allocated at the
    /// first call), with the rank's partial outputs, log-sum-exps and bounds of `layer`.
    pub(crate) fn merge_parts(
        &mut self,
        shards: usize,
        layer: usize,
    ) -> Result<(Arc<SequenceKernels>, MergeParts<'_>)> {
        self.check_layer(layer)?;
        let kernels = match &self.sequence_kernels {
            Some(k) => k.clone(),
            None => {
                let k = self.backend.sequence_kernels()?;
                self.sequence_kernels = Some(k.clone());
                k
            }
        };
        let rows = self.max_batch * self.plan.heads;
        if !matches!(&self.merge, Some(m) if m.fits(shards, rows)) {
            let dev = self.backend.device();
            let mut error = DeviceBuffer::new(dev, 1)?;
            error.fill_bytes(0)?;
            self.merge = Some(MergeScratch {
                #[cfg(feature = "nccl")]
                gathered: DeviceBuffer::new(dev, shards * rows)?,
                #[cfg(feature = "nccl")]
                packed: DeviceBuffer::new(dev, rows * (self.dims.d_v + 2))?,
                error,
            });
        }
        Ok((
            kernels,
            MergeParts {
                scratch: self.merge.as_mut().expect("allocated above"),
                partial: &mut self.partials[layer],
                lse: &self.lses[layer],
                bounds: &self.bounds[layer],
            },
        ))
    }

    /// Waits for the rank's stream and copies the first `out.len()` partial outputs of
    /// `layer` to the host.
    pub fn download_partial(&self, layer: usize, out: &mut [f32]) -> Result<()> {
        let buf = self.partial(layer)?;
        self.backend.device().synchronize()?;
        buf.download(out)
    }

    /// The device cache slots of `seqs` (what [`Self::enqueue`] reads on the device),
    /// checked: 1 to `max_batch` sequences, each on this rank.
    pub fn slots_of(&self, seqs: &[u32]) -> Result<Vec<i32>> {
        if seqs.is_empty() || seqs.len() > self.max_batch {
            return Err(Error::invalid(format!(
                "a step decodes 1 to {} sequences, got {}",
                self.max_batch,
                seqs.len()
            )));
        }
        seqs.iter()
            .map(|s| {
                self.slots.get(s).map(|&v| v as i32).ok_or_else(|| {
                    Error::out_of_range(format!("sequence {s} is not on this device rank"))
                })
            })
            .collect()
    }

    /// Decodes `layer` for `seqs` with `queries` (`[batch][heads][slice_width + d_r]`):
    /// waits for the previous step's use of the staging buffers, uploads, and enqueues the
    /// attention and the projection on [`Self::stream`] (no wait for them).
    pub fn decode(&mut self, layer: usize, seqs: &[u32], queries: &[f32]) -> Result<()> {
        if self.is_sequence_shard() {
            return Err(Error::invalid(format!(
                "the rank holds sequence shard {} of {}: its decode is a partial one, to \
                 merge with the other shards' (decode_sequence_shard)",
                self.shard, self.sharding.shards
            )));
        }
        self.decode_step(layer, seqs, queries, None)
    }

    /// One decode step of `layer` on a sequence shard ([`HybridPlan`]), the same kernels
    /// as [`Self::decode`] over the rank's tokens of each sequence (which may be none:
    /// that entry gets zero outputs and a log-sum-exp of -inf, which the merges weigh
    /// zero): writes [`Self::partial`] and [`Self::lse`] of the layer. With
    /// `rope_key_norm` (a bound of `|k_rope|` over every token of the batch's sequences,
    /// the same on every rank), also the shared logit bounds of merge (b)
    /// ([`Self::logit_bounds`]). Enqueued on [`Self::stream`]; the merges of
    /// [`crate::combine::sequence_device`] follow. A rank holding every token (one
    /// shard) decodes the same way.
    pub fn decode_sequence_shard(
        &mut self,
        layer: usize,
        seqs: &[u32],
        queries: &[f32],
        rope_key_norm: Option<f64>,
    ) -> Result<()> {
        if let Some(n) = rope_key_norm {
            if !(n.is_finite() && n >= 0.0) {
                return Err(Error::invalid(format!(
                    "the RoPE key norm bound must be finite and not negative, got {n}"
                )));
            }
        }
        self.decode_step(layer, seqs, queries, rope_key_norm)
    }

    fn decode_step(
        &mut self,
        layer: usize,
        seqs: &[u32],
        queries: &[f32],
        rope_key_norm: Option<f64>,
    ) -> Result<()> {
        let slots = self.slots_of(seqs)?;
        let want = seqs.len() * self.plan.heads * self.query_width();
        if queries.len() != want {
            return Err(Error::invalid(format!(
                "queries hold {} values, expected {want} ({} sequences x {} heads x {})",
                queries.len(),
                seqs.len(),
                self.plan.heads,
                self.query_width()
            )));
        }
        self.check_layer(layer)?;
        self.backend.device().synchronize()?;
        self.slot_ids.upload(&slots)?;
        self.queries.upload(queries)?;
        let (s, q, stream) = (self.slot_ids.ptr(), self.queries.ptr(), self.stream());
        let out = self.partials[layer].ptr();
        // SAFETY: the rank's own buffers, sized for max_batch >= batch, live as long as
        // the rank (whose drop waits for the stream); slot ids were checked above.
        unsafe { self.enqueue_step(layer, seqs.len(), s, q, out, stream, rope_key_norm) }
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.layers.len() {
            return Err(Error::out_of_range(format!(
                "layer {layer} is out of range for {} layers",
                self.layers.len()
            )));
        }
        Ok(())
    }

    /// Enqueues one step of `layer` on `stream` with no host synchronisation (graph
    /// capturable once the batch's plan exists, made by the first step of each batch
    /// size): attention of `batch` query rows at `q` against the slots at `slots` (device
    /// `i32`, from [`Self::slots_of`]), then the `W'_UV` projection into the `batch *
    /// heads * d_v` f32 at `out` (for example [`Self::partial`]`(layer)`).
    ///
    /// # Safety
    /// `slots` must hold `batch` valid slot ids, `q` `batch * heads * query_width` f32 and
    /// `out` [`Self::partial_len`]`(batch)` f32, all on this rank's device and valid until
    /// the stream passes this point; `stream` must be a live stream of this device, and no
    /// other step may be writing this rank's intermediate buffers concurrently on another
    /// stream.
    pub unsafe fn enqueue(
        &mut self,
        layer: usize,
        batch: usize,
        slots: u64,
        q: u64,
        out: u64,
        stream: CUstream,
    ) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { self.enqueue_step(layer, batch, slots, q, out, stream, None) }
    }

    /// [`Self::enqueue`], with the logit bounds of merge (b) from `q` when given a RoPE
    /// key norm bound. The one decode path of a device rank: a sequence shard's empty
    /// entries are fixed up between the attention and the projection.
    ///
    /// # Safety
    /// As [`Self::enqueue`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn enqueue_step(
        &mut self,
        layer: usize,
        batch: usize,
        slots: u64,
        q: u64,
        out: u64,
        stream: CUstream,
        rope_key_norm: Option<f64>,
    ) -> Result<()> {
        self.check_layer(layer)?;
        if batch == 0 || batch > self.max_batch {
            return Err(Error::invalid(format!(
                "a step decodes 1 to {} sequences, got {batch}",
                self.max_batch
            )));
        }
        if !self.plans.contains_key(&batch) {
            let shape = LatentShape {
                heads: self.plan.heads,
                slice_width: self.plan.slice_width,
                d_r: self.dims.d_r,
            };
            let plan = self.backend.plan(shape, batch, self.max_len)?;
            self.plans.insert(batch, plan);
        }
        let plan = &self.plans[&batch];
        let l = &self.layers[layer];
        let lse = self.lses[layer].ptr();
        self.bounds_batch[layer] = None;
        // SAFETY: caller contract (slots, q, stream); the rank's own latent and
        // log-sum-exp buffers hold max_batch >= batch entries.
        unsafe { plan.launch(&l.cache, slots, q, self.latent.ptr(), lse, stream)? };
        let (h, w) = (self.plan.heads, self.plan.slice_width);
        if let Some(k) = self
            .sequence_kernels
            .as_ref()
            .filter(|_| self.sharding.shards > 1)
        {
            let (_, _, lens) = l.cache.device_ptrs();
            let num_slots = l.cache.config().slots;
            // SAFETY: as above; the cache's lengths hold num_slots entries.
            unsafe {
                k.launch_empty(
                    slots,
                    lens,
                    num_slots,
                    batch,
                    h,
                    w,
                    self.latent.ptr(),
                    lse,
                    stream,
                )?
            };
        }
        if let Some(norm) = rope_key_norm {
            let k = match &self.sequence_kernels {
                Some(k) => k.clone(),
                None => {
                    let k = self.backend.sequence_kernels()?;
                    self.sequence_kernels = Some(k.clone());
                    k
                }
            };
            let latent_norm = crate::combine::sequence::latent_row_norm_bound(self.dims.d_c);
            // SAFETY: q holds batch * heads rows (caller contract); the bounds buffer
            // max_batch * heads f64.
            unsafe {
                k.launch_bounds(
                    q,
                    batch * h,
                    w,
                    self.dims.d_r,
                    latent_norm,
                    norm,
                    self.bounds[layer].ptr(),
                    stream,
                )?
            };
            self.bounds_batch[layer] = Some(batch);
        }
        self.project(layer, batch, out, stream)
    }

    /// `out[b][h][:] = W'_UV[h]^T latent[b][h][:]` for every head: one strided batched
    /// product over heads. In cuBLAS's column-major terms, per head, `C (d_v x batch) =
    /// A (d_v x w) * B (w x batch)` with `A` the row-major `W'_UV[h]` (`w x d_v`), `B` the
    /// head's latents (leading dimension `heads * w`) and `C` its outputs (`heads * d_v`).
    fn project(&self, layer: usize, batch: usize, out: u64, stream: CUstream) -> Result<()> {
        let (h, w, dv) = (self.plan.heads, self.plan.slice_width, self.dims.d_v);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let a = self.layers[layer].w_uv.ptr() as *const f32;
        let b = self.latent.ptr() as *const f32;
        let c = out as *mut f32;
        self.backend.device().bind()?;
        // SAFETY: live handle and stream; the three operands are device buffers sized
        // for heads x w x d_v, max_batch x heads x w and (the caller's) batch x heads x d_v.
        unsafe {
            blas::set_stream(self.blas.0, stream as _).map_err(blas_err("binding a stream"))?;
            blas::sgemm_strided_batched(
                self.blas.0,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                dv as i32,
                batch as i32,
                w as i32,
                &alpha,
                a,
                dv as i32,
                (w * dv) as i64,
                b,
                (h * w) as i32,
                w as i64,
                &beta,
                c,
                (h * dv) as i32,
                dv as i64,
                h as i32,
            )
        }
        .map_err(blas_err("projecting latent outputs through W_UV"))
    }
}

/// What a merge reads and writes of one rank's layer.
pub(crate) struct MergeParts<'a> {
    pub(crate) scratch: &'a mut MergeScratch,
    pub(crate) partial: &'a mut DeviceBuffer<f32>,
    pub(crate) lse: &'a DeviceBuffer<f32>,
    pub(crate) bounds: &'a DeviceBuffer<f64>,
}

impl Drop for DeviceRank {
    fn drop(&mut self) {
        // Buffers are freed below; no kernel of this rank may still be using them.
        let _ = self.backend.device().synchronize();
    }
}

#[cfg(feature = "nccl")]
impl DeviceRank {
    /// Sums the partial outputs of `layers` for a step of `batch` queries over the ranks
    /// of `comm` (one NCCL group call), in place, on [`Self::stream`]: afterwards every
    /// rank's [`Self::partial`] holds the layer's head outputs. Every rank must pass the
    /// same layers and batch.
    pub fn all_reduce(
        &mut self,
        comm: &crate::combine::nccl::Communicator,
        layers: &[usize],
        batch: usize,
    ) -> Result<()> {
        if comm.device().ordinal() != self.backend.device().ordinal() {
            return Err(Error::mismatch(format!(
                "rank {}'s communicator is on device {}, this rank on device {}",
                comm.rank(),
                comm.device().ordinal(),
                self.backend.device().ordinal()
            )));
        }
        if batch == 0 || batch > self.max_batch {
            return Err(Error::invalid(format!(
                "a step decodes 1 to {} sequences, got {batch}",
                self.max_batch
            )));
        }
        let count = self.partial_len(batch);
        let spans = layers
            .iter()
            .map(|&l| Ok((self.partial(l)?.ptr(), count)))
            .collect::<Result<Vec<_>>>()?;
        // SAFETY: each span is a prefix of a partial buffer of this rank's device, which
        // lives as long as the rank (whose drop waits for the stream); the stream is the
        // rank's own.
        unsafe { comm.all_reduce_raw(&spans, self.stream()) }
    }
}

/// Layer `layer`'s entry of a per-layer list, or OutOfRange.
fn per_layer<T>(entries: &[T], layer: usize) -> Result<&T> {
    let n = entries.len();
    entries
        .get(layer)
        .ok_or_else(|| Error::out_of_range(format!("layer {layer} of {n}")))
}

/// As [`per_layer`], mutable.
fn per_layer_mut<T>(entries: &mut [T], layer: usize) -> Result<&mut T> {
    let n = entries.len();
    entries
        .get_mut(layer)
        .ok_or_else(|| Error::out_of_range(format!("layer {layer} of {n}")))
}
