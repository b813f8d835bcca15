//! The per-request fast path: an [`Encoder`] holds what one thread (one filter VM) reuses from
//! request to request, so encoding allocates nothing once warm: the engine's working buffers and
//! word cache, the segment cache, and the token and block-hash buffers a [`BlockWalk`] lends out.

use super::cache::{ChainMemo, SegmentCache, SegmentCacheConfig, SegmentCacheStats};
use super::engine::{Engine, Piece, Progress, Scratch};
use super::{TokenizeError, Tokenizer, estimate};
use crate::hash::{BlockHash, BlockHasher, BlockSalt, TokenId};
use crate::template::{ChatLayout, Part};

/// How far [`encode_pieces`] got.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Outcome {
    /// The whole text is encoded; `prior` is its [`estimate::prior`], each added token counted
    /// as one.
    Complete { prior: f32 },
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
    /// How many of the prompt's first tokens were known exactly: the whole prompt when
    /// [`BlockWalk::exact`], else at least every block in `hashes` (encoding stops a few
    /// pre-tokens, or the rest of a cached segment, past the first miss).
    pub exact_tokens: usize,
    /// Index in `hashes` of the first block no worker holds, if there is one.
    pub first_miss: Option<usize>,
    /// Whether `exact_tokens` is the whole prompt.
    pub exact: bool,
    /// The prompt's length in tokens: `exact_tokens` when exact, else those plus an estimate of
    /// the rest from its bytes (error measured in `core/tests/early_exit.rs`).
    pub total_tokens: usize,
}

/// Segments shorter than this many blocks keep no chain memo: hashing their few blocks again
/// costs less than the memo, and short segments (the newline between two turns) recur after
/// every kind of prefix.
const MEMO_MIN_BLOCKS: usize = 2;

/// What [`Walker::push_cached`] did with a segment's chain memo.
enum MemoUse {
    /// Its hashes were taken.
    Replayed,
    /// It did not fit (or there was none); this one does.
    New(ChainMemo),
    /// Neither.
    None,
}

/// A block walk under way: the chained hasher, the ids of the block being filled, the hashes so
/// far, and the predicate that stops it.
struct Walker<'a, H> {
    hasher: BlockHasher,
    /// Ids after the last full block (fewer than a block).
    pending: &'a mut Vec<TokenId>,
    /// The pending ids where the current segment began (a memo's key).
    segment_pending: &'a mut Vec<TokenId>,
    /// The pending ids where the current chunk of a laid-out chat began (its memo's key).
    chunk_pending: &'a mut Vec<TokenId>,
    /// While `recording`, every id fed is also appended here (a chunk's ids, to cache).
    recorded: &'a mut Vec<TokenId>,
    recording: bool,
    hashes: &'a mut Vec<BlockHash>,
    /// Tokens fed so far.
    count: usize,
    missed: bool,
    held: H,
}

