//! Deterministic, varied text for tokenizer tests and benchmarks: prose in many scripts, code,
//! whitespace, numbers, punctuation, emoji, combining marks, special-token strings and rendered
//! chats. Every sentence here was written for this file; nothing is copied from elsewhere.

#![allow(dead_code)]

/// Small, fast, seedable generator (splitmix64): the same seed gives the same corpus everywhere.
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// Next 64 random bits.
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

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// One element of a non-empty slice.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: usize, den: usize) -> bool {
        self.below(den) < num
    }
}

/// Words per script; sentences are assembled from them.
pub const SCRIPTS: &[(&str, &[&str], &str)] = &[
    (
        "english",
        &[
            "the",
            "router",
            "keeps",
            "a",
            "map",
            "of",
            "every",
            "cached",
            "block",
            "and",
            "sends",
            "each",
            "request",
            "where",
            "its",
            "prefix",
            "already",
            "lives",
            "quickly",
            "Tuesday",
            "weather",
            "couldn't",
            "we'll",
            "they're",
            "I'm",
            "it's",
            "you've",
            "HE'D",
            "Ünïcödé",
            "naïve",
            "café",
            "co-operate",
            "e-mail",
            "U.S.A.",
            "Dr.",
            "well-known",
            "state-of-the-art",
        ],
        ".",
    ),
    (
        "french",
        &[
            "le",
            "routeur",
            "garde",
            "une",
            "carte",
            "des",
            "blocs",
            "déjà",
            "calculés",
            "où",
            "chaque",
            "requête",
            "trouve",
            "préfixe",
            "c'est",
            "l'été",
            "aujourd'hui",
            "œuvre",
            "Ça",
            "être",
            "français",
            "très",
            "naïveté",
        ],
        ".",
    ),
    (
        "german",
        &[
            "der",
            "Router",
            "behält",
            "eine",
            "Übersicht",
            "über",
            "alle",
            "zwischengespeicherten",
            "Blöcke",
            "und",
            "schickt",
            "jede",
            "Anfrage",
            "dorthin",
            "Straße",
            "größer",
            "Äpfel",
            "Öl",
            "Donaudampfschifffahrtsgesellschaft",
        ],
        ".",
    ),
    (
        "spanish",
        &[
            "el",
            "enrutador",
            "guarda",
            "un",
            "mapa",
            "de",
            "bloques",
            "y",
            "envía",
            "cada",
            "petición",
            "adónde",
            "señor",
            "¿qué",
            "pasó?",
            "¡hola!",
            "niño",
            "corazón",
        ],
        ".",
    ),
    (
        "vietnamese",
        &[
            "bộ", "định", "tuyến", "giữ", "một", "bản", "đồ", "các", "khối", "đã", "lưu", "và", "gửi", "mỗi",
            "yêu", "cầu", "đến", "nơi", "tiếng", "Việt", "người", "những",
        ],
        ".",
    ),
    (
        "polish",
        &[
            "router",
            "przechowuje",
            "mapę",
            "wszystkich",
            "bloków",
            "żółć",
            "gęślą",
            "jaźń",
            "źdźbło",
            "łódź",
            "się",
            "że",
        ],
        ".",
    ),
    (
        "russian",
        &[
            "маршрутизатор",
            "хранит",
            "карту",
            "всех",
            "блоков",
            "и",
            "отправляет",
            "каждый",
            "запрос",
            "туда",
            "где",
            "уже",
            "лежит",
            "его",
            "префикс",
            "съешь",
            "ещё",
            "этих",
            "мягких",
            "французских",
            "булок",
            "Ёлка",
        ],
        ".",
    ),
    (
        "ukrainian",
        &["маршрутизатор", "зберігає", "мапу", "усіх", "блоків", "ґанок", "їжак", "євро", "пʼять", "з’їсти"],
        ".",
    ),
    (
        "greek",
        &[
            "ο",
            "δρομολογητής",
            "κρατά",
            "έναν",
            "χάρτη",
            "όλων",
            "των",
            "μπλοκ",
            "και",
            "στέλνει",
            "κάθε",
            "αίτημα",
            "ΐ",
            "ΰ",
            "ψυχή",
            "Ἀθῆναι",
            "ἔστιν",
        ],
        ";",
    ),
    (
        "arabic",
        &[
            "يحتفظ",
            "الموجه",
            "بخريطة",
            "لكل",
            "الكتل",
            "المخزنة",
            "ويرسل",
            "كل",
            "طلب",
            "إلى",
            "حيث",
            "توجد",
            "بادئته",
            "مُحَمَّد",
            "الْعَرَبِيَّة",
            "لا",
            "ﻻ",
            "ﷺ",
        ],
        "،",
    ),
    (
        "hebrew",
        &[
            "הנתב",
            "שומר",
            "מפה",
            "של",
            "כל",
            "הבלוקים",
            "ושולח",
            "כל",
            "בקשה",
            "לאן",
            "שהקידומת",
            "שלה",
            "כְּבָר",
            "נִמְצֵאת",
            "שָׁלוֹם",
            "וּ",
        ],
        ".",
    ),
    (
        "hindi",
        &[
            "राउटर",
            "हर",
            "कैश",
            "किए",
            "गए",
            "ब्लॉक",
            "का",
            "नक्शा",
            "रखता",
            "है",
            "और",
            "हर",
            "अनुरोध",
            "को",
            "वहाँ",
            "भेजता",
            "जहाँ",
            "क़लम",
            "ज़िंदगी",
            "फ़ोन",
            "क्षत्रिय",
            "श्री",
        ],
        "।",
    ),
    (
        "thai",
        &[
            "เราเตอร์",
            "เก็บ",
            "แผนที่",
            "ของ",
            "บล็อก",
            "ทั้งหมด",
            "และ",
            "ส่ง",
            "คำขอ",
            "แต่ละ",
            "รายการ",
            "ไปยัง",
            "ที่",
            "มี",
            "คำนำหน้า",
            "อยู่แล้ว",
            "ภาษาไทย",
            "น้ำ",
            "ผู้ใหญ่",
        ],
        " ",
    ),
    (
        "chinese",
        &[
            "路由器",
            "保存",
            "每个",
            "已缓存",
            "块",
            "的",
            "映射",
            "并",
            "把",
            "每个",
            "请求",
            "发送",
            "到",
            "它的",
            "前缀",
            "所在",
            "地方",
            "繁體中文",
            "測試",
            "龍",
            "𠀀",
            "𪚥",
        ],
        "。",
    ),
    (
        "japanese",
        &[
            "ルーター",
            "は",
            "キャッシュ",
            "された",
            "ブロック",
            "の",
            "地図",
            "を",
            "持ち",
            "各",
            "リクエスト",
            "を",
            "送ります",
            "ひらがな",
            "カタカナ",
            "ｶﾀｶﾅ",
            "漢字",
            "ガ",
            "パ",
        ],
        "。",
    ),
    (
        "korean",
        &[
            "라우터는",
            "캐시된",
            "모든",
            "블록의",
            "지도를",
            "유지하고",
            "각",
            "요청을",
            "접두사가",
            "있는",
            "곳으로",
            "보냅니다",
            "한국어",
            "똠방각하",
            "읽다",
        ],
        ".",
    ),
];

