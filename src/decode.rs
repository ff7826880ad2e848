//! A rank's decode context: the Rust API a serving engine (and the C ABI) drives.
//!
//! A [`RankContext`] owns one rank's folded weights of every layer (f32), the layer
//! transforms (to rotate appended tokens), and an attention backend. A decode step for
//! one layer and a batch of sequences:
//! 1. builds the rank's latent-attention queries: `scale * mu * W'_UK q_nope` (or the
//!    caller's absorbed latent query) then `scale * q_rope`, per head;
//! 2. runs the backend over the rank's [`RankCache`] layer;
//! 3. projects the latent outputs through `W'_UV` into the rank's partial head outputs
//!    (f32), which the ranks then sum ([`crate::combine`]), or returns the latent
//!    outputs and log-sum-exps as they are.
//!
//! Scratch buffers grow to the largest batch seen and are reused: a step allocates
//! nothing proportional to the context length.

use crate::attention::reference::{dot, slice_token, AppendMode};
use crate::attention::{LatentAttention, LatentShape, RowSource};
use crate::cache::{RankCache, TransformId};
use crate::convert::RankWeights;
use crate::error::{Error, Result};
use crate::geometry::{ModelDims, ShardPlan};
use crate::transform::Transform;
use half::bf16;

/// One layer of a rank: absorbed weights in f32 plus what appends need.
#[derive(Clone, Debug)]
pub struct RankLayer {
    /// `[heads][slice_width][d_n]`
    pub w_uk: Vec<f32>,
    /// `[heads][slice_width][d_v]`
    pub w_uv: Vec<f32>,
    pub mu: f64,
    /// The layer's rotation, applied to appended tokens before slicing.
    pub transform: Transform,
    /// This rank's share of the latent energy, for sliced-RMS appends (DESIGN 3.4).
    pub slice_fraction: f64,
    /// `transform`'s id, computed once: fingerprinting hashes the whole `U`.
    transform_id: TransformId,
}

impl RankLayer {
    /// A layer from f64 folded weights (see [`crate::convert`]).
    pub fn new(weights: &RankWeights, transform: Transform, slice_fraction: f64) -> Result<Self> {
        let transform_id = TransformId::of(&transform);
        if transform_id.code != weights.transform_code
            || transform_id.fingerprint != weights.transform_fingerprint
        {
            return Err(Error::mismatch(
                "the transform is not the one the weights were folded with",
            ));
        }
        if !(slice_fraction > 0.0 && slice_fraction <= 1.0) {
            return Err(Error::invalid(format!(
                "slice energy fraction must lie in (0, 1], got {slice_fraction}"
            )));
        }
        Ok(RankLayer {
            w_uk: weights.w_uk.iter().map(|&v| v as f32).collect(),
            w_uv: weights.w_uv.iter().map(|&v| v as f32).collect(),
            mu: weights.mu,
            transform,
            slice_fraction,
            transform_id,
        })
    }

    /// A layer from f32 absorbed weights, as a converted weights file stores them
    /// ([`crate::weights_file`]); the context checks their lengths when installing them.
    pub fn from_f32(
        w_uk: Vec<f32>,
        w_uv: Vec<f32>,
        mu: f64,
        transform: Transform,
        slice_fraction: f64,
    ) -> Result<Self> {
        if !(mu.is_finite() && mu > 0.0) {
            return Err(Error::invalid(format!(
                "mu must be finite and positive, got {mu}"
            )));
        }
        if !(slice_fraction > 0.0 && slice_fraction <= 1.0) {
            return Err(Error::invalid(format!(
                "slice energy fraction must lie in (0, 1], got {slice_fraction}"
            )));
        }
        // A NaN or infinite weight would turn every later decode of the layer into NaN
        // outputs with an OK status; fold and the weights loader refuse them too.
        check_finite("W'_UK", &w_uk)?;
        check_finite("W'_UV", &w_uv)?;
        Ok(RankLayer {
            w_uk,
            w_uv,
            mu,
            transform_id: TransformId::of(&transform),
            transform,
            slice_fraction,
        })
    }

    pub fn transform_id(&self) -> TransformId {
        self.transform_id
    }
}