impl<H: FnMut(BlockHash) -> bool> Walker<'_, H> {
    /// Feeds ids; `false` once a block is not held (ids after it are counted, not hashed).
    fn push(&mut self, ids: &[TokenId]) -> bool {
        if self.recording {
            self.recorded.extend_from_slice(ids);
        }
        self.count += ids.len();
        if self.missed {
            return false;
        }
        let size = self.hasher.block_size();
        let mut rest = ids;
        if !self.pending.is_empty() {
            let take = (size - self.pending.len()).min(rest.len());
            self.pending.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.pending.len() < size {
                return true;
            }
            let hash = self.hasher.next_block(self.pending);
            self.pending.clear();
            if !self.block(hash) {
                return false;
            }
        }
        let mut blocks = rest.chunks_exact(size);
        for block in &mut blocks {
            let hash = self.hasher.next_block(block);
            if !self.block(hash) {
                return false;
            }
        }
        self.pending.extend_from_slice(blocks.remainder());
        true
    }

    fn block(&mut self, hash: BlockHash) -> bool {
        self.hashes.push(hash);
        self.missed = !(self.held)(hash);
        !self.missed
    }

    /// Feeds a cached segment's ids, from its memo when the memo was made after this very state;
    /// returns whether to go on, and what became of the memo.
    fn push_cached(&mut self, ids: &[TokenId], memo: Option<&ChainMemo>) -> (bool, MemoUse) {
        let size = self.hasher.block_size();
        let fits = memo.filter(|m| m.follows(size, self.hasher.salt(), self.hasher.last(), self.pending));
        let Some(memo) = fits else {
            self.begin_segment();
            let go_on = self.push(ids);
            return (go_on, self.memo(ids.len()).map_or(MemoUse::None, MemoUse::New));
        };
        if self.recording {
            self.recorded.extend_from_slice(ids);
        }
        self.count += ids.len();
        if self.missed {
            return (false, MemoUse::None);
        }
        for &hash in memo.hashes.iter() {
            self.hasher.advance(hash);
            if !self.block(hash) {
                return (false, MemoUse::Replayed);
            }
        }
        // A memo holds at least one block, so the new pending ids all come from this segment.
        let tail = (self.pending.len() + ids.len()) % size;
        self.pending.clear();
        self.pending.extend_from_slice(&ids[ids.len() - tail..]);
        (true, MemoUse::Replayed)
    }

    /// Marks where a segment begins, for [`Walker::memo`].
    fn begin_segment(&mut self) {
        self.segment_pending.clear();
        self.segment_pending.extend_from_slice(self.pending);
    }

    /// Marks where a chunk begins, for [`Walker::chunk_memo`], and records its ids from here on.
    fn begin_chunk(&mut self) {
        self.chunk_pending.clear();
        self.chunk_pending.extend_from_slice(self.pending);
        self.recorded.clear();
        self.recording = true;
    }

    /// The memo of the segment of `len` ids just fed after [`Walker::begin_segment`], if it is
    /// worth keeping: the walk went through it, and it completed enough blocks.
    fn memo(&self, len: usize) -> Option<ChainMemo> {
        self.memo_after(self.segment_pending, len)
    }

    /// [`Walker::memo`] of the chunk recorded since [`Walker::begin_chunk`].
    fn chunk_memo(&self) -> Option<ChainMemo> {
        self.memo_after(self.chunk_pending, self.recorded.len())
    }

    /// The memo of `len` ids just fed after `pending` ids were waiting for a block.
    fn memo_after(&self, pending: &[TokenId], len: usize) -> Option<ChainMemo> {
        let size = self.hasher.block_size();
        let blocks = (pending.len() + len) / size;
        if self.missed || blocks < MEMO_MIN_BLOCKS {
            return None;
        }
        let hashes = &self.hashes[self.hashes.len() - blocks..];
        // Walks start a chain: the block before the segment's first, if any, is in `hashes`.
        let parent = self.hashes.len().checked_sub(blocks + 1).map(|i| self.hashes[i]);
        Some(ChainMemo {
            block_size: size,
            salt: self.hasher.salt(),
            parent,
            pending: pending.into(),
            hashes: hashes.into(),
        })
    }
}

/// Per-thread state for encoding with a segment cache and early exit. Make one per thread (per
/// filter VM) with [`Tokenizer::encoder`] and keep it; it is tied to that tokenizer.
pub struct Encoder {
    tokenizer: Tokenizer,
    scratch: Scratch,
    cache: SegmentCache,
    tokens: Vec<TokenId>,
    /// A segment's ids as the model produces them (a walk's cache miss).
    segment: Vec<TokenId>,
    /// The ids pending where a walk's current segment began.
    memo_key: Vec<TokenId>,
    /// The ids pending where a walk's current chunk began.
    chunk_memo_key: Vec<TokenId>,
    /// A chunk's ids as a walk's cache miss produced them.
    chunk_ids: Vec<TokenId>,
    /// A chunk written out (a walk's cache miss), or the rest of a laid-out chat (early exit).
    text: String,
    /// A chunk's key written out (a walk's cache miss).
    key: String,
    /// Whether a turn token bounds chunks with this tokenizer, by token ([`clean_boundary`]).
    boundaries: Vec<(&'static str, bool)>,
    hashes: Vec<BlockHash>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").field("cache", &self.cache.stats()).finish_non_exhaustive()
    }
}

