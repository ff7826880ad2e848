//! Model dimensions of one MLA attention layer and the TPLA shard plan of one rank.
//!
//! Symbols follow DESIGN.md section 2: `heads` (H), `d_c` (latent width, kv_lora_rank),
//! `d_r` (RoPE key width), `d_n` (per-head no-RoPE width), `d_v` (per-head value width).

use crate::error::{Error, Result};

/// YaRN RoPE scaling as found in a model's `rope_scaling` config: it changes the softmax
/// scale by `mscale^2`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct YarnScaling {
    pub factor: f64,
    pub mscale_all_dim: f64,
}

impl YarnScaling {
    /// DeepSeek's `yarn_get_mscale(factor, mscale_all_dim)`.
    pub fn mscale(&self) -> f64 {
        if self.factor <= 1.0 {
            1.0
        } else {
            0.1 * self.mscale_all_dim * self.factor.ln() + 1.0
        }
    }
}

/// Softmax scale of an MLA layer: `1/sqrt(d_n + d_r)`, times `mscale^2` under YaRN.
pub fn softmax_scale(d_n: usize, d_r: usize, yarn: Option<YarnScaling>) -> f64 {
    let m = yarn.map_or(1.0, |y| y.mscale());
    m * m / ((d_n + d_r) as f64).sqrt()
}

/// Dimensions of one MLA attention layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelDims {
    pub heads: usize,
    pub d_c: usize,
    pub d_r: usize,
    pub d_n: usize,
    pub d_v: usize,
    pub softmax_scale: f64,
}

/// Largest supported width or head count (every field of [`ModelDims`]).
pub const MAX_DIM: usize = 1 << 16;

/// Names accepted by [`ModelDims::preset`].
pub const PRESETS: [&str; 3] = ["deepseek-v3", "kimi-k2", "deepseek-v2-lite"];

impl ModelDims {
    /// Checked constructor: every width positive, a finite positive scale.
    pub fn new(
        heads: usize,
        d_c: usize,
        d_r: usize,
        d_n: usize,
        d_v: usize,
        softmax_scale: f64,
    ) -> Result<Self> {
        let dims = ModelDims {
            heads,
            d_c,
            d_r,
            d_n,
            d_v,
            softmax_scale,
        };
        dims.validate()?;
        Ok(dims)
    }

    /// The layer shapes of published models, with the softmax scale their configs give
    /// (YaRN `rope_scaling` included).
    pub fn preset(name: &str) -> Result<Self> {
        let (heads, factor, mscale_all_dim) = match name {
            // config.json: rope_scaling {type: yarn, factor: 40, mscale_all_dim: 1.0}
            "deepseek-v3" => (128, 40.0, 1.0),
            // config.json: rope_scaling {type: yarn, factor: 32, mscale_all_dim: 1.0}
            "kimi-k2" => (64, 32.0, 1.0),
            // config.json: rope_scaling {type: yarn, factor: 40, mscale_all_dim: 0.707}
            "deepseek-v2-lite" => (16, 40.0, 0.707),
            _ => {
                return Err(Error::invalid(format!(
                    "unknown model preset '{}'; known presets: {}",
                    abbreviated(name),
                    PRESETS.join(", ")
                )))
            }
        };
        let yarn = YarnScaling {
            factor,
            mscale_all_dim,
        };
        ModelDims::new(heads, 512, 64, 128, 128, softmax_scale(128, 64, Some(yarn)))
    }

    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("heads", self.heads),
            ("d_c", self.d_c),
            ("d_r", self.d_r),
            ("d_n", self.d_n),
            ("d_v", self.d_v),
        ] {
            if v == 0 {
                return Err(Error::invalid(format!("{name} must be positive, got 0")));
            }
            if v > MAX_DIM {
                return Err(Error::invalid(format!(
                    "{name} = {v} is larger than the supported maximum {MAX_DIM}"
                )));
            }
        }
        if !(self.softmax_scale.is_finite() && self.softmax_scale > 0.0) {
            return Err(Error::invalid(format!(
                "softmax scale must be finite and positive, got {}",
                self.softmax_scale
            )));
        }
        Ok(())
    }
}