/// How the queries of a step are given.
#[derive(Clone, Copy, Debug)]
pub enum Queries<'a> {
    /// `q_nope` `[batch][heads][d_n]` and RoPE-rotated `q_rope` `[batch][heads][d_r]`,
    /// for the rank's heads; the context absorbs `W'_UK`.
    Nope {
        q_nope: &'a [f32],
        q_rope: &'a [f32],
    },
    /// Absorbed latent queries in the rotated basis, already cut to this rank's slice,
    /// `[batch][heads][slice_width]`, and `q_rope` as above.
    Latent { q_lat: &'a [f32], q_rope: &'a [f32] },
    /// Absorbed latent query then RoPE query in one row per head,
    /// `[batch][heads][slice_width + d_r]` (FlashMLA's `q` layout, cut to this rank).
    Joined(&'a [f32]),
}

/// Where a step writes.
#[derive(Debug)]
pub enum Outputs<'a> {
    /// The rank's partial head outputs `[batch][heads][d_v]`, to be summed over ranks.
    Heads(&'a mut [f32]),
    /// The latent outputs `[batch][heads][slice_width]` and the log-sum-exp of each
    /// head's scores `[batch][heads]`.
    Latent {
        out: &'a mut [f32],
        lse: &'a mut [f32],
    },
    /// As `Heads`, rounded to bf16.
    HeadsBf16(&'a mut [bf16]),
    /// As `Latent`, the latent outputs rounded to bf16 (the log-sum-exps stay f32).
    LatentBf16 {
        out: &'a mut [bf16],
        lse: &'a mut [f32],
    },
    /// As `Heads`, with the log-sum-exp of each head's scores `[batch][heads]`: what a
    /// sequence shard's merge needs ([`crate::combine::sequence`]).
    HeadsAndLse {
        out: &'a mut [f32],
        lse: &'a mut [f32],
    },
}

/// Logit bounds a sequence shard computes alongside its outputs for merge (b) of
/// [`crate::combine::sequence`]: every shard of a latent group computes the same ones.
#[derive(Debug)]
pub struct LogitBounds<'a> {
    /// A bound of `|k_rope|` over every token of the batch's sequences, equal on every
    /// rank (RoPE keeps a key's norm; the engine sees every key it appends).
    pub rope_key_norm: f64,
    /// `[batch][heads]`
    pub out: &'a mut [f64],
}

/// The two factors of a step's query rows: `scale * mu` on the latent part, `scale` on
/// the RoPE part.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct QueryScales {
    pub latent: f32,
    pub rope: f32,
}

impl QueryScales {
    pub(crate) fn new(softmax_scale: f64, mu: f64) -> Self {
        QueryScales {
            latent: (softmax_scale * mu) as f32,
            rope: softmax_scale as f32,
        }
    }
}

/// Buffers of a step, grown to the largest batch seen (or reserved) and reused.
#[derive(Default)]
pub(crate) struct StepScratch {
    /// The backend's query rows `[batch][heads][slice_width + d_r]`.
    q: Vec<f32>,
    /// Apart from `q`: the backend's outputs borrow them while it reads the query rows.
    outputs: OutputScratch,
}

#[derive(Default)]
struct OutputScratch {
    /// Latent outputs and log-sum-exps when the caller wants something else.
    latent: Vec<f32>,
    lse: Vec<f32>,
    /// One head's output before rounding to bf16, `[d_v]`.
    head_row: Vec<f32>,
}

impl StepScratch {
    fn reserve(&mut self, dims: &ModelDims, plan: &ShardPlan, batch: usize) -> Result<()> {
        let rw = plan.row_width(dims);
        let q = shape_count("reserved query rows", &[batch, plan.heads, rw])?;
        try_capacity(&mut self.q, q, "query rows")?;
        let out = &mut self.outputs;
        try_capacity(&mut out.latent, q / rw * plan.slice_width, "latent outputs")?;
        try_capacity(&mut out.lse, q / rw, "log-sum-exps")?;
        try_capacity(&mut out.head_row, dims.d_v, "a head output")
    }
}