/// What a block walk reads: text, or a chat laid out in chunks.
#[derive(Clone, Copy)]
enum Source<'s, 'r> {
    Text(&'s str),
    Layout(&'s ChatLayout<'r>),
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
            segment: Vec::new(),
            memo_key: Vec::new(),
            chunk_memo_key: Vec::new(),
            chunk_ids: Vec::new(),
            text: String::new(),
            key: String::new(),
            boundaries: Vec::new(),
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
    /// the rest of the prompt's length from its bytes. With `held` always true it is the whole
    /// prompt's hashes, exactly.
    ///
    /// Cached segments replay the block hashes they completed last time when they follow the same
    /// ids (see the segment cache's chain memo): their ids are neither copied nor hashed again.
    ///
    /// `held` may keep state: to stop where no single worker holds the whole prefix (not merely
    /// the block), narrow a candidate set in it. The returned hashes borrow this encoder's
    /// buffers, reused by the next call.
    pub fn walk_blocks(
        &mut self,
        text: &str,
        add_special_tokens: bool,
        block_size: usize,
        salt: BlockSalt,
        held: impl FnMut(BlockHash) -> bool,
    ) -> Result<BlockWalk<'_>, TokenizeError> {
        self.walk(Source::Text(text), add_special_tokens, block_size, salt, held)
    }

