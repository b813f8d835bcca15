//! Seeded prompt text: English-like prose, Rust/Python-like code and Chinese, generated here (nothing
//! copied from elsewhere), the same kinds as kvmesh-core's tokenizer bench. Cheap enough to make a
//! fresh ~4k-token text per request (tens of microseconds), so a "never seen" workload really is.

use std::sync::OnceLock;

/// splitmix64: the same texts for the same seed on every run.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Index into a frequency-ordered list of `ZIPF_RANGE` entries: early entries far more often.
    fn zipf(&mut self) -> usize {
        usize::from(zipf_table()[self.below(ZIPF_TABLE)])
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// Entries of the precomputed Zipf table (a power of two is not needed, only a fixed size).
const ZIPF_TABLE: usize = 8192;
/// The ranks the table draws from: every word list here is at least this long.
const ZIPF_RANGE: usize = 400;

/// Ranks drawn once, Zipf-like (`n^u - 1` for uniform `u`), so a word costs one lookup, not a `powf`.
fn zipf_table() -> &'static [u16] {
    static TABLE: OnceLock<Vec<u16>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut rng = Rng(0x7a69_7066);
        (0..ZIPF_TABLE)
            .map(|_| {
                let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                (((ZIPF_RANGE as f64).powf(u) - 1.0) as usize % ZIPF_RANGE) as u16
            })
            .collect()
    })
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
存处需界难持压志越积效信展术准验选单再际非土斯值示满群划族验号持压严告照安段商价克县毛世维技界达治白标德声增完层";

fn english_words() -> &'static [&'static str] {
    static WORDS: OnceLock<Vec<&'static str>> = OnceLock::new();
    WORDS.get_or_init(|| ENGLISH.split_whitespace().collect())
}

fn hanzi() -> &'static [char] {
    static CHARS: OnceLock<Vec<char>> = OnceLock::new();
    CHARS.get_or_init(|| HANZI.chars().filter(|c| !c.is_whitespace()).collect())
}

/// The kinds of text a prompt is made of.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TextKind {
    /// English-like prose.
    Prose,
    /// Rust- and Python-like code.
    Code,
    /// Chinese.
    Cjk,
}

impl TextKind {
    /// About `bytes` bytes of this kind of text from `rng` (it stops at the first sentence or item
    /// past `bytes`).
    pub fn generate(self, rng: &mut Rng, bytes: usize) -> String {
        match self {
            TextKind::Prose => prose(rng, bytes),
            TextKind::Code => code(rng, bytes),
            TextKind::Cjk => chinese(rng, bytes),
        }
    }

    /// The name used in workload names.
    pub fn name(self) -> &'static str {
        match self {
            TextKind::Prose => "prose",
            TextKind::Code => "code",
            TextKind::Cjk => "cjk",
        }
    }
}

fn capitalized(s: &mut String, word: &str) {
    let mut cs = word.chars();
    if let Some(c) = cs.next() {
        s.extend(c.to_uppercase());
        s.push_str(cs.as_str());
    }
}

fn prose(rng: &mut Rng, bytes: usize) -> String {
    let words = english_words();
    let mut s = String::with_capacity(bytes + 200);
    while s.len() < bytes {
        let n = 6 + rng.below(18);
        for i in 0..n {
            let w = words[rng.zipf() % words.len()];
            if i == 0 {
                capitalized(&mut s, w);
            } else {
                s.push(' ');
                s.push_str(w);
            }
            match rng.below(40) {
                0 | 1 => s.push(','),
                2 => {
                    s.push(' ');
                    s.push_str(&rng.below(2000).to_string());
                }
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
            capitalized(&mut s, p);
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
                h = rng.next_u64() >> 40
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
    let chars = hanzi();
    let mut s = String::with_capacity(bytes + 100);
    while s.len() < bytes {
        for _ in 0..8 + rng.below(24) {
            s.push(chars[rng.zipf() % chars.len()]);
            if rng.below(12) == 0 {
                s.push('，');
            }
        }
        s.push_str(rng.pick(&["。", "。", "？", "！", "。\n\n", "；"]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_text_other_seed_other_text() {
        for kind in [TextKind::Prose, TextKind::Code, TextKind::Cjk] {
            let a = kind.generate(&mut Rng::new(7), 2_000);
            assert_eq!(a, kind.generate(&mut Rng::new(7), 2_000));
            assert_ne!(a, kind.generate(&mut Rng::new(8), 2_000));
            assert!(a.len() >= 2_000 && a.len() < 3_000, "{kind:?}: {} bytes", a.len());
        }
    }
}