/// Code lines in several languages; snippets are runs of them with their indentation.
pub const CODE: &[&[&str]] = &[
    &[
        "fn main() {",
        "    let mut total: u64 = 0;",
        "    for i in 0..1024 {",
        "        total += i * 2;",
        "    }",
        "    println!(\"{total:#x}\");",
        "}",
        "impl<'a> Iterator for Blocks<'a> {",
        "    type Item = &'a [u32];",
        "    fn next(&mut self) -> Option<Self::Item> { self.inner.next() }",
        "}",
    ],
    &[
        "def route(request, workers):",
        "    \"\"\"Pick the worker with the longest cached prefix.\"\"\"",
        "    best = max(workers, key=lambda w: w.overlap(request))",
        "    if best is None:",
        "        raise ValueError(f'no worker for {request!r}')",
        "    return best  # noqa: E501",
        "class Index(dict):",
        "\tdef __init__(self, *args, **kwargs):",
        "\t\tsuper().__init__(*args, **kwargs)",
    ],
    &[
        "const hashes = blocks.map((b, i) => hash(b, i));",
        "if (hashes.length === 0 && !force) {",
        "  return null;",
        "} else if (x !== undefined) {",
        "  console.log(`got ${hashes.length} blocks`);",
        "}",
        "export default async function* stream() { yield* [1, 2, 3]; }",
    ],
    &[
        "#include <stdio.h>",
        "int main(int argc, char **argv) {",
        "    unsigned long h = 5381;",
        "    while (*argv[1]) h = ((h << 5) + h) ^ *argv[1]++;",
        "    printf(\"%lu\\n\", h);",
        "    return 0;",
        "}",
    ],
    &[
        "package main",
        "import \"fmt\"",
        "func main() {",
        "\tm := map[string]int{\"a\": 1, \"b\": 2}",
        "\tfor k, v := range m {",
        "\t\tfmt.Printf(\"%s=%d\\n\", k, v)",
        "\t}",
        "}",
    ],
    &[
        "SELECT w.id, COUNT(*) AS blocks",
        "FROM workers w JOIN blocks b ON b.worker_id = w.id",
        "WHERE b.created_at > NOW() - INTERVAL '5 minutes'",
        "GROUP BY w.id HAVING COUNT(*) >= 16;",
    ],
    &[
        "<!DOCTYPE html>",
        "<html lang=\"en\">",
        "  <body class=\"main\">",
        "    <p>Hello &amp; welcome&nbsp;!</p>",
        "    <br/>",
        "  </body>",
        "</html>",
    ],
    &[
        "{",
        "  \"model\": \"qwen3\",",
        "  \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}],",
        "  \"temperature\": 0.7,",
        "  \"stop\": [\"\\n\\n\", \"</s>\"]",
        "}",
    ],
    &[
        "#!/usr/bin/env bash",
        "set -euo pipefail",
        "for f in ./*.json; do",
        "  jq -r '.id' \"$f\" | sort -u >> ids.txt",
        "done",
        "echo \"${#files[@]} files\" 2>&1 | tee -a log",
    ],
    &[
        "apiVersion: apps/v1",
        "kind: Deployment",
        "metadata:",
        "  name: kvmesh",
        "spec:",
        "  replicas: 3",
        "  template:",
        "    spec:",
        "      containers:",
        "        - name: envoy",
        "          image: envoy:v1.40",
    ],
];

