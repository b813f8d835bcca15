//! The block cost shared by kv-aware, load-only and approx-prefix (Dynamo's router cost, in blocks):
//!
//! ```text
//! prefill_blocks = ceil(uncached prompt tokens / block size) + ceil(pending prefill tokens / block size)
//! decode_blocks  = blocks in use on the worker + blocks the request will hold
//! cost           = overlap_weight * prefill_blocks + decode_blocks + waiting_weight * waiting
//! ```
//!
//! The policies differ only in the overlap they feed in: the fleet's index (kv-aware), none
//! (load-only), or the policy's own predictions (approx-prefix).

use crate::load::WorkerLoad;

use super::config::CostWeights;

/// The request's size, worked out once per decision.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Shape {
    /// Tokens per block, at least 1.
    pub block_size: u64,
    /// Full blocks hashed.
    pub hashed_blocks: u64,
    /// Prompt tokens; never fewer than the hashed blocks hold.
    pub prompt_tokens: u64,
    /// Expected output tokens, as the request gave them.
    pub expected_output_tokens: Option<u64>,
    /// Blocks the request holds while decoding (prompt plus expected output).
    pub request_blocks: u64,
}

impl Shape {
    /// The shape of a request; inconsistent figures are made consistent rather than rejected.
    pub fn new(
        hashed_blocks: usize,
        prompt_tokens: u64,
        expected_output_tokens: Option<u64>,
        block_size: u32,
    ) -> Shape {
        let block_size = u64::from(block_size.max(1));
        let hashed_blocks = hashed_blocks as u64;
        let prompt_tokens = prompt_tokens.max(hashed_blocks.saturating_mul(block_size));
        let request_blocks =
            prompt_tokens.saturating_add(expected_output_tokens.unwrap_or(0)).div_ceil(block_size);
        Shape { block_size, hashed_blocks, prompt_tokens, expected_output_tokens, request_blocks }
    }

    /// Prompt tokens a worker holding `overlap_blocks` leading blocks still has to prefill.
    pub fn uncached_tokens(&self, overlap_blocks: u32) -> u64 {
        self.prompt_tokens.saturating_sub(u64::from(overlap_blocks).saturating_mul(self.block_size))
    }
}

/// One worker's figures under the block cost.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) struct BlockCost {
    /// Uncached request blocks plus pending prefill blocks.
    pub prefill_blocks: u64,
    /// Blocks in use plus the request's.
    pub decode_blocks: u64,
    /// The weighted sum; lower wins.
    pub cost: f64,
}

/// The cost of sending the request to a worker holding `overlap_blocks` of it.
pub(crate) fn block_cost(
    shape: &Shape,
    overlap_blocks: u32,
    load: &WorkerLoad,
    weights: &CostWeights,
) -> BlockCost {
    let prefill_blocks = shape
        .uncached_tokens(overlap_blocks)
        .div_ceil(shape.block_size)
        .saturating_add(load.inflight_prefill_tokens.div_ceil(shape.block_size));
    let decode_blocks = load.active_blocks().saturating_add(shape.request_blocks);
    let cost = weights.overlap_weight * prefill_blocks as f64
        + decode_blocks as f64
        + weights.waiting_weight * f64::from(load.waiting);
    BlockCost { prefill_blocks, decode_blocks, cost }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unhashed_tail_counts_as_uncached_prefill() {
        // 10 hashed blocks of 16, 200 prompt tokens: 40 tail tokens were never hashed (partial block,
        // or hashing stopped early) and always need prefill.
        let shape = Shape::new(10, 200, None, 16);
        assert_eq!(shape.request_blocks, 13);
        let c = block_cost(&shape, 10, &WorkerLoad::default(), &CostWeights::default());
        assert_eq!(c.prefill_blocks, 3);
        assert_eq!(c.decode_blocks, 13);
        assert_eq!(c.cost, 16.0);
    }

    #[test]
    fn figures_follow_the_formula() {
        let shape = Shape::new(4, 64, Some(40), 16);
        assert_eq!(shape.request_blocks, 7); // ceil(104 / 16)
        let load = WorkerLoad {
            waiting: 3,
            kv_usage: 0.5,
            kv_capacity_blocks: 100,
            inflight_prefill_tokens: 17,
            ..Default::default()
        };
        let weights = CostWeights { overlap_weight: 2.0, waiting_weight: 1.5 };
        let c = block_cost(&shape, 1, &load, &weights);
        assert_eq!(c.prefill_blocks, 3 + 2);
        assert_eq!(c.decode_blocks, 50 + 7);
        assert_eq!(c.cost, 2.0 * 5.0 + 57.0 + 1.5 * 3.0);
    }

    #[test]
    fn degenerate_inputs_do_not_panic() {
        let shape = Shape::new(usize::MAX, u64::MAX, Some(u64::MAX), 0);
        let load = WorkerLoad { kv_usage: f32::NAN, inflight_prefill_tokens: u64::MAX, ..Default::default() };
        let c = block_cost(&shape, u32::MAX, &load, &CostWeights::default());
        assert!(c.cost.is_finite());
        assert_eq!(Shape::new(0, 0, None, 16).request_blocks, 0);
    }
}
