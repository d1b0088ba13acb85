//! RULER's needles in a haystack (`niah.py`): `num_keys` keys, each with `num_values`
//! values, one needle sentence per value, hidden at random places of a haystack; the
//! question asks for the values of `num_queries` of the keys.

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;

use super::{fit, insert_at_random_lines, words, Prompt};
use crate::error::{EvalError, Result};
use crate::sample::{TaskInput, PASSKEY_FILLER};

/// What fills the context between the needles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Haystack {
    /// RULER's "noise": the passkey filler, one repetition a line.
    Noise,
    /// RULER's "essay" (Paul Graham's essays there; the `--haystack` corpus here), cut into
    /// sentences, the needles between them at depths drawn from 40 evenly spaced ones.
    Essay,
    /// Lines that are needles themselves, with other keys and values: distractors.
    Needle,
}

/// What a key or a value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// An `adjective-noun` compound.
    Words,
    /// Seven digits.
    Numbers,
    /// A random version-4 UUID.
    Uuids,
}

impl Kind {
    fn plural(self) -> &'static str {
        match self {
            Kind::Words => "words",
            Kind::Numbers => "numbers",
            Kind::Uuids => "uuids",
        }
    }

    fn random(self, rng: &mut StdRng) -> String {
        match self {
            Kind::Words => words::compound(rng.random_range(0..words::COMPOUNDS)),
            Kind::Numbers => rng.random_range(1_000_000..=9_999_999).to_string(),
            Kind::Uuids => {
                // Python's `uuid.UUID(int=..., version=4)`: version nibble 4, variant 10.
                let bits: u128 = rng.random();
                let v = (bits & !(0xf_u128 << 76) | (0x4_u128 << 76)) & !(0x3_u128 << 62)
                    | (0x2_u128 << 62);
                let h = format!("{v:032x}");
                format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
            }
        }
    }
}

/// One niah subtask's settings, as `synthetic.yaml` gives them.
#[derive(Debug, Clone, Copy)]
pub(super) struct NiahConfig {
    pub haystack: Haystack,
    pub key: Kind,
    pub value: Kind,
    pub num_keys: usize,
    pub num_values: usize,
    pub num_queries: usize,
}

/// RULER's needle depths in percent: `np.round(np.linspace(0, 100, 40))`.
fn depths() -> impl Iterator<Item = usize> {
    (0..40).map(|i| (i as f64 * 100.0 / 39.0).round() as usize)
}

/// Whether `word` ends a sentence (a simpler rule than the nltk tokenizer RULER uses).
fn ends_sentence(word: &str) -> bool {
    word.trim_end_matches(['"', '\'', '”', '’', ')', ']']).ends_with(['.', '!', '?'])
}

/// The first `n` words of `corpus` (repeated when it is shorter, as RULER repeats its
/// essays), joined by single spaces and grouped into sentences.
fn essay_sentences(corpus: &str, n: usize) -> Vec<String> {
    let mut sentences = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    for word in corpus.split_whitespace().cycle().take(n) {
        current.push(word);
        if ends_sentence(word) {
            sentences.push(current.join(" "));
            current.clear();
        }
    }
    if !current.is_empty() {
        sentences.push(current.join(" "));
    }
    sentences
}

/// `needles` between the sentences, each at the sentence `len * depth / 100` for distinct
/// depths drawn from RULER's 40.
fn essay_with_needles(sentences: &[String], needles: &[String], rng: &mut StdRng) -> String {
    let all: Vec<usize> = depths().collect();
    let mut at: Vec<usize> =
        all.choose_multiple(rng, needles.len()).map(|d| sentences.len() * d / 100).collect();
    at.sort_unstable();
    let mut pieces: Vec<&str> = Vec::with_capacity(sentences.len() + needles.len());
    let mut from = 0;
    for (&to, needle) in at.iter().zip(needles) {
        pieces.extend(sentences[from..to].iter().map(String::as_str));
        pieces.push(needle);
        from = to;
    }
    pieces.extend(sentences[from..].iter().map(String::as_str));
    pieces.join(" ")
}