/// Latent group counts TPLA supports.
pub const GROUP_COUNTS: [usize; 4] = [1, 2, 4, 8];

/// What one rank holds: latent slice `group` of `groups`, and head shard `head_shard`
/// of the `ranks / groups` shards its group splits the heads into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardPlan {
    pub groups: usize,
    pub group: usize,
    pub ranks: usize,
    pub rank: usize,
    /// Heads of this rank: `head_start .. head_start + heads`.
    pub head_start: usize,
    pub heads: usize,
    /// Latent columns of this rank's slice: `slice_start .. slice_start + slice_width`.
    pub slice_start: usize,
    pub slice_width: usize,
}

impl ShardPlan {
    /// One rank per latent group, every head on every rank (the TPLA layout of DESIGN 3.2).
    pub fn new(dims: &ModelDims, groups: usize, group: usize) -> Result<Self> {
        Self::with_head_split(dims, groups, groups, group)
    }

    /// `ranks` ranks in `groups` latent groups: rank `r` holds slice `r / (ranks/groups)`
    /// and head shard `r % (ranks/groups)` of its group's heads.
    pub fn with_head_split(
        dims: &ModelDims,
        ranks: usize,
        groups: usize,
        rank: usize,
    ) -> Result<Self> {
        dims.validate()?;
        if !GROUP_COUNTS.contains(&groups) {
            return Err(Error::invalid(format!(
                "latent groups must be one of 1, 2, 4, 8, got {groups}"
            )));
        }
        if dims.d_c % groups != 0 {
            return Err(Error::invalid(format!(
                "latent width d_c = {} is not divisible by {groups} groups",
                dims.d_c
            )));
        }
        if ranks == 0 || ranks % groups != 0 {
            return Err(Error::invalid(format!(
                "{ranks} ranks cannot be split evenly into {groups} latent groups"
            )));
        }
        let shards = ranks / groups;
        if dims.heads % shards != 0 {
            return Err(Error::invalid(format!(
                "{} heads cannot be split evenly over {shards} ranks per latent group",
                dims.heads
            )));
        }
        if rank >= ranks {
            return Err(Error::out_of_range(format!(
                "rank {rank} is out of range for {ranks} ranks"
            )));
        }
        let group = rank / shards;
        let heads = dims.heads / shards;
        let slice_width = dims.d_c / groups;
        Ok(ShardPlan {
            groups,
            group,
            ranks,
            rank,
            head_start: (rank % shards) * heads,
            heads,
            slice_start: group * slice_width,
            slice_width,
        })
    }

    /// An error unless this plan is the one [`Self::with_head_split`] makes for `dims`
    /// (a plan built by hand or read from a file).
    pub fn check_belongs_to(&self, dims: &ModelDims) -> Result<()> {
        if Self::with_head_split(dims, self.ranks, self.groups, self.rank)? != *self {
            return Err(Error::invalid("shard plan does not belong to these dims"));
        }
        Ok(())
    }

    /// Values per cached token on this rank: the latent slice then the RoPE key.
    pub fn row_width(&self, dims: &ModelDims) -> usize {
        self.slice_width + dims.d_r
    }
}

/// Largest sequence-shard count and interleave a [`SequenceSharding`] accepts.
pub const MAX_SEQUENCE_SHARDS: usize = 64;
pub const MAX_INTERLEAVE: usize = 1 << 20;

/// How a sequence's tokens are spread over `shards` sequence shards: positions are cut
/// into blocks of `interleave` tokens and block `k` lives on shard `k % shards`
/// (`interleave = 1` is vLLM's token `t` on rank `t mod s`). Every shard attends over its
/// own tokens only, and the shards' partial outputs are merged with their log-sum-exps
/// ([`crate::combine::sequence`]), which is exact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SequenceSharding {
    pub shards: usize,
    pub interleave: usize,
}

impl SequenceSharding {
    /// One shard holding every token: TPLA (or MLA) as without sequence sharding.
    pub const NONE: SequenceSharding = SequenceSharding {
        shards: 1,
        interleave: 1,
    };