/// Whitespace of every kind the pre-tokenizers treat specially.
pub const WHITESPACE: &[&str] = &[
    " ",
    "  ",
    "   ",
    "\t",
    "\t\t",
    "\n",
    "\n\n",
    "\r\n",
    "\r",
    "\r\n\r\n",
    " \n",
    "\n ",
    " \t\n",
    "\u{a0}",
    "\u{3000}",
    "\u{2009}",
    "\u{200b}",
    "\u{feff}",
    "\u{0b}",
    "\u{0c}",
    "\u{85}",
    "\u{2028}",
    "\u{2029}",
    "\u{202f}",
    "\u{1680}",
    "    \n    ",
    "\n\n\n\n",
    "        ",
];

/// Punctuation, including the contractions the GPT-style split patterns single out.
pub const PUNCT: &[&str] = &[
    "!", "?", "...", "…", ",", ";", ":", "-", "--", "—", "–", "(", ")", "[", "]", "{", "}", "<", ">", "/",
    "\\", "|", "@", "#", "$", "%", "^", "&", "*", "_", "=", "+", "~", "`", "\"", "'", "'s", "'t", "'re",
    "'ve", "'m", "'ll", "'d", "'S", "'LL", "'Re", "’s", "“", "”", "‘", "’", "«", "»", "¿", "¡", "§", "¶",
    "•", "·", "→", "⇒", "∀", "∑", "≠", "≤", "±", "×", "÷", "°", "€", "£", "¥", "₹", "™", "©", "®", "!!!",
    "?!", ":)", ";-)", "<3", "==>", "!=", "&&", "||", "::", "->", "=>", "...\n",
];

/// Emoji: plain, skin tones, ZWJ sequences, flags, keycaps, tag sequences, variation selectors.
pub const EMOJI: &[&str] = &[
    "😀",
    "🚀",
    "👍",
    "👍🏽",
    "👩‍💻",
    "👩🏾‍💻",
    "👨‍👩‍👧‍👦",
    "🏳️‍🌈",
    "🏴‍☠️",
    "❤️",
    "❤",
    "🇺🇸",
    "🇯🇵",
    "🇩🇪🇫🇷",
    "🇺",
    "🏴󠁧󠁢󠁳󠁣󠁴󠁿",
    "1️⃣",
    "#️⃣",
    "☺️",
    "🤷‍♀️",
    "🧑🏻‍🤝‍🧑🏿",
    "🫠",
    "🪿",
    "🥲",
    "👁️‍🗨️",
    "✍🏼",
    "🐈‍⬛",
    "⚡",
    "☕",
    "🔥🔥🔥",
    "😂😂",
];