/// One sample of a niah subtask, fitted to `input.length` tokens.
pub(super) fn generate(
    config: NiahConfig,
    input: &TaskInput<'_>,
    max_new_tokens: usize,
    rng: StdRng,
) -> Result<Prompt> {
    let corpus = input.haystack.unwrap_or_default();
    if config.haystack == Haystack::Essay && corpus.trim().is_empty() {
        return Err(EvalError::Task(
            "RULER's essay haystack needs a corpus text (--haystack)".into(),
        ));
    }
    // RULER: `num_needle_k = max(num_needle_k, num_needle_q)`.
    let num_keys = config.num_keys.max(config.num_queries);
    let needles = num_keys * config.num_values;
    let values_name = config.value.plural();
    let needle = |key: &str, value: &str| {
        format!("One of the special magic {values_name} for {key} is: {value}.")
    };
    fit(input, max_new_tokens, needles, &rng, |n, rng| {
        let mut keys: Vec<String> = Vec::with_capacity(num_keys);
        while keys.len() < num_keys {
            let key = config.key.random(rng);
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        let values: Vec<Vec<String>> = keys
            .iter()
            .map(|_| (0..config.num_values).map(|_| config.value.random(rng)).collect())
            .collect();
        let mut sentences: Vec<String> =
            keys.iter().zip(&values).flat_map(|(k, vs)| vs.iter().map(|v| needle(k, v))).collect();
        sentences.shuffle(rng);
        let haystack = match config.haystack {
            Haystack::Essay => essay_with_needles(&essay_sentences(corpus, n), &sentences, rng),
            Haystack::Noise => {
                let lines = vec![PASSKEY_FILLER.trim_end().to_string(); n];
                insert_at_random_lines(lines, sentences, rng).join("\n")
            }
            Haystack::Needle => {
                // Distractors never use a real key: their value would be a second answer.
                let lines = (0..n)
                    .map(|_| loop {
                        let key = config.key.random(rng);
                        if !keys.contains(&key) {
                            break needle(&key, &config.value.random(rng));
                        }
                    })
                    .collect();
                insert_at_random_lines(lines, sentences, rng).join("\n")
            }
        };
        let asked = rand::seq::index::sample(rng, num_keys, config.num_queries).into_vec();
        let answers: Vec<String> = asked.iter().flat_map(|&i| values[i].clone()).collect();
        // `a`, or `a, b, and c`.
        let names: Vec<&str> = asked.iter().map(|&i| keys[i].as_str()).collect();
        let query = match names.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{}, and {last}", rest.join(", ")),
            _ => names.concat(),
        };
        // RULER's template is plural; with a single answer it swaps in the singular words.
        let (some, are, are_all, kind) = if answers.len() == 1 {
            ("A", "is", "is", values_name.trim_end_matches('s'))
        } else {
            ("Some", "are", "are all", values_name)
        };
        Ok(Prompt {
            context: format!(
                "{some} special magic {kind} {are} hidden within the following text. Make sure \
                 to memorize it. I will quiz you about the {kind} afterwards.\n{haystack}"
            ),
            question: format!(
                "What {are_all} the special magic {kind} for {query} mentioned in the provided \
                 text?"
            ),
            answer_prefix: format!(
                "The special magic {kind} for {query} mentioned in the provided text {are}"
            ),
            answers,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depths_are_rulers_forty() {
        let d: Vec<usize> = depths().collect();
        assert_eq!((d.len(), d[0], d[1], d[2], d[38], d[39]), (40, 0, 3, 5, 97, 100));
    }

    #[test]
    fn uuids_are_version_4() {
        let mut rng = <StdRng as rand::SeedableRng>::seed_from_u64(1);
        for _ in 0..20 {
            let u = Kind::Uuids.random(&mut rng);
            let parts: Vec<&str> = u.split('-').collect();
            assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [8, 4, 4, 4, 12]);
            assert!(parts[2].starts_with('4'), "{u}");
            assert!(matches!(&parts[3][..1], "8" | "9" | "a" | "b"), "{u}");
        }
    }

    #[test]
    fn essays_split_into_sentences_and_repeat_when_short() {
        let s = essay_sentences("One two.  Three “four?”\nfive", 8);
        assert_eq!(s, ["One two.", "Three “four?”", "five One two.", "Three"]);
    }
}