    /// [`Encoder::walk_blocks`] over a chat laid out by a native renderer, without writing it out:
    /// each chunk (a turn) is looked up in the segment cache by its text, read in place, and its
    /// ids and block hashes come from there; only a chunk seen for the first time is written out
    /// and tokenized. The same result as walking [`ChatLayout::text`] (the exact part; where the
    /// walk stops early, it stops at a chunk's end rather than a segment's, so the estimated rest
    /// may differ by the few tokens in between).
    ///
    /// Where the layout's turn token is not an added token that bounds chunks cleanly with this
    /// tokenizer (checked once per token: matched on raw text, stripping nothing around it), the
    /// text is written out and walked as [`Encoder::walk_blocks`] does.
    pub fn walk_layout(
        &mut self,
        layout: &ChatLayout<'_>,
        add_special_tokens: bool,
        block_size: usize,
        salt: BlockSalt,
        held: impl FnMut(BlockHash) -> bool,
    ) -> Result<BlockWalk<'_>, TokenizeError> {
        if !self.chunks_hold(layout.boundary()) {
            let text = layout.text();
            return self.walk(Source::Text(&text), add_special_tokens, block_size, salt, held);
        }
        self.walk(Source::Layout(layout), add_special_tokens, block_size, salt, held)
    }

    /// Whether chunks starting with `boundary` tokenize on their own with this tokenizer.
    fn chunks_hold(&mut self, boundary: &'static str) -> bool {
        if let Some(&(_, clean)) = self.boundaries.iter().find(|(b, _)| *b == boundary) {
            return clean;
        }
        let clean = clean_boundary(&self.tokenizer.inner.engine, boundary, &mut self.scratch);
        self.boundaries.push((boundary, clean));
        clean
    }

    fn walk(
        &mut self,
        source: Source<'_, '_>,
        add_special_tokens: bool,
        block_size: usize,
        salt: BlockSalt,
        held: impl FnMut(BlockHash) -> bool,
    ) -> Result<BlockWalk<'_>, TokenizeError> {
        let Encoder {
            tokenizer,
            scratch,
            cache,
            tokens,
            segment,
            memo_key,
            chunk_memo_key,
            chunk_ids,
            text: chunk_text,
            key: chunk_key,
            hashes,
            ..
        } = self;
        let inner = &*tokenizer.inner;
        tokens.clear();
        hashes.clear();
        let mut walk = Walker {
            hasher: BlockHasher::new(block_size, salt),
            pending: tokens,
            segment_pending: memo_key,
            chunk_pending: chunk_memo_key,
            recorded: chunk_ids,
            recording: false,
            hashes,
            count: 0,
            missed: false,
            held,
        };
        let (prefix, suffix): (&[TokenId], &[TokenId]) =
            if add_special_tokens { (&inner.prompt_prefix, &inner.prompt_suffix) } else { (&[], &[]) };
        // One pre-token gives at least one id, so `block_size` of them complete a block: the
        // model runs at most about a block past the first miss.
        let batch = block_size.max(1);
        // A stopped walk leaves the text it did not read: `text[rest..]`, or for a layout (never
        // written out whole) `chunk_text[rest..]`, where the walk wrote the rest of it.
        let outcome = if !walk.push(prefix) {
            if let Source::Layout(layout) = source {
                chunk_text.clear();
                layout.write(chunk_text);
            }
            Outcome::Stopped { rest: 0, exact_prior: 0.0 }
        } else {
            match source {
                Source::Text(text) => {
                    walk_pieces(&inner.engine, text, true, scratch, cache, true, segment, batch, &mut walk)?
                }
                Source::Layout(layout) => {
                    let buffers = ChunkBuffers { text: chunk_text, key: chunk_key, segment_ids: segment };
                    walk_chunks(&inner.engine, layout, scratch, cache, buffers, batch, &mut walk)?
                }
            }
        };
        let (exact, total_tokens) = match outcome {
            Outcome::Complete { .. } => {
                walk.push(suffix);
                (true, walk.count)
            }
            Outcome::Stopped { rest, exact_prior } => {
                let left = match source {
                    Source::Text(text) => text.get(rest..).unwrap_or(""),
                    Source::Layout(_) => chunk_text.get(rest..).unwrap_or(""),
                };
                if left.is_empty() {
                    // Stopped on the text's last ids: nothing is left to estimate.
                    walk.count += suffix.len();
                    (true, walk.count)
                } else {
                    let text_tokens = walk.count - prefix.len();
                    let estimate = estimate::remaining_tokens(&inner.engine, exact_prior, text_tokens, left);
                    (false, walk.count + estimate + suffix.len())
                }
            }
        };
        let (exact_tokens, missed) = (walk.count, walk.missed);
        let hashes: &[BlockHash] = walk.hashes;
        let first_miss = missed.then(|| hashes.len().saturating_sub(1));
        Ok(BlockWalk { hashes, exact_tokens, first_miss, exact, total_tokens })
    }
}

/// Whether `token` bounds chunks of a laid-out chat cleanly: an added token matched on the raw
/// text (not after normalization) that takes nothing from either side, so that the ids of
/// `a + token + b` are always those of `a`, the token's and those of `b`. Checked on texts that
/// would show a token stripping the whitespace around it (`lstrip`, `rstrip`) or matching only as
/// a single word.
fn clean_boundary(engine: &Engine, token: &str, scratch: &mut Scratch) -> bool {
    let mut pieces = engine.pieces(token);
    let (Some(Piece::Added { id, .. }), None) = (pieces.next(), pieces.next()) else { return false };
    let encode = |text: &str, scratch: &mut Scratch| {
        let mut ids = Vec::new();
        encode_uncached(engine, text, scratch, &mut ids).ok().map(|()| ids)
    };
    [(" \n", "\n "), ("a", "a"), ("\t", "  x")].iter().all(|&(a, b)| {
        let whole = encode(&format!("{a}{token}{b}"), scratch);
        let apart = encode(a, scratch).zip(encode(b, scratch)).map(|(a, b)| [&a[..], &[id], &b[..]].concat());
        whole.is_some() && whole == apart
    })
}