    pub fn new(shards: usize, interleave: usize) -> Result<Self> {
        if shards == 0 || shards > MAX_SEQUENCE_SHARDS {
            return Err(Error::invalid(format!(
                "sequence shards must lie in 1..={MAX_SEQUENCE_SHARDS}, got {shards}"
            )));
        }
        if interleave == 0 || interleave > MAX_INTERLEAVE {
            return Err(Error::invalid(format!(
                "the interleave must lie in 1..={MAX_INTERLEAVE} tokens, got {interleave}"
            )));
        }
        Ok(SequenceSharding { shards, interleave })
    }

    /// The shard that holds the token at `position` (what an engine asks before it
    /// appends a decode-time token).
    pub fn owner(&self, position: u64) -> usize {
        // the remainder is below `shards`, which fits a usize
        ((position / self.interleave as u64) % self.shards as u64) as usize
    }

    /// How many of the first `len` tokens of a sequence shard `shard` holds (zero when
    /// the sequence is shorter than the blocks before the shard's first one).
    pub fn tokens_on(&self, shard: usize, len: u64) -> Result<u64> {
        self.check_shard(shard)?;
        let (s, b) = (self.shards as u64, self.interleave as u64);
        let cycle = s * b;
        let full_cycles = len / cycle;
        let rest = len % cycle;
        let in_last = rest.saturating_sub(shard as u64 * b).min(b);
        Ok(full_cycles * b + in_last)
    }

    /// Position in its shard of the token at `position`: the row it takes there.
    pub fn local_index(&self, position: u64) -> u64 {
        let (s, b) = (self.shards as u64, self.interleave as u64);
        position / (s * b) * b + position % b
    }

    /// Position in the sequence of row `local` of shard `shard`: the inverse of
    /// [`Self::local_index`] (the position of the next token a shard holding `local`
    /// tokens receives). Saturates at `u64::MAX`.
    pub fn position_of(&self, shard: usize, local: u64) -> u64 {
        let (s, b) = (self.shards as u64, self.interleave as u64);
        (local / b)
            .saturating_mul(s * b)
            .saturating_add(shard as u64 * b + local % b)
    }

    pub(crate) fn check_shard(&self, shard: usize) -> Result<()> {
        if shard >= self.shards {
            return Err(Error::out_of_range(format!(
                "sequence shard {shard} is out of range for {} shards",
                self.shards
            )));
        }
        Ok(())
    }
}

/// One rank of a hybrid deployment of `groups` latent groups times `shards` sequence
/// shards: rank `(i, j)`, numbered `i * shards + j`, holds latent slice `i` (with every
/// head) of the tokens whose block falls on sequence shard `j`. `groups = 1` is exact
/// sequence-sharded MLA; `shards = 1` is TPLA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HybridPlan {
    /// The latent slice and heads this rank holds, as a TPLA rank of `groups` ranks.
    pub latent: ShardPlan,
    pub sharding: SequenceSharding,
    /// This rank's sequence shard `j`.
    pub shard: usize,
}

impl HybridPlan {
    pub fn new(
        dims: &ModelDims,
        groups: usize,
        sharding: SequenceSharding,
        rank: usize,
    ) -> Result<Self> {
        // groups is checked first so that the rank count below is meaningful
        ShardPlan::new(dims, groups, 0)?;
        let ranks = groups * sharding.shards;
        if rank >= ranks {
            return Err(Error::out_of_range(format!(
                "rank {rank} is out of range for {groups} latent groups x {} sequence shards",
                sharding.shards
            )));
        }
        Ok(HybridPlan {
            latent: ShardPlan::new(dims, groups, rank / sharding.shards)?,
            sharding,
            shard: rank % sharding.shards,
        })
    }

    /// Ranks of the deployment: `groups * shards`.
    pub fn ranks(&self) -> usize {
        self.latent.groups * self.sharding.shards
    }

    /// This rank's number, `group * shards + shard`.
    pub fn rank(&self) -> usize {
        self.latent.group * self.sharding.shards + self.shard
    }

