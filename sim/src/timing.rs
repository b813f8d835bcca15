//! How long one engine step takes, from what the step computes.
//!
//! A step is one forward pass over a continuous batch: prefill chunks and one token per decoding
//! sequence. Its time is a fixed cost (reading the weights once), plus linear prefill compute, plus
//! prefill attention over earlier tokens, plus per-sequence decode overhead, plus reading every
//! decoding sequence's KV. The defaults and their sources are in `sim/README.md`.

/// What one step computes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepShape {
    /// Prompt (or recomputed) tokens computed this step.
    pub prefill_tokens: usize,
    /// Sum over prefill chunks of `chunk * (tokens before the chunk + chunk / 2)`: the attention
    /// (query, key) pairs of a causal prefill.
    pub prefill_pairs: f64,
    /// Sequences decoding one token this step.
    pub decode_seqs: usize,
    /// Context tokens the decoding sequences attend over (their KV read from memory).
    pub decode_context_tokens: usize,
}

/// Step-time parameters, in seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TimingModel {
    /// Fixed cost of a forward pass.
    pub step_base_s: f64,
    /// Cost per prefill token.
    pub prefill_s_per_token: f64,
    /// Cost per prefill attention pair.
    pub attention_s_per_pair: f64,
    /// Cost per decoding sequence.
    pub decode_s_per_seq: f64,
    /// Cost per context token read while decoding.
    pub kv_read_s_per_token: f64,
}

impl TimingModel {
    /// Simulated duration of a step of this shape, in seconds.
    pub fn step_seconds(&self, shape: &StepShape) -> f64 {
        self.step_base_s
            + shape.prefill_tokens as f64 * self.prefill_s_per_token
            + shape.prefill_pairs * self.attention_s_per_pair
            + shape.decode_seqs as f64 * self.decode_s_per_seq
            + shape.decode_context_tokens as f64 * self.kv_read_s_per_token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h100_8b() -> TimingModel {
        TimingModel {
            step_base_s: 6e-3,
            prefill_s_per_token: 32e-6,
            attention_s_per_pair: 1e-9,
            decode_s_per_seq: 30e-6,
            kv_read_s_per_token: 40e-9,
        }
    }

    #[test]
    fn step_time_grows_with_prefill_and_decode_batch() {
        let m = h100_8b();
        let idle = m.step_seconds(&StepShape::default());
        let one =
            m.step_seconds(&StepShape { decode_seqs: 1, decode_context_tokens: 1000, ..Default::default() });
        let many = m.step_seconds(&StepShape {
            decode_seqs: 64,
            decode_context_tokens: 64_000,
            ..Default::default()
        });
        let prefill = m.step_seconds(&StepShape {
            prefill_tokens: 1024,
            prefill_pairs: 1024.0 * 512.0,
            ..Default::default()
        });
        assert!(idle < one && one < many && one < prefill);
        // A 1k-token prefill alone lands near the ~40 ms TTFT public H100 runs show.
        assert!((0.03..0.06).contains(&prefill), "{prefill}");
    }
}