impl OutputScratch {
    /// Head outputs `out` `[batch][heads][d_v]` of a step: `attend`'s latent outputs (and
    /// log-sum-exps into `lse`, or into scratch where the caller wants none) projected
    /// through `W'_UV`. Generic over the output type so that each type gets its own
    /// projection loop, with no branch on the type inside it.
    fn heads<T: HeadElement>(
        &mut self,
        attend: impl FnOnce(&mut [f32], &mut [f32]) -> Result<()>,
        w_uv: &[f32],
        shape: LatentShape,
        d_v: usize,
        out: &mut [T],
        lse: Option<&mut [f32]>,
    ) -> Result<()> {
        let (h, w) = (shape.heads, shape.slice_width);
        let rows = out.len() / d_v;
        self.latent.resize(rows * w, 0.0);
        self.head_row.resize(d_v, 0.0);
        let lse = match lse {
            Some(lse) => lse,
            None => {
                self.lse.resize(rows, 0.0);
                &mut self.lse
            }
        };
        attend(&mut self.latent, lse)?;
        let latent = &self.latent;
        for (i, o) in out.chunks_exact_mut(d_v).enumerate() {
            T::project(
                w_uv,
                i % h,
                &latent[i * w..(i + 1) * w],
                o,
                &mut self.head_row,
            );
        }
        Ok(())
    }
}

/// An element type of head outputs: how a head's projection lands in it.
trait HeadElement: Sized {
    /// Head `head`'s output `out` of its latent output `lat` ([`project`]); `row` is f32
    /// scratch of `out`'s length, for a type that is rounded from f32.
    fn project(w_uv: &[f32], head: usize, lat: &[f32], out: &mut [Self], row: &mut [f32]);
}

impl HeadElement for f32 {
    fn project(w_uv: &[f32], head: usize, lat: &[f32], out: &mut [f32], _row: &mut [f32]) {
        project(w_uv, head, lat, out);
    }
}

impl HeadElement for bf16 {
    fn project(w_uv: &[f32], head: usize, lat: &[f32], out: &mut [bf16], row: &mut [f32]) {
        project(w_uv, head, lat, row);
        for (x, v) in out.iter_mut().zip(row.iter()) {
            *x = bf16::from_f32(*v);
        }
    }
}

/// A step's rows and how to follow them: the cache view and batch entries the backend
/// reads, the schedule (engine steps) or none (the backend plans), and a correction of
/// the latent outputs and log-sum-exps before they are projected or rounded (engine
/// steps: empty sequences and bad pages).
pub(crate) struct StepRows<'a> {
    pub rows: &'a dyn RowSource,
    pub seqs: &'a [u32],
    pub schedule: Option<&'a [i32]>,
    pub patch: Option<&'a OutputPatch<'a>>,
}

/// Rewrites a step's latent outputs and log-sum-exps (`[batch][heads][slice_width]`,
/// `[batch][heads]`) in place after the backend wrote them.
pub(crate) type OutputPatch<'a> = dyn Fn(&mut [f32], &mut [f32]) + 'a;

/// One rank of a TPLA layer stack.
pub struct RankContext {
    dims: ModelDims,
    plan: ShardPlan,
    layers: Vec<Option<RankLayer>>,
    backend: Box<dyn LatentAttention + Send>,
    scratch: StepScratch,
    pub(crate) paged: crate::engine::PagedScratch,
}

impl std::fmt::Debug for RankContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RankContext")
            .field("plan", &self.plan)
            .field("layers", &self.layers.len())
            .field("backend", &self.backend.name())
            .finish()
    }
}

/// Grows `v`'s capacity to `len` elements, or an `OutOfCapacity` error where the memory
/// cannot be had (never an abort).
pub(crate) fn try_capacity<T>(v: &mut Vec<T>, len: usize, what: &str) -> Result<()> {
    v.try_reserve(len.saturating_sub(v.len())).map_err(|_| {
        Error::new(
            crate::ErrorKind::OutOfCapacity,
            format!("cannot allocate {what} for {len} elements"),
        )
    })
}

/// Refuses NaN and infinities, naming the first one's index.
pub(crate) fn check_finite(what: &str, values: &[f32]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::invalid(format!(
            "{what}[{i}] is {}: values must be finite",
            values[i]
        ))),
    }
}