/// Composed and decomposed forms, compatibility characters and combining sequences: what NFC moves.
pub const NORMALIZATION: &[&str] = &[
    "é",
    "e\u{301}",
    "É",
    "E\u{301}",
    "ñ",
    "n\u{303}",
    "ü",
    "u\u{308}",
    "ệ",
    "e\u{323}\u{302}",
    "e\u{302}\u{323}",
    "Å",
    "\u{212b}",
    "A\u{30a}",
    "Ω",
    "\u{2126}",
    "ﬁ",
    "①",
    "Ⅻ",
    "²",
    "½",
    "ｈｅｌｌｏ",
    "ＡＢＣ１２３",
    "한",
    "\u{1112}\u{1161}\u{11ab}",
    "각",
    "\u{1100}\u{1161}\u{11a8}",
    "\u{f900}",
    "\u{f9d0}",
    "\u{2f800}",
    "क़",
    "\u{915}\u{93c}",
    "\u{958}",
    "ড়",
    "\u{9a1}\u{9bc}",
    "שָׁ",
    "\u{5e9}\u{5c1}\u{5b8}",
    "\u{5e9}\u{5b8}\u{5c1}",
    "a\u{300}\u{301}\u{302}\u{303}",
    "a\u{316}\u{301}",
    "a\u{301}\u{316}",
    "o\u{328}\u{304}",
    "ǭ",
    "ḱ",
    "\u{1e9b}\u{323}",
    "ᾷ",
    "\u{3b1}\u{342}\u{345}",
    "\u{b47}\u{b3e}",
    "\u{b4b}",
    "\u{dd9}\u{dcf}",
    "\u{1025}\u{102e}",
    "\u{0344}",
    "\u{0340}",
    "\u{0374}",
    "\u{037e}",
    "\u{0387}",
    "\u{1f71}",
    "\u{2000}",
    "\u{2001}",
    "Ǆ",
    "ǅ",
    "ﷺ",
    "㍿",
    "㌀",
    "ﾊﾟ",
    "ｶﾞ",
    "\u{309b}",
    "か\u{3099}",
    "が",
    "\u{fb1d}",
    "\u{fb2a}",
    "\u{1d15e}",
    "\u{1d160}",
    "\u{1133e}",
    "\u{11347}\u{1133e}",
    "\u{114b9}\u{114ba}",
    "\u{115b8}\u{115af}",
    "\u{11935}\u{11930}",
];

/// Characters added after Unicode 9 with canonical decompositions, compositions or non-zero
/// combining classes: where NFC tables of different Unicode versions disagree.
pub const NEWER_UNICODE: &[&str] = &[
    "\u{1dfa}",
    "a\u{1df6}\u{1df7}",
    "\u{8d3}",
    "\u{1ac1}\u{1ac2}",
    "a\u{1ac0}\u{301}",
    "a\u{301}\u{1ac0}",
    "\u{10efd}",
    "\u{11f41}",
    "\u{11383}\u{113c9}",
    "\u{11382}\u{113c9}",
    "\u{11390}\u{113c9}",
    "\u{113c2}\u{113c2}",
    "\u{113c2}\u{113b8}",
    "\u{113c2}\u{113c9}",
    "\u{16121}\u{1611e}",
    "\u{1611e}\u{1611e}",
    "\u{1611e}\u{1611f}",
    "\u{16129}\u{1611f}",
    "\u{1611e}\u{16129}",
    "\u{16d63}\u{16d67}",
    "\u{16d67}\u{16d67}",
    "\u{16d69}\u{16d67}",
    "\u{105c9}",
    "\u{105d2}\u{307}",
    "\u{1e4ef}",
    "\u{1e5ee}\u{1e5ef}",
    "\u{0897}",
    "a\u{0897}\u{301}",
    "\u{1e08f}",
    "\u{1e02a}\u{301}",
    "\u{10d69}\u{10d6d}",
    "\u{1bf2}\u{1bf3}",
];

/// Special-token strings of the two families, whole and broken, alone and inside words.
pub const SPECIALS: &[&str] = &[
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_5|>",
    "<|reserved_special_token_247|>",
    "<|python_tag|>",
    "<|eom_id|>",
    "<|finetune_right_pad_id|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "<|vision_start|>",
    "<|image_pad|>",
    "<|fim_prefix|>",
    "<|im_start",
    "im_end|>",
    "<|eot_id",
    "<| im_start |>",
    "<|IM_START|>",
    "<<|im_start|>>",
    "<|im_start|><|im_end|>",
    "< think >",
];

