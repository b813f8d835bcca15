//! Tokenization cost natively, ours (`kvmesh_core::tokenize`, HF `tokenizers` 1.0 with our segment
//! cache and early exit) against `tokenizers` 0.23 (what vLLM and other routers run), Qwen3
//! tokenizer, per ~4k-token prompt of prose, code and CJK:
//! - cold: the text never seen. Every iteration gets a fresh `Encoder` (empty segment cache and
//!   empty word cache) or, for 0.23, a cleared BPE cache; the set-up is not timed;
//! - warm: the same prompt again (ours: a segment-cache hit; "words" disables the segment cache so
//!   only the engine's word cache is warm; 0.23: its BPE cache warm);
//! - early exit: the fleet holds the prompt's first 1,024 tokens (64 blocks of 16), the tokenizer
//!   has seen none of it (cold); ours stops after the first block nobody holds and estimates the
//!   rest, 0.23 has to encode and hash it all;
//! - chat: a warm ~4k-token, 5-message chat, rendered with Qwen3's template (natively, as the
//!   router does for a known template, both sides; minijinja alone in `chat/render-only/minijinja`),
//!   tokenized and hashed;
//! - load: `Tokenizer::from_files` on the `tokenizer.json` HuggingFace ships, and on its canonical
//!   form, against 0.23's `from_str`; and the engine's JSON parse alone, the most a pre-built
//!   binary form could save (the rest is the engine building its BPE tables).
//!
//! The texts are generated here (seeded; nothing copied from elsewhere): English-like prose from a
//! few hundred words, Rust/Python-like code with generated identifiers, Chinese from about 500
//! common characters.
//!
//! Run: `cargo bench -p kvmesh-core --bench tokenize` (tokenizer files from `make setup`, in
//! `$KVMESH_TOKENIZERS`, default `/root/.cache/kvmesh/tokenizers`).

use std::collections::HashSet;
use std::hint::black_box;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use kvmesh_core::hash::hash_prompt;
use kvmesh_core::request::{Endpoint, InferenceRequest, RequestLimits, parse_request};
use kvmesh_core::template::RenderOptions;
use kvmesh_core::tokenize::{SegmentCacheConfig, canonicalize};
use kvmesh_core::{BlockHash, BlockSalt, Tokenizer, TokenizerFiles};

const BLOCK: usize = 16;
/// Tokens of each prompt that the fleet holds in the early-exit case.
const HELD_TOKENS: usize = 1024;
/// Approximate prompt length in tokens.
const PROMPT_TOKENS: usize = 4096;

