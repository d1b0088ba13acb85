//! The default model's tokenizer, rebuilt from GGUF metadata: round trips, special tokens,
//! and token ids checked against an independent Python implementation.

use std::path::PathBuf;
use std::sync::OnceLock;

mod common;

use common::python_ids;
use kvmerger_engine::tokenizer::TextTokenizer;

/// The default model's path (fetched first if missing) and its tokenizer, loaded once.
fn default_model() -> &'static (PathBuf, TextTokenizer) {
    static MODEL: OnceLock<(PathBuf, TextTokenizer)> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = kvmerger_models::ensure_default_model()
            .expect("the default model is needed (`kvmerger fetch`)");
        let (content, _) =
            kvmerger_engine::read_gguf_header(&path).expect("reading the default model's header");
        let tokenizer =
            TextTokenizer::from_gguf_metadata(&content.metadata).expect("building the tokenizer");
        (path, tokenizer)
    })
}

fn tokenizer() -> &'static TextTokenizer {
    &default_model().1
}

const ROUND_TRIP: &[&str] = &[
    "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times.",
    "fn main() {\n    let v: Vec<u32> = (0..10).collect();\n    for x in &v {\n        println!(\"{x}\");\n    }\n}\n",
    "def f(xs):\n\tif not xs:\n\t\treturn None\n    return sorted(xs)[len(xs) // 2]  # median\n\n\n",
    "Crème brûlée, naïve façade, Ångström, Straße — «quotes» and ‘ticks’.",
    "日本語のテキスト、中文文本，한국어 텍스트.",
    "Emoji: 🎉🚀👍🏽 and 👨‍👩‍👧 (a family, joined with ZWJ).",
    "  leading spaces,   runs   of spaces,\ttabs\r\nand CRLF  \n\n",
    "",
];

#[test]
fn decode_inverts_encode() {
    let tok = tokenizer();
    for text in ROUND_TRIP {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(&tok.decode(&ids).unwrap(), text, "ids {ids:?}");
        assert_eq!(tok.encode(text, true).unwrap(), ids, "SmolLM2 adds no BOS/EOS");
    }
    assert!(!tok.adds_bos());
    assert_eq!(tok.vocab_size(), 49152);
    assert!(tok.decode(&[49152]).is_err());
}

#[test]
fn special_tokens_are_single_ids() {
    let tok = tokenizer();
    let start = tok.token_id("<|im_start|>").unwrap();
    let end = tok.token_id("<|im_end|>").unwrap();
    assert_eq!(tok.encode("<|im_start|>", false).unwrap(), vec![start]);
    assert_eq!(tok.encode("<|im_end|>", false).unwrap(), vec![end]);
    let ids = tok.encode("<|im_start|>user\nHi<|im_end|>\n", false).unwrap();
    assert_eq!(ids.first(), Some(&start));
    assert_eq!(ids.iter().filter(|&&id| id == start || id == end).count(), 2);
    assert_eq!(tok.decode(&ids).unwrap(), "<|im_start|>user\nHi<|im_end|>\n");
    assert_eq!(tok.bos_id(), Some(start));
    let stops = tok.eos_ids();
    assert_eq!(stops.first(), Some(&end), "the declared EOS comes first");
    assert!(stops.contains(&tok.token_id("<|endoftext|>").unwrap()));
}

#[test]
fn digits_are_single_tokens() {
    let tok = tokenizer();
    let ids = tok.encode("48213", false).unwrap();
    let digits: Vec<String> = ids.iter().map(|&id| tok.token_str(id).unwrap()).collect();
    assert_eq!(digits, ["4", "8", "2", "1", "3"]);
}

#[test]
fn stream_decoder_yields_whole_characters() {
    let tok = tokenizer();
    let text = "Zoë said 你好 🎉!";
    let ids = tok.encode(text, false).unwrap();
    let mut stream = tok.stream_decoder();
    let mut out = String::new();
    let mut held_back = 0;
    for &id in &ids {
        match stream.push(id).unwrap() {
            Some(piece) => out.push_str(&piece),
            None => held_back += 1,
        }
    }
    assert_eq!(out, text);
    assert!(held_back > 0, "multi-byte characters span several byte-level tokens");
}

const CROSS_CHECK: &[&str] = &[
    "The pass key is 48213. Remember it. The pass key is 48213.",
    "In 2024, 3.14159 × 10^5 = 314159; call 555-0199 or +1 (800) 123-4567.",
    "What is the pass key? The pass key is",
    "    def forward(self, x):\n        return self.proj(x) + 1e-6\n",
    "impl<T: Clone> Foo<T> {\n\tfn bar(&self) -> Option<&T> { self.0.get(0) }\n}",
    "Crème brûlée — 日本語 — 🎉👍🏽 — naïve",
    "spaces:  two,   three,    four.\n\n\nthree newlines\r\n",
    "<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\n",
    "It's, they're, we'll, I'd, she'S  don't",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa 0000000000 !!!??? ...",
];

#[test]
fn ids_match_the_python_tokenizers_package() {
    let (path, tok) = default_model();
    let expected = python_ids(path, CROSS_CHECK);
    assert_eq!(expected.len(), CROSS_CHECK.len());
    for (text, want) in CROSS_CHECK.iter().zip(&expected) {
        assert_eq!(&tok.encode(text, false).unwrap(), want, "text {text:?}");
    }
}