/// Numbers of all shapes: digit runs, separators, signs, exponents and non-ASCII digits.
pub fn number(rng: &mut Rng) -> String {
    match rng.below(9) {
        0 => (0..rng.range(1, 40)).map(|_| char::from(b'0' + rng.below(10) as u8)).collect(),
        1 => format!("{}.{}", rng.below(100_000), rng.below(1000)),
        2 => format!("-{}", rng.next_u64() % 10_000_000),
        3 => format!("{},{:03},{:03}", rng.below(1000), rng.below(1000), rng.below(1000)),
        4 => format!("{}e{}{}", rng.below(100), if rng.chance(1, 2) { "-" } else { "+" }, rng.below(300)),
        5 => format!("0x{:X}", rng.next_u64()),
        6 => rng.pick(&["٠١٢٣٤٥٦٧٨٩", "०१२३४५६७८९", "１２３４５", "๑๒๓", "²³¹", "½¾", "Ⅳ", "〇"]).to_string(),
        7 => format!("{}:{:02}:{:02}", rng.below(24), rng.below(60), rng.below(60)),
        _ => format!("v{}.{}.{}-rc.{}", rng.below(10), rng.below(40), rng.below(100), rng.below(5)),
    }
}

/// A sentence in a random script, with its own punctuation.
pub fn sentence(rng: &mut Rng) -> String {
    let (_, words, stop) = rng.pick(SCRIPTS);
    let n = rng.range(3, 14);
    let spaced = !matches!(stop, "。");
    let mut s = String::new();
    for i in 0..n {
        if i > 0 && spaced {
            s.push(' ');
        }
        s.push_str(rng.pick(words));
        if rng.chance(1, 12) {
            s.push_str(rng.pick(&[",", "，", "、", " -", ":"]));
        }
    }
    s.push_str(stop);
    s
}

/// A paragraph of several sentences in mixed scripts.
pub fn prose(rng: &mut Rng) -> String {
    let mut s = String::new();
    for i in 0..rng.range(1, 6) {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(&sentence(rng));
    }
    s
}

/// A few consecutive lines of one language's code.
pub fn code(rng: &mut Rng) -> String {
    let lines = rng.pick(CODE);
    let start = rng.below(lines.len());
    let end = (start + rng.range(1, 8)).min(lines.len());
    let newline = if rng.chance(1, 6) { "\r\n" } else { "\n" };
    lines[start..end].join(newline)
}

/// A code point from anywhere in Unicode (scalar values only), weighted toward assigned blocks.
pub fn any_char(rng: &mut Rng) -> char {
    let ranges: &[(u32, u32)] = &[
        (0x00, 0x7f),
        (0x80, 0x24f),
        (0x300, 0x36f),
        (0x370, 0x52f),
        (0x590, 0x6ff),
        (0x900, 0xdff),
        (0xe00, 0xeff),
        (0x1100, 0x11ff),
        (0x1e00, 0x1fff),
        (0x2000, 0x2bff),
        (0x3000, 0x30ff),
        (0x4e00, 0x9fff),
        (0xac00, 0xd7a3),
        (0xe000, 0xf8ff),
        (0xf900, 0xfaff),
        (0xfb00, 0xfdff),
        (0xfe00, 0xffff),
        (0x10000, 0x1ffff),
        (0x20000, 0x2ffff),
        (0xe0000, 0xe01ef),
        (0xf0000, 0x10ffff),
    ];
    let (lo, hi) = rng.pick(ranges);
    let c = lo + (rng.next_u64() % u64::from(hi - lo + 1)) as u32;
    char::from_u32(c).unwrap_or('\u{fffd}')
}

/// A rendered chat in one of the two families' formats, with tools now and then.
pub fn chat(rng: &mut Rng) -> String {
    let tool = r#"{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}"#;
    let mut s = String::new();
    let llama = rng.chance(1, 2);
    if llama {
        s.push_str("<|begin_of_text|>");
    }
    let turns = rng.range(1, 5);
    for t in 0..turns {
        let (role, content) = match t {
            0 if rng.chance(1, 2) => (
                "system",
                if rng.chance(1, 3) {
                    format!("You are helpful.\n\n# Tools\n\n<tools>\n{tool}\n</tools>")
                } else {
                    prose(rng)
                },
            ),
            _ if t % 2 == 1 && rng.chance(1, 4) => (
                "assistant",
                format!(
                    "<tool_call>\n{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"{}\"}}}}\n</tool_call>",
                    rng.pick(&["Paris", "東京", "Zürich", "São Paulo"])
                ),
            ),
            _ if t % 2 == 1 => (
                "assistant",
                if rng.chance(1, 3) {
                    format!("<think>\n{}\n</think>\n\n{}", prose(rng), prose(rng))
                } else {
                    prose(rng)
                },
            ),
            _ => ("user", if rng.chance(1, 3) { code(rng) } else { prose(rng) }),
        };
        if llama {
            s.push_str(&format!(
                "<|start_header_id|>{role}<|end_header_id|>\n\n{}<|eot_id|>",
                content.trim()
            ));
        } else {
            s.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
        }
    }
    s.push_str(if llama {
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    } else {
        "<|im_start|>assistant\n"
    });
    s
}