/// The element count of a `[batch][heads][width]`-like shape, or an error when the
/// product does not fit in memory (a count taken from the caller must never wrap).
pub(crate) fn shape_count(what: &str, factors: &[usize]) -> Result<usize> {
    factors
        .iter()
        .try_fold(1usize, |n, &f| n.checked_mul(f))
        .filter(|&n| n <= isize::MAX as usize / 4)
        .ok_or_else(|| {
            let shape: Vec<String> = factors.iter().map(|f| f.to_string()).collect();
            Error::invalid(format!(
                "{what}: a [{}] array is too large to address",
                shape.join("][")
            ))
        })
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::invalid(format!(
            "{what} holds {got} values, expected {want}"
        )));
    }
    Ok(())
}

impl RankContext {
    /// A context for `layers` layers whose weights are set with [`Self::set_layer`].
    pub fn new(
        dims: ModelDims,
        plan: ShardPlan,
        layers: usize,
        backend: Box<dyn LatentAttention + Send>,
    ) -> Result<Self> {
        plan.check_belongs_to(&dims)?;
        if layers == 0 || layers > crate::cache::MAX_LAYERS {
            return Err(Error::invalid(format!(
                "a context needs between 1 and {} layers, got {layers}",
                crate::cache::MAX_LAYERS
            )));
        }
        Ok(RankContext {
            dims,
            plan,
            layers: vec![None; layers],
            backend,
            scratch: StepScratch::default(),
            paged: crate::engine::PagedScratch::new(plan.row_width(&dims)),
        })
    }