/// splitmix64: the same texts on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Index into a list ordered by frequency, Zipf-like: early entries far more often.
    fn zipf(&mut self, n: usize) -> usize {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((n as f64).powf(u) - 1.0) as usize % n
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const ENGLISH: &str = "the of and to a in is that for it as was with be by on not he this are or his from at \
which but have an they you were her she there been one all we their has would when if so no will more can \
who out some them other than into its only time could new these two may first then do any like my now over \
such our man me even most made after also did many before must through back years where much your way well \
down should because each just those people how too little state good very make world still own see men work \
long get here between both life being under never day same another know while last might us great old year \
off come since against go came right used take three states himself few house use during without again place \
american around however home small found thought went say part once general high upon school every does got \
united left number course war until always away something fact though water less public put think almost hand \
enough far took head yet government system better set told nothing night end why called didn't eyes find going \
look asked later knew point next program city business give group toward young days let room president side \
social given present several order national possible rather second face per among form important often things \
looked early white case john become large big need four within felt along children saw best church ever least \
power development light thing seemed family interest want members mind country area others done turned although \
open god service problem certain kind different thus began door help sense means whole matter perhaps itself \
york it's times law human line above name example action company hands local show whether five history gave \
today either act feet across taken past quite anything seen having death week experience body word half really \
field am car words already themselves i'm information tell together college shall money period held keep sure \
probably free seems political real behind cannot miss question air office making brought whose special major \
heard problems federal became study ago moment available known result street economic boy position reason change \
south board individual job areas society west close turn love community true court force full seem am policy \
router cache block worker prefix token engine request latency throughput memory kernel";

const IDENT: &[&str] = &[
    "block", "worker", "prefix", "cache", "request", "token", "score", "fleet", "event", "queue", "config",
    "buffer", "stream", "index", "hash", "route", "load", "store", "evict", "policy", "engine", "model",
    "prompt", "batch", "slot", "entry", "table", "node", "edge", "metric", "span", "state", "limit", "count",
    "total", "bytes", "offset", "len", "id", "key", "value", "parent", "child", "head", "tail", "next",
];

/// About 500 frequent Chinese characters, most frequent first.
const HANZI: &str = "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生自会那后能对着事其里所去\
行过家十用发天如然作方成者多日都三小军二无同么经法当起与好看学进种将还分此心前面又定见只主没公从知使手已正长实动样\
本老体意开高理明日全问已新力外气情两点政关三头内相机合向因表期开东西把程民性先重回利总从部少立最常心点电变二美向\
又位度品将机各平重制已线路即解系与被其战果教走更接计比候业数报数门长入全几常问被活军位特写南通意如何代因山理把目\
次干些加最处队北商产结员光风命管影物米工社海较利做带区感件调质通受识百服达号满收器集住统号先设转节争放石院原形金\
认义运提议传克必条直科需论场证组织专走即王委题化思半给思亲整断完林运消联花决空象复车元音参权件口话切清提资确研究\
马支青革构半包计今便精近交领张条权任决求改观往保却传况指接口往区深写许由取存论边场拉流吗每听今调油记任反必果况设\
存处需界难持压志越积效信展术准验选单再际非土斯值示满群划族验号持压严告照安段商价克县毛世维技界达治白标德声增完层\
";

fn prose(rng: &mut Rng, bytes: usize) -> String {
    let words: Vec<&str> = ENGLISH.split_whitespace().collect();
    let mut s = String::with_capacity(bytes + 200);
    while s.len() < bytes {
        let n = 6 + rng.below(18);
        for i in 0..n {
            let w = words[rng.zipf(words.len())];
            if i == 0 {
                let mut cs = w.chars();
                if let Some(c) = cs.next() {
                    s.extend(c.to_uppercase());
                    s.push_str(cs.as_str());
                }
            } else {
                s.push(' ');
                s.push_str(w);
            }
            match rng.below(40) {
                0 | 1 => s.push(','),
                2 => s.push_str(&format!(" {}", rng.below(2000))),
                3 => s.push_str(" (see below)"),
                _ => {}
            }
        }
        s.push_str(rng.pick(&[". ", ". ", ". ", "? ", "! ", ".\n\n", "; "]));
    }
    s
}

fn ident(rng: &mut Rng, camel: bool) -> String {
    let parts = 1 + rng.below(3);
    let mut s = String::new();
    for i in 0..parts {
        let p = rng.pick(IDENT);
        if camel {
            let mut cs = p.chars();
            if let Some(c) = cs.next() {
                s.extend(c.to_uppercase());
                s.push_str(cs.as_str());
            }
        } else {
            if i > 0 {
                s.push('_');
            }
            s.push_str(p);
        }
    }
    s
}

fn code(rng: &mut Rng, bytes: usize) -> String {
    let mut s = String::with_capacity(bytes + 400);
    while s.len() < bytes {
        let (f, t, a, b) = (ident(rng, false), ident(rng, true), ident(rng, false), ident(rng, false));
        if rng.below(2) == 0 {
            s.push_str(&format!(
                "/// Returns the {a} of a {t}, or `None` when it has no {b}.\n\
                 pub fn {f}(&self, {a}: &{t}, {b}: usize) -> Option<u64> {{\n\
                 \x20   let mut total = 0u64;\n\
                 \x20   for (i, item) in self.{a}s.iter().enumerate().take({b}) {{\n\
                 \x20       if item.{b} > {n} {{\n\
                 \x20           total += item.{a} as u64 * {m};\n\
                 \x20       }}\n\
                 \x20   }}\n\
                 \x20   (total > 0).then_some(total ^ 0x{h:x})\n\
                 }}\n\n",
                n = rng.below(1000),
                m = rng.below(64),
                h = rng.next() >> 40
            ));
        } else {
            s.push_str(&format!(
                "class {t}:\n\
                 \x20   \"\"\"Keeps the {a} for each {b}.\"\"\"\n\n\
                 \x20   def {f}(self, {a}, {b}={n}):\n\
                 \x20       if not {a}:\n\
                 \x20           raise ValueError(f\"no {a} for {{{b}!r}}\")\n\
                 \x20       return [x.{b} for x in {a} if x.{b} >= {m}]\n\n",
                n = rng.below(100),
                m = rng.below(10),
            ));
        }
    }
    s
}

fn chinese(rng: &mut Rng, bytes: usize) -> String {
    let chars: Vec<char> = HANZI.chars().filter(|c| !c.is_whitespace()).collect();
    let mut s = String::with_capacity(bytes + 100);
    while s.len() < bytes {
        for _ in 0..8 + rng.below(24) {
            s.push(chars[rng.zipf(chars.len())]);
            if rng.below(12) == 0 {
                s.push('，');
            }
        }
        s.push_str(rng.pick(&["。", "。", "？", "！", "。\n\n", "；"]));
    }
    s
}

/// Cut (or grow) `text` to about `tokens` tokens of `tokenizer`.
fn sized(tokenizer: &Tokenizer, make: &mut dyn FnMut(usize) -> String, tokens: usize) -> String {
    let mut bytes = tokens * 4;
    loop {
        let text = make(bytes);
        let n = tokenizer.encode(&text).expect("encodes").len();
        if n.abs_diff(tokens) * 50 < tokens {
            return text;
        }
        bytes = bytes * tokens / n.max(1);
    }
}

fn tokenizer_dir() -> PathBuf {
    std::env::var_os("KVMESH_TOKENIZERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root/.cache/kvmesh/tokenizers"))
        .join("qwen3")
}