    /// The rank that holds latent group `group` of the token at `position`.
    pub fn owner_rank(&self, group: usize, position: u64) -> Result<usize> {
        if group >= self.latent.groups {
            return Err(Error::out_of_range(format!(
                "latent group {group} is out of range for {} groups",
                self.latent.groups
            )));
        }
        Ok(group * self.sharding.shards + self.sharding.owner(position))
    }

    /// Whether this rank holds the token at `position`.
    pub fn holds(&self, position: u64) -> bool {
        self.sharding.owner(position) == self.shard
    }

    /// Cached bytes per token of context on this rank (`dtype.row_bytes(d_c/g, d_r) / s`
    /// on average over a long sequence).
    pub fn bytes_per_token(&self, dims: &ModelDims, dtype: crate::DType) -> f64 {
        dtype.row_bytes(self.latent.slice_width, dims.d_r) as f64 / self.sharding.shards as f64
    }
}

/// A caller's name as an error message quotes it: at most 64 characters, so that a
/// megabyte of garbage is not echoed back whole.
fn abbreviated(name: &str) -> String {
    const SHOWN: usize = 64;
    match name.char_indices().nth(SHOWN) {
        None => name.to_string(),
        Some((cut, _)) => format!("{}... ({} bytes)", &name[..cut], name.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_published_shapes_and_yarn_scales() {
        let v3 = ModelDims::preset("deepseek-v3").unwrap();
        assert_eq!(
            (v3.heads, v3.d_c, v3.d_r, v3.d_n, v3.d_v),
            (128, 512, 64, 128, 128)
        );
        // DeepSeek-V3 reference code: mscale = 0.1 * ln(40) + 1, scale = mscale^2 / sqrt(192)
        let m = 0.1 * 40f64.ln() + 1.0;
        assert!((v3.softmax_scale - m * m / 192f64.sqrt()).abs() < 1e-15);
        assert_eq!(ModelDims::preset("kimi-k2").unwrap().heads, 64);
        assert_eq!(ModelDims::preset("deepseek-v2-lite").unwrap().heads, 16);
        assert_eq!(softmax_scale(128, 64, None), 1.0 / 192f64.sqrt());
        let err = ModelDims::preset("llama").unwrap_err();
        assert!(err.message().contains("deepseek-v3"), "{err}");
    }

    #[test]
    fn plans_slice_the_latent_and_split_heads() {
        let dims = ModelDims::preset("deepseek-v3").unwrap();
        let p = ShardPlan::new(&dims, 4, 3).unwrap();
        assert_eq!((p.slice_start, p.slice_width, p.heads), (384, 128, 128));
        assert_eq!(p.row_width(&dims), 192);
        // 8 ranks, 2 groups: 4 head shards of 32 heads per group
        let p = ShardPlan::with_head_split(&dims, 8, 2, 5).unwrap();
        assert_eq!(
            (p.group, p.head_start, p.heads, p.slice_start),
            (1, 32, 32, 256)
        );
        let mla = ShardPlan::new(&dims, 1, 0).unwrap();
        assert_eq!((mla.slice_width, mla.row_width(&dims)), (512, 576));
    }

    #[test]
    fn the_owner_rule_places_every_token_once_and_counts_agree() {
        for (shards, interleave) in [(1, 1), (2, 1), (3, 1), (2, 4), (4, 3), (8, 64)] {
            let sh = SequenceSharding::new(shards, interleave).unwrap();
            for len in [0u64, 1, 2, 5, 7, 64, 129, 1000] {
                let mut held = vec![0u64; shards];
                for t in 0..len {
                    let j = sh.owner(t);
                    // the local index is the count of earlier tokens on the same shard
                    assert_eq!(sh.local_index(t), held[j], "{shards} {interleave} {t}");
                    assert_eq!(sh.position_of(j, held[j]), t);
                    held[j] += 1;
                    assert_eq!(j, (t as usize / interleave) % shards);
                }
                for (j, &n) in held.iter().enumerate() {
                    assert_eq!(
                        sh.tokens_on(j, len).unwrap(),
                        n,
                        "{shards} {interleave} {len}"
                    );
                }
            }
            assert!(sh.tokens_on(shards, 10).is_err());
        }
        // a sequence shorter than the shards leaves the last shards empty
        let sh = SequenceSharding::new(4, 2).unwrap();
        let counts: Vec<u64> = (0..4).map(|j| sh.tokens_on(j, 3).unwrap()).collect();
        assert_eq!(counts, vec![2, 1, 0, 0]);
    }

    #[test]
    fn hybrid_plans_number_ranks_group_major_and_validate_every_combination() {
        let dims = ModelDims::preset("deepseek-v3").unwrap();
        for groups in [1, 2, 4, 8] {
            for shards in [1, 2, 4, 8] {
                let sh = SequenceSharding::new(shards, 16).unwrap();
                for rank in 0..groups * shards {
                    let p = HybridPlan::new(&dims, groups, sh, rank).unwrap();
                    assert_eq!((p.latent.group, p.shard), (rank / shards, rank % shards));
                    assert_eq!((p.rank(), p.ranks()), (rank, groups * shards));
                    assert_eq!(
                        p.latent,
                        ShardPlan::new(&dims, groups, p.latent.group).unwrap()
                    );
                    let t = 16 * p.shard as u64 + 3;
                    assert!(p.holds(t));
                    assert_eq!(p.owner_rank(p.latent.group, t).unwrap(), rank);
                    assert_eq!(
                        p.bytes_per_token(&dims, crate::DType::Bf16),
                        ((512 / groups + 64) * 2) as f64 / shards as f64
                    );
                }
                let e = HybridPlan::new(&dims, groups, sh, groups * shards).unwrap_err();
                assert!(e.message().contains("out of range"), "{e}");
            }
        }
        let sh = SequenceSharding::new(2, 1).unwrap();
        let e = HybridPlan::new(&dims, 3, sh, 0).unwrap_err();
        assert!(e.message().contains("one of 1, 2, 4, 8"), "{e}");
        let p = HybridPlan::new(&dims, 2, sh, 1).unwrap();
        assert!(p
            .owner_rank(2, 0)
            .unwrap_err()
            .message()
            .contains("group 2"));
        for (shards, interleave, want) in [
            (0, 1, "sequence shards"),
            (MAX_SEQUENCE_SHARDS + 1, 1, "sequence shards"),
            (2, 0, "interleave"),
            (2, MAX_INTERLEAVE + 1, "interleave"),
        ] {
            let e = SequenceSharding::new(shards, interleave).unwrap_err();
            assert!(e.message().contains(want), "{shards} {interleave}: {e}");
        }
        assert_eq!(SequenceSharding::NONE, SequenceSharding::new(1, 1).unwrap());
    }

    #[test]
    fn invalid_plans_and_dims_are_errors_with_a_reason() {
        let dims = ModelDims::preset("deepseek-v3").unwrap();
        for (ranks, groups, rank, want) in [
            (3, 3, 0, "one of 1, 2, 4, 8"),
            (2, 16, 0, "one of 1, 2, 4, 8"),
            (0, 1, 0, "cannot be split"),
            (6, 4, 0, "cannot be split"),
            (2, 2, 2, "out of range"),
            (2 * 256, 2, 0, "heads cannot be split"),
        ] {
            let e = ShardPlan::with_head_split(&dims, ranks, groups, rank).unwrap_err();
            assert!(e.message().contains(want), "{ranks} {groups} {rank}: {e}");
        }
        let odd = ModelDims::new(8, 500, 64, 128, 128, 0.1).unwrap();
        assert!(ShardPlan::new(&odd, 8, 0)
            .unwrap_err()
            .message()
            .contains("not divisible"));
        assert!(ModelDims::new(0, 512, 64, 128, 128, 0.1).is_err());
        assert!(ModelDims::new(8, 512, 64, 128, 128, f64::NAN).is_err());
        assert!(ModelDims::new(8, 512, 64, 128, 128, -1.0).is_err());
    }
}