/// Feeds the ids of the cache entry in `slot` to `walk`, replaying its chain memo where it fits
/// and keeping a new one where it does not; `None` if the slot holds nothing (the caller then
/// encodes the text itself), else whether to go on and the entry's prior.
fn feed_cached<H: FnMut(BlockHash) -> bool>(
    cache: &mut SegmentCache,
    slot: u32,
    walk: &mut Walker<'_, H>,
) -> Option<(bool, f32)> {
    let (ids, prior, memo) = cache.entry(slot)?;
    let (go_on, memo) = walk.push_cached(ids, memo);
    match memo {
        MemoUse::Replayed => cache.count_replay(),
        MemoUse::New(memo) => cache.set_memo(slot, memo),
        MemoUse::None => {}
    }
    Some((go_on, prior))
}

/// [`Encoder::walk_blocks`]'s loop: `text` split at added tokens, each text segment's ids from
/// the cache (with its chain memo) or the model, fed to `walk` until it stops. `starts_prompt`
/// says whether `text` opens its prompt (a segment there is cached apart). With
/// `insert` false, segments the model encodes are not cached (they are part of a chunk that is).
#[allow(clippy::too_many_arguments)]
fn walk_pieces<H: FnMut(BlockHash) -> bool>(
    engine: &Engine,
    text: &str,
    starts_prompt: bool,
    scratch: &mut Scratch,
    cache: &mut SegmentCache,
    insert: bool,
    segment_ids: &mut Vec<TokenId>,
    batch: usize,
    walk: &mut Walker<'_, H>,
) -> Result<Outcome, TokenizeError> {
    // As in `encode_pieces`: the prior of the pieces so far, added tokens counted as one.
    let mut exact_prior = 0.0;
    for piece in engine.pieces(text) {
        let (segment, start) = match piece {
            Piece::Added { id, end } => {
                exact_prior += 1.0;
                if !walk.push(&[id]) {
                    return Ok(Outcome::Stopped { rest: end, exact_prior });
                }
                continue;
            }
            Piece::Text { text, start } => (text, start),
        };
        let end = start + segment.len();
        let at_start = starts_prompt && start == 0;
        if let Some(slot) = cache.lookup(segment, at_start)
            && let Some((go_on, prior)) = feed_cached(cache, slot, walk)
        {
            exact_prior += prior;
            if !go_on {
                return Ok(Outcome::Stopped { rest: end, exact_prior });
            }
            continue;
        }
        segment_ids.clear();
        walk.begin_segment();
        let progress = engine.encode_text(segment, start, batch, scratch, &mut |ids| {
            segment_ids.extend_from_slice(ids);
            walk.push(ids)
        })?;
        match progress {
            Progress::Complete => {
                let prior = estimate::prior(segment);
                exact_prior += prior;
                if insert
                    && let Some(slot) = cache.insert(segment, at_start, segment_ids, prior)
                    && let Some(memo) = walk.memo(segment_ids.len())
                {
                    cache.set_memo(slot, memo);
                }
            }
            Progress::Stopped { consumed } => {
                exact_prior += segment.get(..consumed).map_or(0.0, estimate::prior);
                return Ok(Outcome::Stopped { rest: start + consumed, exact_prior });
            }
        }
    }
    Ok(Outcome::Complete { prior: exact_prior })
}

/// The buffers [`walk_chunks`] writes into: a chunk's text and key when it misses the cache (and
/// the text the walk leaves when it stops), and a segment's ids.
struct ChunkBuffers<'b> {
    text: &'b mut String,
    key: &'b mut String,
    segment_ids: &'b mut Vec<TokenId>,
}