fn read(file: &str) -> String {
    let path = tokenizer_dir().join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}; run `make setup`", path.display()))
}

fn load(json: &str, config: &str) -> Tokenizer {
    Tokenizer::from_files(TokenizerFiles {
        tokenizer_json: json,
        tokenizer_config_json: Some(config),
        chat_template_jinja: None,
    })
    .expect("loads")
}

fn clear_reference_cache(reference: &tokenizers_ref::Tokenizer) {
    if let tokenizers_ref::ModelWrapper::BPE(bpe) = reference.get_model() {
        bpe.clear_cache();
    }
}

fn reference_ids(reference: &tokenizers_ref::Tokenizer, text: &str) -> Vec<u32> {
    reference.encode(text, false).expect("0.23 encodes").get_ids().to_vec()
}

fn bench_tokenize(c: &mut Criterion) {
    let (json, config) = (read("tokenizer.json"), read("tokenizer_config.json"));
    let ours = load(&json, &config);
    let reference = tokenizers_ref::Tokenizer::from_str(&json).expect("0.23 loads");
    let mut rng = Rng(0x6b76_6d65_7368_000b);
    let texts = [
        ("prose", sized(&ours, &mut |n| prose(&mut Rng(1), n), PROMPT_TOKENS)),
        ("code", sized(&ours, &mut |n| code(&mut Rng(2), n), PROMPT_TOKENS)),
        ("cjk", sized(&ours, &mut |n| chinese(&mut Rng(3), n), PROMPT_TOKENS)),
    ];

    let mut group = c.benchmark_group("tokenize");
    group.sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    for (name, text) in &texts {
        let truth = ours.encode(text).expect("encodes");
        assert_eq!(truth, reference_ids(&reference, text), "{name}: ids differ from 0.23");
        eprintln!("{name}: {} bytes, {} tokens", text.len(), truth.len());
        let mut hashes = Vec::new();
        hash_prompt(&truth, BLOCK, BlockSalt::NONE, &mut hashes);
        let held: HashSet<BlockHash> = hashes.iter().take(HELD_TOKENS / BLOCK).copied().collect();

        group.bench_function(format!("{name}/cold/ours"), |b| {
            let mut out = Vec::with_capacity(truth.len());
            b.iter_batched_ref(
                || ours.encoder(SegmentCacheConfig::default()),
                |encoder| {
                    out.clear();
                    encoder.encode_into(black_box(text), false, &mut out).expect("encodes");
                    black_box(out.len())
                },
                BatchSize::SmallInput,
            );
        });
        group.bench_function(format!("{name}/cold/0.23"), |b| {
            b.iter_batched(
                || clear_reference_cache(&reference),
                |()| black_box(reference.encode(black_box(text.as_str()), false).expect("encodes").len()),
                BatchSize::SmallInput,
            );
        });
        let mut warm = ours.encoder(SegmentCacheConfig::default());
        let mut words_only = ours.encoder(SegmentCacheConfig::DISABLED);
        let mut out = Vec::with_capacity(truth.len());
        group.bench_function(format!("{name}/warm/ours"), |b| {
            b.iter(|| {
                out.clear();
                warm.encode_into(black_box(text), false, &mut out).expect("encodes");
                black_box(out.len())
            });
        });
        group.bench_function(format!("{name}/warm-words-only/ours"), |b| {
            b.iter(|| {
                out.clear();
                words_only.encode_into(black_box(text), false, &mut out).expect("encodes");
                black_box(out.len())
            });
        });
        group.bench_function(format!("{name}/warm/0.23"), |b| {
            b.iter(|| black_box(reference.encode(black_box(text.as_str()), false).expect("encodes").len()));
        });

        // Early exit: ours walks to the first block nobody holds; 0.23 must encode and hash all.
        let mut walked = 0;
        group.bench_function(format!("{name}/early-exit/ours"), |b| {
            b.iter_batched_ref(
                || ours.encoder(SegmentCacheConfig::default()),
                |encoder| {
                    let walk = encoder
                        .walk_blocks(black_box(text), false, BLOCK, BlockSalt::NONE, |h| held.contains(&h))
                        .expect("walks");
                    walked = walk.exact_tokens;
                    black_box(walk.total_tokens)
                },
                BatchSize::SmallInput,
            );
        });
        eprintln!("{name}: early exit encoded {walked} of {} tokens", truth.len());
        group.bench_function(format!("{name}/early-exit/0.23"), |b| {
            let mut hashes = Vec::new();
            b.iter_batched(
                || clear_reference_cache(&reference),
                |()| {
                    let encoding = reference.encode(black_box(text.as_str()), false).expect("encodes");
                    hashes.clear();
                    hash_prompt(encoding.get_ids(), BLOCK, BlockSalt::NONE, &mut hashes);
                    let first_miss = hashes.iter().position(|h| !held.contains(h));
                    black_box((first_miss, encoding.len()))
                },
                BatchSize::SmallInput,
            );
        });
    }

    // A warm chat: system prompt, then user / assistant turns, ~4k tokens in all.
    let turns = [
        ("system", prose(&mut rng, 4_000)),
        ("user", code(&mut rng, 3_000)),
        ("assistant", prose(&mut rng, 3_000)),
        ("user", chinese(&mut rng, 3_000)),
        ("assistant", prose(&mut rng, 2_500)),
    ];
    let messages: Vec<String> = turns
        .iter()
        .map(|(role, content)| {
            format!(
                r#"{{"role": "{role}", "content": {}}}"#,
                serde_json::to_string(content).expect("a string")
            )
        })
        .collect();
    let body = format!(r#"{{"model": "qwen3", "messages": [{}]}}"#, messages.join(", "));
    let request = match parse_request(Endpoint::ChatCompletions, body.as_bytes(), &RequestLimits::default()) {
        Ok(InferenceRequest::Chat(request)) => request,
        other => panic!("not a chat request: {other:?}"),
    };
    let template = ours.chat_template(None, false).expect("Qwen3 has a template");
    let options = RenderOptions::default();
    let rendered = template.render(&request, &options).expect("renders");
    let chat_tokens = ours.encode(&rendered).expect("encodes").len();
    eprintln!("chat: {} messages, {} bytes rendered, {chat_tokens} tokens", turns.len(), rendered.len());
    let mut encoder = ours.encoder(SegmentCacheConfig::default());
    group.bench_function("chat/render+tokenize+hash/ours", |b| {
        b.iter(|| {
            let text = template.render(black_box(&request), &options).expect("renders");
            let walk = encoder.walk_blocks(&text, false, BLOCK, BlockSalt::NONE, |_| true).expect("walks");
            black_box(walk.hashes.len())
        });
    });
    group.bench_function("chat/render+tokenize+hash/0.23", |b| {
        let mut hashes = Vec::new();
        b.iter(|| {
            let text = template.render(black_box(&request), &options).expect("renders");
            let encoding = reference.encode(text.as_str(), false).expect("encodes");
            hashes.clear();
            hash_prompt(encoding.get_ids(), BLOCK, BlockSalt::NONE, &mut hashes);
            black_box(hashes.len())
        });
    });
    group.bench_function("chat/tokenize+hash/ours", |b| {
        b.iter(|| {
            let walk = encoder
                .walk_blocks(black_box(&rendered), false, BLOCK, BlockSalt::NONE, |_| true)
                .expect("walks");
            black_box(walk.hashes.len())
        });
    });
    let chat_ids = ours.encode(&rendered).expect("encodes");
    group.bench_function("chat/hash-only", |b| {
        let mut hashes = Vec::new();
        b.iter(|| {
            hashes.clear();
            hash_prompt(black_box(&chat_ids), BLOCK, BlockSalt::NONE, &mut hashes);
            black_box(hashes.len())
        });
    });
    group.bench_function("chat/render-only", |b| {
        b.iter(|| black_box(template.render(black_box(&request), &options).expect("renders").len()));
    });
    // The same render through minijinja: what every template without a native renderer costs.
    group.bench_function("chat/render-only/minijinja", |b| {
        b.iter(|| {
            black_box(template.render_interpreted(black_box(&request), &options).expect("renders").len())
        });
    });
    group.finish();

    let canonical = canonicalize(&json).expect("converts");
    eprintln!("tokenizer.json: {} bytes as shipped, {} bytes canonical", json.len(), canonical.len());
    let mut group = c.benchmark_group("load");
    group.sample_size(10).measurement_time(Duration::from_secs(8)).warm_up_time(Duration::from_secs(1));
    group.bench_function("qwen3/hf-json/ours", |b| b.iter(|| black_box(load(&json, &config))));
    group.bench_function("qwen3/canonical-json/ours", |b| b.iter(|| black_box(load(&canonical, &config))));
    // How much of that a format without JSON could save: the engine's reader only parsing.
    group.bench_function("qwen3/canonical-json/parse-only", |b| {
        b.iter(|| black_box(tokenizers::json::Json::parse(&canonical).is_ok()))
    });
    group.bench_function("qwen3/hf-json/0.23", |b| {
        b.iter(|| black_box(tokenizers_ref::Tokenizer::from_str(&json).expect("loads")))
    });
    group.finish();
}

criterion_group!(benches, bench_tokenize);
criterion_main!(benches);