/// One fragment of a random kind.
pub fn fragment(rng: &mut Rng) -> String {
    match rng.below(20) {
        0..=4 => prose(rng),
        5..=7 => code(rng),
        8 => rng.pick(WHITESPACE).to_string(),
        9 => number(rng),
        10 => rng.pick(PUNCT).to_string(),
        11 => rng.pick(EMOJI).to_string(),
        12 => rng.pick(NORMALIZATION).to_string(),
        // Rare on purpose: these are the Unicode-version cases the parity test tolerates.
        13 if rng.chance(1, 10) => rng.pick(NEWER_UNICODE).to_string(),
        13 => sentence(rng),
        14 => rng.pick(SPECIALS).to_string(),
        15 => (0..rng.range(1, 12)).map(|_| any_char(rng)).collect(),
        16 => {
            // A word followed by a pile of combining marks.
            let mut s = String::from(rng.pick(&["a", "e", "x", "ا", "ש", "क", "Ω", "ก", " "]));
            for _ in 0..rng.range(1, 6) {
                s.push(char::from_u32(0x300 + rng.below(0x70) as u32).unwrap_or('\u{301}'));
            }
            s
        }
        17 => (0..rng.range(2, 30)).map(|_| rng.pick(WHITESPACE).to_string()).collect(),
        18 => sentence(rng).to_uppercase(),
        _ => chat(rng),
    }
}

/// Input `index` of the parity corpus: the same index always gives the same text.
pub fn input(seed: u64, index: usize) -> String {
    let mut rng = Rng::new(seed ^ (index as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut s = String::new();
    let pieces = if rng.chance(1, 100) { rng.range(20, 40) } else { rng.range(1, 6) };
    for _ in 0..pieces {
        s.push_str(&fragment(&mut rng));
        if rng.chance(1, 2) {
            s.push_str(if rng.chance(1, 4) { rng.pick(WHITESPACE) } else { " " });
        }
    }
    s
}

/// Prose in the named scripts only (see [`SCRIPTS`]), at least `min_bytes` long: sentences
/// joined by spaces, with a paragraph break now and then.
pub fn script_text(rng: &mut Rng, scripts: &[&str], min_bytes: usize) -> String {
    let chosen: Vec<_> = SCRIPTS.iter().filter(|(name, _, _)| scripts.contains(name)).collect();
    let mut s = String::new();
    while s.len() < min_bytes {
        let (_, words, stop) = *chosen[rng.below(chosen.len())];
        let spaced = !matches!(stop, "。");
        if !s.is_empty() {
            s.push_str(if rng.chance(1, 8) {
                "\n\n"
            } else if spaced {
                " "
            } else {
                ""
            });
        }
        for i in 0..rng.range(4, 16) {
            if i > 0 && spaced {
                s.push(' ');
            }
            s.push_str(rng.pick(words));
            if rng.chance(1, 12) {
                s.push_str(if spaced { "," } else { "，" });
            }
        }
        s.push_str(stop);
    }
    s
}

/// Source code of mixed languages (see [`CODE`]), at least `min_bytes` long.
pub fn code_text(rng: &mut Rng, min_bytes: usize) -> String {
    let mut s = String::new();
    while s.len() < min_bytes {
        if !s.is_empty() {
            s.push_str(if rng.chance(1, 4) { "\n\n" } else { "\n" });
        }
        s.push_str(&code(rng));
    }
    s
}

/// Latin-script languages of [`SCRIPTS`].
pub const LATIN: &[&str] = &["english", "french", "german", "spanish", "vietnamese", "polish"];
/// Other alphabets and abugidas of [`SCRIPTS`].
pub const OTHER_SCRIPTS: &[&str] = &["russian", "ukrainian", "greek", "arabic", "hebrew", "hindi", "thai"];
/// Chinese, Japanese and Korean.
pub const CJK: &[&str] = &["chinese", "japanese", "korean"];
