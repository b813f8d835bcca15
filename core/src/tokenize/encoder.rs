//! The per-request fast path: an [`Encoder`] holds what one thread (one filter VM) reuses from
//! request to request, so encoding allocates nothing once warm: the engine's working buffers and
//! word cache, the segment cache, and the token and block-hash buffers a [`BlockWalk`] lends out.

use super::cache::{SegmentCache, SegmentCacheConfig, SegmentCacheStats};
use super::engine::{Engine, Piece, Progress, Scratch};
use super::{TokenizeError, Tokenizer, estimate};
use crate::hash::{BlockHash, BlockHasher, BlockSalt, TokenId};

/// How far [`encode_pieces`] got.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Outcome {
    /// The whole text is encoded.
    Complete,
    /// The check asked to stop; the text from byte `rest` on was not encoded. `exact_prior` is
    /// the [`estimate::prior`] of the text before `rest`, each added token in it counted as one:
    /// summed piece by piece, with cached segments' priors from the cache, so text that hit the
    /// cache is never scanned for it.
    Stopped { rest: usize, exact_prior: f32 },
}

/// The result of [`Encoder::walk_blocks`]: exact block hashes as far as some worker could hold the
/// prompt, and the prompt's length (exact, or estimated past the first block nobody holds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockWalk<'a> {
    /// Hashes of the prompt's full blocks, in order, up to and including the first one the
    /// predicate said no worker holds (all of them if every block is held).
    pub hashes: &'a [BlockHash],
    /// Exact token ids of the prompt's start: the whole prompt when [`BlockWalk::exact`], else at
    /// least every block in `hashes` (encoding stops a few pre-tokens past the first miss).
    pub tokens: &'a [TokenId],
    /// Index in `hashes` of the first block no worker holds, if there is one.
    pub first_miss: Option<usize>,
    /// Whether `tokens` is the whole prompt.
    pub exact: bool,
    /// The prompt's length in tokens: `tokens.len()` when exact, else the exact tokens plus an
    /// estimate of the rest from its bytes (error measured in `core/tests/early_exit.rs`).
    pub total_tokens: usize,
}

/// Per-thread state for encoding with a segment cache and early exit. Make one per thread (per
/// filter VM) with [`Tokenizer::encoder`] and keep it; it is tied to that tokenizer.
pub struct Encoder {
    tokenizer: Tokenizer,
    scratch: Scratch,
    cache: SegmentCache,
    tokens: Vec<TokenId>,
    hashes: Vec<BlockHash>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").field("cache", &self.cache.stats()).finish_non_exhaustive()
    }
}

impl Encoder {
    /// An encoder for `tokenizer` with a segment cache bounded by `cache`.
    pub(crate) fn new(tokenizer: Tokenizer, cache: SegmentCacheConfig) -> Self {
        let scratch = tokenizer.inner.engine.scratch();
        Encoder {
            tokenizer,
            scratch,
            cache: SegmentCache::new(cache),
            tokens: Vec::new(),
            hashes: Vec::new(),
        }
    }

    /// The tokenizer this encoder belongs to.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Segment cache counters and size.
    pub fn cache_stats(&self) -> SegmentCacheStats {
        self.cache.stats()
    }

    /// Appends the ids of `text` to `out` (not cleared), through the segment cache; the same ids
    /// as [`Tokenizer::encode`] (`add_special_tokens` false) or [`Tokenizer::encode_prompt`] (true).
    pub fn encode_into(
        &mut self,
        text: &str,
        add_special_tokens: bool,
        out: &mut Vec<TokenId>,
    ) -> Result<(), TokenizeError> {
        let inner = &*self.tokenizer.inner;
        if add_special_tokens {
            out.extend_from_slice(&inner.prompt_prefix);
        }
        encode_pieces(
            &inner.engine,
            text,
            &mut self.scratch,
            Some(&mut self.cache),
            usize::MAX,
            out,
            &mut |_| true,
        )?;
        if add_special_tokens {
            out.extend_from_slice(&inner.prompt_suffix);
        }
        Ok(())
    }