    pub fn dims(&self) -> &ModelDims {
        &self.dims
    }
    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }
    pub fn backend_name(&self) -> String {
        self.backend.name()
    }

    /// Installs layer `index`'s weights; they must be this rank's slice and heads.
    pub fn set_layer(
        &mut self,
        index: usize,
        weights: &RankWeights,
        layer: RankLayer,
    ) -> Result<()> {
        if weights.dims != self.dims || weights.plan != self.plan {
            return Err(Error::mismatch(
                "layer weights were folded for another geometry or rank",
            ));
        }
        self.install(index, layer)
    }

    /// A context holding every layer of a converted weights file (see
    /// [`crate::weights_file`]), which fixes the dims and the rank's plan.
    pub fn from_weights_file(
        path: impl AsRef<std::path::Path>,
        backend: Box<dyn LatentAttention + Send>,
    ) -> Result<Self> {
        let file = crate::weights_file::read(path)?;
        let mut ctx = Self::new(file.dims, file.plan, file.layers.len(), backend)?;
        for (index, layer) in file.layers.into_iter().enumerate() {
            ctx.install(index, layer)?;
        }
        Ok(ctx)
    }

    /// Installs layer `index` from absorbed weights that are this context's rank's
    /// (for example [`RankLayer::from_f32`]): their lengths and the transform's width are
    /// checked against the context.
    pub fn install(&mut self, index: usize, layer: RankLayer) -> Result<()> {
        if layer.transform.dim() != self.dims.d_c {
            return Err(Error::mismatch(format!(
                "the transform is {} wide, the latent width d_c is {}",
                layer.transform.dim(),
                self.dims.d_c
            )));
        }
        let w = self.plan.slice_width;
        check_len(
            "W_UK",
            layer.w_uk.len(),
            self.plan.heads * w * self.dims.d_n,
        )?;
        check_len(
            "W_UV",
            layer.w_uv.len(),
            self.plan.heads * w * self.dims.d_v,
        )?;
        let slot = self.layer_slot(index)?;
        *slot = Some(layer);
        Ok(())
    }

    fn layer_slot(&mut self, index: usize) -> Result<&mut Option<RankLayer>> {
        let n = self.layers.len();
        self.layers.get_mut(index).ok_or_else(|| {
            Error::out_of_range(format!("layer {index} is out of range for {n} layers"))
        })
    }

    /// Layer `index`, which must have been set.
    pub fn layer(&self, index: usize) -> Result<&RankLayer> {
        installed(&self.layers, index)
    }

    /// The transform ids of all layers, in order (what the rank's cache must match).
    pub fn transform_ids(&self) -> Result<Vec<TransformId>> {
        (0..self.layers.len())
            .map(|i| Ok(self.layer(i)?.transform_id()))
            .collect()
    }

    pub(crate) fn check_cache(&self, cache: &RankCache) -> Result<()> {
        let spec = cache.spec();
        let (c, d) = (spec.dims(), &self.dims);
        for (name, cached, here) in [
            ("heads", c.heads, d.heads),
            ("latent width d_c", c.d_c, d.d_c),
            ("RoPE width d_r", c.d_r, d.d_r),
            ("no-RoPE width d_n", c.d_n, d.d_n),
            ("value width d_v", c.d_v, d.d_v),
        ] {
            if cached != here {
                return Err(Error::mismatch(format!(
                    "the cache has {name} {cached}, this context {here}"
                )));
            }
        }
        if c.softmax_scale.to_bits() != d.softmax_scale.to_bits() {
            return Err(Error::mismatch(format!(
                "the cache has softmax scale {}, this context {}",
                c.softmax_scale, d.softmax_scale
            )));
        }
        if spec.groups() != self.plan.groups || spec.group() != self.plan.group {
            return Err(Error::mismatch(format!(
                "the cache holds latent group {} of {}, this context is group {} of {}",
                spec.group(),
                spec.groups(),
                self.plan.group,
                self.plan.groups
            )));
        }
        if spec.layers() != self.layers.len() {
            return Err(Error::mismatch(format!(
                "the cache has {} layers, the context {}",
                spec.layers(),
                self.layers.len()
            )));
        }
        Ok(())
    }

    /// Appends one token to `seq` in `layer` of `cache`: `latent` is the full pre-norm
    /// latent `a_t` (`d_c`), `k_rope` the RoPE-rotated key (`d_r`).
    pub fn append_token(
        &self,
        cache: &mut RankCache,
        seq: u32,
        layer: usize,
        latent: &[f32],
        k_rope: &[f32],
        exact_rms: bool,
    ) -> Result<()> {
        self.append(cache, seq, layer, None, latent, k_rope, exact_rms)
    }

    #[allow(clippy::too_many_arguments)]
    fn append(
        &self,
        cache: &mut RankCache,
        seq: u32,
        layer: usize,
        position: Option<u64>,
        latent: &[f32],
        k_rope: &[f32],
        exact_rms: bool,
    ) -> Result<()> {
        self.check_cache(cache)?;
        let l = self.layer(layer)?;
        check_len("latent", latent.len(), self.dims.d_c)?;
        check_len("RoPE key", k_rope.len(), self.dims.d_r)?;
        // checked before the rotation, which would spread a NaN over every column
        check_finite("latent", latent)?;
        check_finite("k_rope", k_rope)?;
        if cache.spec().transforms()[layer] != l.transform_id() {
            return Err(Error::mismatch(format!(
                "layer {layer} of the cache was rotated by another transform"
            )));
        }
        let a: Vec<f64> = latent.iter().map(|&v| v as f64).collect();
        let kr: Vec<f64> = k_rope.iter().map(|&v| v as f64).collect();
        let mode = if exact_rms {
            AppendMode::Exact
        } else {
            AppendMode::SlicedRms {
                fraction: l.slice_fraction,
            }
        };
        let row = slice_token(&a, &kr, &l.transform, &self.plan, mode)?;
        match position {
            None => cache.append_rows(seq, layer, &row),
            Some(p) => cache.append_rows_at(seq, layer, p, &row),
        }
    }

    /// As [`Self::append_token`], for the token at `position` of the sequence, on a
    /// cache of one sequence shard ([`RankCache::append_rows_at`]: a position another
    /// shard owns is a `Mismatch` error) or of every token.
    #[allow(clippy::too_many_arguments)]
    pub fn append_token_at(
        &self,
        cache: &mut RankCache,
        seq: u32,
        layer: usize,
        position: u64,
        latent: &[f32],
        k_rope: &[f32],
        exact_rms: bool,
    ) -> Result<()> {
        self.append(cache, seq, layer, Some(position), latent, k_rope, exact_rms)
    }

    /// One decode step of `layer` for the sequences `seqs` of `cache`.
    pub fn decode(
        &mut self,
        cache: &RankCache,
        layer: usize,
        seqs: &[u32],
        queries: Queries,
        outputs: Outputs,
    ) -> Result<()> {
        self.check_cache(cache)?;
        if cache.spec().is_sequence_shard() {
            return Err(Error::invalid(format!(
                "the cache holds sequence shard {} of {}: its decode is a partial one, to \
                 merge with the other shards' (decode_sequence_shard)",
                cache.spec().sequence_shard(),
                cache.spec().sequence_sharding().shards
            )));
        }
        let l = installed(&self.layers, layer)?;
        if cache.spec().transforms()[layer] != l.transform_id() {
            return Err(Error::mismatch(format!(
                "layer {layer} of the cache was rotated by another transform"
            )));
        }
        let scales = QueryScales::new(self.dims.softmax_scale, l.mu);
        let view = cache.layer(layer)?;
        let rows = StepRows {
            rows: &view,
            seqs,
            schedule: None,
            patch: None,
        };
        self.decode_rows(layer, rows, scales, queries, outputs)
    }

    /// One decode step of `layer` on a sequence shard ([`crate::geometry::HybridPlan`]):
    /// `cache` holds this rank's tokens of each sequence only, which may be none (a
    /// sequence shorter than the shards, or than the interleave); such an entry gets zero
    /// outputs and a log-sum-exp of -inf, which the merge weighs zero. `outputs` must be
    /// [`Outputs::HeadsAndLse`] or [`Outputs::Latent`] (the merge needs the log-sum-exps).
    /// With `bounds`, also writes the shared logit bounds of merge (b).
    pub fn decode_sequence_shard(
        &mut self,
        cache: &RankCache,
        layer: usize,
        seqs: &[u32],
        queries: Queries,
        outputs: Outputs,
        bounds: Option<LogitBounds>,
    ) -> Result<()> {
        if !matches!(
            outputs,
            Outputs::HeadsAndLse { .. } | Outputs::Latent { .. }
        ) {
            return Err(Error::invalid(
                "a sequence shard's decode needs outputs with log-sum-exps (HeadsAndLse or Latent)",
            ));
        }
        if let Some(b) = &bounds {
            if !(b.rope_key_norm.is_finite() && b.rope_key_norm >= 0.0) {
                return Err(Error::invalid(format!(
                    "the RoPE key norm bound must be finite and not negative, got {}",
                    b.rope_key_norm
                )));
            }
            check_len("logit bounds", b.out.len(), seqs.len() * self.plan.heads)?;
        }
        self.check_cache(cache)?;
        let l = installed(&self.layers, layer)?;
        if cache.spec().transforms()[layer] != l.transform_id() {
            return Err(Error::mismatch(format!(
                "layer {layer} of the cache was rotated by another transform"
            )));
        }
        let scales = QueryScales::new(self.dims.softmax_scale, l.mu);
        let view = cache.layer(layer)?;
        let empty = seqs
            .iter()
            .map(|&s| Ok(view.seq_len(s)? == 0))
            .collect::<Result<Vec<bool>>>()?;
        // Moved out for the call so that the view can borrow the zero row while the
        // context decodes; taking the default allocates nothing.
        let paged = std::mem::take(&mut self.paged);
        let rows = EmptyAsZeroRow {
            rows: &view,
            zero_row: paged.zero_row(),
        };
        let (h, w) = (self.plan.heads, self.plan.slice_width);
        let patch = |out: &mut [f32], lse: &mut [f32]| {
            for (b, _) in empty.iter().enumerate().filter(|(_, &e)| e) {
                out[b * h * w..(b + 1) * h * w].fill(0.0);
                lse[b * h..(b + 1) * h].fill(f32::NEG_INFINITY);
            }
        };
        let step = StepRows {
            rows: &rows,
            seqs,
            schedule: None,
            patch: Some(&patch),
        };
        let result = self.decode_rows(layer, step, scales, queries, outputs);
        self.paged = paged;
        result?;
        if let Some(b) = bounds {
            let rw = self.plan.row_width(&self.dims);
            let latent_norm = crate::combine::sequence::latent_row_norm_bound(self.dims.d_c);
            for (m, q) in b.out.iter_mut().zip(self.scratch.q.chunks_exact(rw)) {
                *m = crate::combine::sequence::logit_bound(q, w, latent_norm, b.rope_key_norm);
            }
        }
        Ok(())
    }

    /// Sizes the query rows, outputs and the backend's work buffers for steps of up to
    /// `batch` sequences now, so that those steps allocate nothing (after the first step,
    /// on which the backend's worker threads finish starting).
    /// A batch too large to address is an `InvalidArgument` error, memory that cannot be
    /// had an `OutOfCapacity` one.
    pub fn reserve(&mut self, batch: usize) -> Result<()> {
        let shape = self.shape();
        self.scratch.reserve(&self.dims, &self.plan, batch)?;
        self.paged.reserve(batch)?;
        self.backend.reserve(shape, batch)
    }

    /// The backend's shape of this rank's steps.
    pub(crate) fn shape(&self) -> LatentShape {
        LatentShape {
            heads: self.plan.heads,
            slice_width: self.plan.slice_width,
            d_r: self.dims.d_r,
        }
    }

    pub(crate) fn backend(&self) -> &dyn LatentAttention {
        self.backend.as_ref()
    }

    /// The one decode path of both cache kinds: builds the query rows, runs the backend
    /// over `step`'s rows, and writes `outputs`.
    pub(crate) fn decode_rows(
        &mut self,
        layer: usize,
        step: StepRows,
        scales: QueryScales,
        queries: Queries,
        outputs: Outputs,
    ) -> Result<()> {
        let (d, p) = (self.dims, self.plan);
        let (b, h, w) = (step.seqs.len(), p.heads, p.slice_width);
        let l = installed(&self.layers, layer)?;
        let shape = self.shape();
        let rw = shape.row_width();
        // Every count is checked, with checked products, before anything is allocated:
        // the scratch buffers below are then no larger than the caller's own arrays.
        let (q_name, q_in, q_width, q_rope) = match queries {
            Queries::Nope { q_nope, q_rope } => ("q_nope", q_nope, d.d_n, Some(q_rope)),
            Queries::Latent { q_lat, q_rope } => ("latent queries", q_lat, w, Some(q_rope)),
            Queries::Joined(rows) => ("query rows", rows, rw, None),
        };
        check_len(q_name, q_in.len(), shape_count(q_name, &[b, h, q_width])?)?;
        if let Some(q_rope) = q_rope {
            let want = shape_count("q_rope", &[b, h, d.d_r])?;
            check_len("q_rope", q_rope.len(), want)?;
        }
        let (out_len, lse_len) = match &outputs {
            Outputs::Heads(out) => (out.len(), None),
            Outputs::HeadsBf16(out) => (out.len(), None),
            Outputs::Latent { out, lse } => (out.len(), Some(lse.len())),
            Outputs::LatentBf16 { out, lse } => (out.len(), Some(lse.len())),
            Outputs::HeadsAndLse { out, lse } => {
                check_len("log-sum-exp outputs", lse.len(), b * h)?;
                (out.len(), None)
            }
        };
        match lse_len {
            None => {
                let want = shape_count("head outputs", &[b, h, d.d_v])?;
                check_len("head outputs", out_len, want)?;
            }
            Some(n) => {
                let want = shape_count("latent outputs", &[b, h, w])?;
                check_len("latent outputs", out_len, want)?;
                check_len("log-sum-exp outputs", n, b * h)?;
            }
        }
        let StepScratch {
            q,
            outputs: scratch,
        } = &mut self.scratch;
        // Joined rows are in the kernel's layout already: a backend that scales queries as
        // it packs them takes them as they are (no pass over them here).
        let fold = match queries {
            Queries::Joined(rows) if self.backend.scales_queries() => Some(rows),
            _ => None,
        };
        if fold.is_none() {
            q.resize(b * h * rw, 0.0);
        }
        match queries {
            _ if fold.is_some() => {}
            Queries::Nope { q_nope, .. } => {
                for (i, qrow) in q.chunks_exact_mut(rw).enumerate() {
                    let wk = &l.w_uk[(i % h) * w * d.d_n..(i % h + 1) * w * d.d_n];
                    let qn = &q_nope[i * d.d_n..(i + 1) * d.d_n];
                    for (qj, wrow) in qrow[..w].iter_mut().zip(wk.chunks_exact(d.d_n)) {
                        *qj = scales.latent * dot(wrow, qn);
                    }
                }
            }
            Queries::Latent { q_lat, .. } => {
                for (qrow, src) in q.chunks_exact_mut(rw).zip(q_lat.chunks_exact(w)) {
                    for (qj, s) in qrow[..w].iter_mut().zip(src) {
                        *qj = scales.latent * s;
                    }
                }
            }
            Queries::Joined(rows) => {
                for (qrow, src) in q.chunks_exact_mut(rw).zip(rows.chunks_exact(rw)) {
                    let (lat, rope) = qrow.split_at_mut(w);
                    for (qj, s) in lat.iter_mut().zip(&src[..w]) {
                        *qj = scales.latent * s;
                    }
                    for (qj, s) in rope.iter_mut().zip(&src[w..]) {
                        *qj = scales.rope * s;
                    }
                }
            }
        }
        if let Some(q_rope) = q_rope {
            for (qrow, src) in q.chunks_exact_mut(rw).zip(q_rope.chunks_exact(d.d_r)) {
                for (qj, s) in qrow[w..].iter_mut().zip(src) {
                    *qj = scales.rope * s;
                }
            }
        }
        let backend = &mut self.backend;
        let mut attend = |out: &mut [f32], lse: &mut [f32]| -> Result<()> {
            match (fold, step.schedule) {
                (Some(rows), schedule) => {
                    let scales = [scales.latent, scales.rope];
                    backend.attend_scaling(
                        step.rows, shape, step.seqs, schedule, rows, scales, out, lse,
                    )?
                }
                (None, Some(s)) => {
                    backend.attend_scheduled(step.rows, shape, step.seqs, s, q, out, lse)?
                }
                (None, None) => backend.attend(step.rows, shape, step.seqs, q, out, lse)?,
            }
            if let Some(patch) = step.patch {
                patch(out, lse);
            }
            Ok(())
        };
        match outputs {
            Outputs::Latent { out, lse } => attend(out, lse),
            Outputs::LatentBf16 { out, lse } => {
                let latent = &mut scratch.latent;
                latent.resize(b * h * w, 0.0);
                attend(latent, lse)?;
                for (o, v) in out.iter_mut().zip(latent.iter()) {
                    *o = bf16::from_f32(*v);
                }
                Ok(())
            }
            Outputs::Heads(out) => scratch.heads(attend, &l.w_uv, shape, d.d_v, out, None),
            Outputs::HeadsAndLse { out, lse } => {
                scratch.heads(attend, &l.w_uv, shape, d.d_v, out, Some(lse))
            }
            Outputs::HeadsBf16(out) => scratch.heads(attend, &l.w_uv, shape, d.d_v, out, None),
        }
    }
}

