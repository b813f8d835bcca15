//! kvmesh-core: everything about routing an LLM request that can be a pure function.
//!
//! Request parsing, block hashing, the fleet's prefix index, the load view, scoring policies and the
//! prefill/decode decision live here, shared by the Envoy filter (wasm32-wasip1) and the native
//! services. This crate must never do I/O, read a clock, or call a host: time and randomness come in
//! as arguments, so every decision is reproducible in a unit test.

pub mod error;
pub mod fleet;
pub mod hash;
pub mod index;
pub mod load;
pub mod pd;
pub mod request;
pub mod score;
#[cfg(feature = "tokenizer")]
pub mod template;
#[cfg(feature = "tokenizer")]
pub mod tokenize;
pub mod usage;

pub use error::Error;
pub use fleet::{Engine, Fleet, Role, WorkerId, WorkerInfo, WorkerSlot, WorkerState};
pub use hash::{BlockHash, BlockHasher, BlockSalt, TokenId};
pub use index::{IndexStats, Overlap, PrefixIndex};
pub use load::{GpuStats, WorkerLoad};
pub use pd::{DisaggConfig, Disaggregator, LocalReason, PdDecision, PdMode};
pub use score::{
    CostWeights, Decision, Explanation, LoadLimits, Outcome, Policy, PolicyKind, RouteInput, RoutingConfig,
    Scorer, SkipReason, SplitMix64,
};
#[cfg(feature = "tokenizer")]
pub use tokenize::{
    BlockWalk, Encoder, SegmentCacheConfig, SegmentCacheStats, TokenizeError, Tokenizer, TokenizerFiles,
};
pub use usage::{Accuracy, Usage, UsageScanner, Verdict};