/// [`Encoder::walk_layout`]'s loop: each chunk's ids (and, where its chain memo fits, block
/// hashes) from the segment cache, found by the chunk's key read in place; a chunk not there is
/// written out, walked as text, and cached whole under its key. When the walk stops, the text it
/// did not read is `buffers.text[rest..]` (only then is the rest of the chat written out).
fn walk_chunks<H: FnMut(BlockHash) -> bool>(
    engine: &Engine,
    layout: &ChatLayout<'_>,
    scratch: &mut Scratch,
    cache: &mut SegmentCache,
    buffers: ChunkBuffers<'_>,
    batch: usize,
    walk: &mut Walker<'_, H>,
) -> Result<Outcome, TokenizeError> {
    let ChunkBuffers { text, key, segment_ids } = buffers;
    let write_rest = |from: usize, text: &mut String| {
        for chunk in layout.chunks().skip(from) {
            chunk.iter().for_each(|part| text.push_str(part.text()));
        }
    };
    let mut exact_prior = 0.0;
    for (i, parts) in layout.chunks().enumerate() {
        let keys = parts.iter().map(Part::key);
        if let Some(slot) = cache.lookup_chunk(keys.clone())
            && let Some((go_on, prior)) = feed_cached(cache, slot, walk)
        {
            exact_prior += prior;
            if !go_on {
                text.clear();
                write_rest(i + 1, text);
                return Ok(Outcome::Stopped { rest: 0, exact_prior });
            }
            continue;
        }
        text.clear();
        parts.iter().for_each(|part| text.push_str(part.text()));
        walk.begin_chunk();
        let outcome = walk_pieces(engine, text, i == 0, scratch, cache, false, segment_ids, batch, walk);
        walk.recording = false;
        match outcome? {
            Outcome::Complete { prior } => {
                exact_prior += prior;
                key.clear();
                keys.for_each(|k| key.push_str(k));
                if let Some(slot) = cache.insert_chunk(key, walk.recorded, prior)
                    && let Some(memo) = walk.chunk_memo()
                {
                    cache.set_memo(slot, memo);
                }
            }
            Outcome::Stopped { rest, exact_prior: within } => {
                write_rest(i + 1, text);
                return Ok(Outcome::Stopped { rest, exact_prior: exact_prior + within });
            }
        }
    }
    Ok(Outcome::Complete { prior: exact_prior })
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
    Ok(Outcome::Complete { prior: exact_prior })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level BPE whose vocabulary is the 256 byte symbols and nothing else (every text
    /// encodes, one id per byte), with added tokens of every kind of flag.
    fn tokenizer_with_added_tokens() -> Engine {
        // GPT-2's byte-to-symbol map: printable bytes stand for themselves, the rest are shifted.
        let mut vocab = serde_json::Map::new();
        let mut shifted = 0;
        for byte in 0u32..256 {
            let printable = (33..=126).contains(&byte) || (161..=172).contains(&byte) || byte >= 174;
            let symbol = if printable {
                byte
            } else {
                shifted += 1;
                255 + shifted
            };
            let symbol = char::from_u32(symbol).expect("a byte symbol").to_string();
            vocab.insert(symbol, serde_json::Value::from(byte));
        }
        let added = |id: u32, content: &str, lstrip: bool, single_word: bool, normalized: bool| {
            serde_json::json!({"id": id, "content": content, "single_word": single_word, "lstrip": lstrip,
                               "rstrip": false, "normalized": normalized, "special": true})
        };
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [
                added(256, "<turn>", false, false, false),
                added(257, "<lstrip>", true, false, false),
                added(258, "<word>", false, true, false),
                added(259, "<normalized>", false, false, true),
            ],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null, "decoder": null,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": []}
        });
        Engine::from_json(&json.to_string()).expect("the test tokenizer loads")
    }

    #[test]
    fn only_a_plain_added_token_bounds_chunks() {
        let engine = tokenizer_with_added_tokens();
        let mut scratch = engine.scratch();
        assert!(clean_boundary(&engine, "<turn>", &mut scratch));
        // Takes the whitespace before it from the previous chunk.
        assert!(!clean_boundary(&engine, "<lstrip>", &mut scratch));
        // Matched only between non-word characters, which the previous chunk decides.
        assert!(!clean_boundary(&engine, "<word>", &mut scratch));
        // Matched after normalization, inside a text segment that spans the boundary.
        assert!(!clean_boundary(&engine, "<normalized>", &mut scratch));
        // Not an added token at all.
        assert!(!clean_boundary(&engine, "<other>", &mut scratch));
        assert!(!clean_boundary(&engine, "", &mut scratch));
    }
}