/// A cache layer whose empty sequences read as one zero row, so that the backends,
/// which refuse empty sequences, run over a sequence shard holding none of a sequence's
/// tokens (the step's patch then overwrites that entry's outputs).
struct EmptyAsZeroRow<'a> {
    rows: &'a dyn RowSource,
    /// At least one row of any element type.
    zero_row: &'a [u8],
}

impl RowSource for EmptyAsZeroRow<'_> {
    fn dtype(&self) -> crate::DType {
        self.rows.dtype()
    }
    fn row_width(&self) -> usize {
        self.rows.row_width()
    }
    fn page_size(&self) -> usize {
        self.rows.page_size()
    }
    fn seq_len(&self, seq: u32) -> Result<usize> {
        Ok(self.rows.seq_len(seq)?.max(1))
    }
    fn page(&self, seq: u32, page: usize) -> &[u8] {
        match self.rows.seq_len(seq) {
            // one zero row of any element type, FP8 rows (shorter than f32 ones) too
            Ok(0) => self.zero_row,
            _ => self.rows.page(seq, page),
        }
    }
}

/// Head `head`'s output `out` (`d_v`) of its latent output `lat` (`slice_width`) through
/// `W'_UV` `[heads][slice_width][d_v]`.
fn project(w_uv: &[f32], head: usize, lat: &[f32], out: &mut [f32]) {
    let (w, dv) = (lat.len(), out.len());
    let wv = &w_uv[head * w * dv..(head + 1) * w * dv];
    out.fill(0.0);
    for (x, wrow) in lat.iter().zip(wv.chunks_exact(dv)) {
        for (oj, wj) in out.iter_mut().zip(wrow) {
            *oj += x * wj;
        }
    }
}

fn installed(layers: &[Option<RankLayer>], index: usize) -> Result<&RankLayer> {
    match layers.get(index) {
        None => Err(Error::out_of_range(format!(
            "layer {index} is out of range for {} layers",
            layers.len()
        ))),
        Some(None) => Err(Error::invalid(format!("layer {index} has no weights yet"))),
        Some(Some(l)) => Ok(l),
    }
}