    /// Encodes `text` and hashes it block by block (`block_size` tokens, `salt` mixed into every
    /// block, as [`crate::hash::hash_prompt`]), asking `held` of each block hash whether some
    /// worker holds it; stops exact work at the first block for which it says no, and estimates
    /// the rest of the prompt's length from its bytes.
    ///
    /// `held` may keep state: to stop where no single worker holds the whole prefix (not merely
    /// the block), narrow a candidate set in it. The returned slices borrow this encoder's
    /// buffers, reused by the next call.
    pub fn walk_blocks(
        &mut self,
        text: &str,
        add_special_tokens: bool,
        block_size: usize,
        salt: BlockSalt,
        mut held: impl FnMut(BlockHash) -> bool,
    ) -> Result<BlockWalk<'_>, TokenizeError> {
        let Encoder { tokenizer, scratch, cache, tokens, hashes } = self;
        let inner = &*tokenizer.inner;
        tokens.clear();
        hashes.clear();
        let mut hasher = BlockHasher::new(block_size, salt);
        let mut missed = false;
        // Hashes every block `tokens` newly completes, until one is not held.
        let mut check = |tokens: &[TokenId]| {
            let size = hasher.block_size();
            while !missed && (hasher.blocks() + 1) * size <= tokens.len() {
                let start = hasher.blocks() * size;
                let hash = hasher.next_block(&tokens[start..start + size]);
                hashes.push(hash);
                missed = !held(hash);
            }
            !missed
        };
        let (prefix, suffix): (&[TokenId], &[TokenId]) =
            if add_special_tokens { (&inner.prompt_prefix, &inner.prompt_suffix) } else { (&[], &[]) };
        tokens.extend_from_slice(prefix);
        let outcome = if check(tokens) {
            // One pre-token gives at least one id, so `block_size` of them complete a block: the
            // model runs at most about a block past the first miss.
            encode_pieces(&inner.engine, text, scratch, Some(cache), block_size.max(1), tokens, &mut check)?
        } else {
            Outcome::Stopped { rest: 0, exact_prior: 0.0 }
        };
        let (exact, total_tokens) = match outcome {
            // Stopped on the text's last ids: nothing is left to estimate.
            Outcome::Stopped { rest, .. } if rest >= text.len() => {
                tokens.extend_from_slice(suffix);
                (true, tokens.len())
            }
            Outcome::Complete => {
                tokens.extend_from_slice(suffix);
                check(tokens);
                (true, tokens.len())
            }
            Outcome::Stopped { rest, exact_prior } => {
                let left = text.get(rest..).unwrap_or("");
                let text_tokens = tokens.len() - prefix.len();
                let estimate = estimate::remaining_tokens(&inner.engine, exact_prior, text_tokens, left);
                (false, tokens.len() + estimate + suffix.len())
            }
        };
        let first_miss = missed.then(|| hashes.len().saturating_sub(1));
        Ok(BlockWalk { hashes, tokens, first_miss, exact, total_tokens })
    }
}

/// Encodes `text` without a segment cache, appending to `out` (the convenience path).
pub(crate) fn encode_uncached(
    engine: &Engine,
    text: &str,
    scratch: &mut Scratch,
    out: &mut Vec<TokenId>,
) -> Result<(), TokenizeError> {
    encode_pieces(engine, text, scratch, None, usize::MAX, out, &mut |_| true).map(|_| ())
}

/// The encoding loop: `text` split at added tokens, each text segment's ids from the cache or
/// the engine, appended to `tokens`; after each append `check` sees all of `tokens` and may stop
/// the loop. The engine runs `batch` pre-tokens at a time (`usize::MAX`: a segment at once).
fn encode_pieces(
    engine: &Engine,
    text: &str,
    scratch: &mut Scratch,
    mut cache: Option<&mut SegmentCache>,
    batch: usize,
    tokens: &mut Vec<TokenId>,
    check: &mut dyn FnMut(&[TokenId]) -> bool,
) -> Result<Outcome, TokenizeError> {
    // The prior of the pieces so far (see `Outcome::Stopped`); pieces tile the text, so this
    // equals the prior of the text up to here with each added token counted as one.
    let mut exact_prior = 0.0;
    for piece in engine.pieces(text) {
        let (segment, start) = match piece {
            Piece::Added { id, end } => {
                tokens.push(id);
                exact_prior += 1.0;
                if !check(tokens) {
                    return Ok(Outcome::Stopped { rest: end, exact_prior });
                }
                continue;
            }
            Piece::Text { text, start } => (text, start),
        };
        let end = start + segment.len();
        let at_start = start == 0;
        if let Some((ids, prior)) = cache.as_deref_mut().and_then(|c| c.get(segment, at_start)) {
            tokens.extend_from_slice(ids);
            exact_prior += prior;
            if !check(tokens) {
                return Ok(Outcome::Stopped { rest: end, exact_prior });
            }
            continue;
        }
        let from = tokens.len();
        let progress = engine.encode_text(segment, start, batch, scratch, &mut |ids| {
            tokens.extend_from_slice(ids);
            check(tokens)
        })?;
        match progress {
            Progress::Complete => {
                // One vectorised pass over text the model just tokenized (far slower per byte).
                let prior = estimate::prior(segment);
                exact_prior += prior;
                if let Some(cache) = cache.as_deref_mut() {
                    cache.insert(segment, at_start, &tokens[from..], prior);
                }
            }
            Progress::Stopped { consumed } => {
                exact_prior += segment.get(..consumed).map_or(0.0, estimate::prior);
                return Ok(Outcome::Stopped { rest: start + consumed, exact_prior });
            }
        }
    }
    Ok(Outcome::Complete)
}
