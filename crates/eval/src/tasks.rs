//! Seeded task generators: passkey retrieval, needle in a haystack over real text,
//! RULER-style synthetic needles and variable tracking, and perplexity of a continuation.
//!
//! Contexts are sized in tokens of the model under test: generators take a token counter
//! and grow or trim their filler to hit the target length.

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::metrics::Metric;

/// The classic passkey filler (Mohtashami and Jaggi, 2023).
pub const PASSKEY_FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";

/// One evaluation sample, in kvpress's column convention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub id: String,
    pub task: String,
    /// Compressed.
    pub context: String,
    /// Read after the compressed context, uncompressed (unless query-aware).
    pub question: String,
    pub answer_prefix: String,
    pub answers: Vec<String>,
    pub max_new_tokens: usize,
    /// Where the needle sits, as a share of the context.
    pub depth: Option<f64>,
    pub metric: Metric,
    pub all_classes: Option<Vec<String>>,
}

/// Which generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    Passkey,
    /// Needle in a haystack of real text.
    Needle,
    NiahSingle,
    NiahMultikey,
    NiahMultivalue,
    VariableTracking,
    /// Perplexity of the text that follows a compressed passage.
    Perplexity,
}

impl TaskKind {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Passkey => "passkey",
            Self::Needle => "needle",
            Self::NiahSingle => "niah_single",
            Self::NiahMultikey => "niah_multikey",
            Self::NiahMultivalue => "niah_multivalue",
            Self::VariableTracking => "variable_tracking",
            Self::Perplexity => "perplexity",
        }
    }

    /// Whether the task reads a haystack corpus.
    pub fn needs_haystack(&self) -> bool {
        matches!(self, Self::Needle | Self::Perplexity)
    }
}

/// What a generator needs to know besides the task.
pub struct TaskInput<'a> {
    /// Target context length in tokens.
    pub length: usize,
    /// Needle depth in [0, 1].
    pub depth: f64,
    pub seed: u64,
    /// Counts tokens the way the model will see them.
    pub count_tokens: &'a dyn Fn(&str) -> usize,
    /// Real text for `Needle` and `Perplexity`.
    pub haystack: Option<&'a str>,
}

/// Generates one sample.
pub fn generate(kind: TaskKind, input: &TaskInput<'_>) -> Result<Sample> {
    if !(0.0..=1.0).contains(&input.depth) {
        return Err(EvalError::Task(format!("depth must be in [0, 1], got {}", input.depth)));
    }
    if input.length > kvmerger_engine::MAX_CONTEXT {
        return Err(EvalError::Task(format!(
            "context length {} exceeds {} tokens",
            input.length,
            kvmerger_engine::MAX_CONTEXT
        )));
    }
    if input.length < 64 {
        return Err(EvalError::Task(format!(
            "context length {} is too short (at least 64 tokens)",
            input.length
        )));
    }
    let mut rng = StdRng::seed_from_u64(input.seed ^ (kind as u64) << 56);
    let id = format!("{}-{}-d{:.2}-s{}", kind.name(), input.length, input.depth, input.seed);
    let sample = |context: String,
                  question: &str,
                  answer_prefix: &str,
                  answers: Vec<String>,
                  max_new_tokens: usize,
                  metric: Metric| Sample {
        id: id.clone(),
        task: kind.name().to_string(),
        context,
        question: question.to_string(),
        answer_prefix: answer_prefix.to_string(),
        answers,
        max_new_tokens,
        depth: Some(input.depth),
        metric,
        all_classes: None,
    };
    let filler = |needles: &[String]| repeat_to_length(PASSKEY_FILLER, needles, input);
    Ok(match kind {
        TaskKind::Passkey => {
            let key = rng.random_range(10_000..100_000).to_string();
            let needle = format!("The pass key is {key}. Remember it. {key} is the pass key. ");
            sample(
                filler(&[needle]),
                "What is the pass key?",
                "The pass key is",
                vec![key],
                8,
                Metric::Contains,
            )
        }
        TaskKind::Needle => {
            let city = *CITIES.choose(&mut rng).expect("cities");
            let number = rng.random_range(1_000_000..10_000_000).to_string();
            let needle = format!("The special magic number for {city} is {number}. ");
            let context = haystack_to_length(input, &needle, &mut rng)?;
            let q = format!("What is the special magic number for {city}?");
            let prefix = format!("The special magic number for {city} is");
            sample(context, &q, &prefix, vec![number], 12, Metric::Contains)
        }
        TaskKind::NiahSingle | TaskKind::NiahMultikey => {
            let words: Vec<&str> = WORDS.choose_multiple(&mut rng, 4).copied().collect();
            let values: Vec<String> =
                (0..4).map(|_| rng.random_range(1_000_000..10_000_000).to_string()).collect();
            let n = if kind == TaskKind::NiahSingle { 1 } else { 4 };
            let needles: Vec<String> = (0..n)
                .map(|i| {
                    format!("One of the special magic numbers for {} is: {}. ", words[i], values[i])
                })
                .collect();
            // The asked needle sits at the requested depth; distractors elsewhere.
            let q = format!(
                "What is the special magic number for {} mentioned in the provided text?",
                words[0]
            );
            let prefix = format!(
                "The special magic number for {} mentioned in the provided text is",
                words[0]
            );
            sample(filler(&needles), &q, &prefix, vec![values[0].clone()], 12, Metric::Contains)
        }
        TaskKind::NiahMultivalue => {
            let word = *WORDS.choose(&mut rng).expect("words");
            let values: Vec<String> =
                (0..4).map(|_| rng.random_range(1_000_000..10_000_000).to_string()).collect();
            let needles: Vec<String> = values
                .iter()
                .map(|v| format!("One of the special magic numbers for {word} is: {v}. "))
                .collect();
            let q = format!(
                "What are all the special magic numbers for {word} mentioned in the provided text?"
            );
            let prefix =
                format!("The special magic numbers for {word} mentioned in the provided text are");
            sample(filler(&needles), &q, &prefix, values, 40, Metric::ContainsAll)
        }
        TaskKind::VariableTracking => {
            let value = rng.random_range(10_000..100_000).to_string();
            let names: Vec<String> = (0..4).map(|_| random_name(&mut rng)).collect();
            let mut needles = vec![format!("VAR {} = {value}. ", names[0])];
            needles.extend(names.windows(2).map(|w| format!("VAR {} = VAR {}. ", w[1], w[0])));
            let q = format!(
                "Find all variables that are assigned the value {value} in the text above."
            );
            let prefix = format!("Answer: According to the chain(s) of variable assignment in the text above, {} variables are assigned the value {value}, they are:", names.len());
            sample(filler(&needles), &q, &prefix, names, 30, Metric::ContainsAll)
        }
        TaskKind::Perplexity => {
            let text = input
                .haystack
                .ok_or_else(|| EvalError::Task("perplexity needs a haystack text".into()))?;
            let start = sentence_start(text, rng.random_range(0..text.len() / 2));
            let context = take_tokens(&text[start..], input.length, input.count_tokens);
            let rest = &text[start + context.len()..];
            let continuation = take_tokens(rest, 128, input.count_tokens);
            let mut s = sample(context, "", "", vec![continuation], 0, Metric::Perplexity);
            s.depth = None;
            s
        }
    })
}

const CITIES: [&str; 12] = [
    "Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Hobart", "Winnipeg", "Cusco", "Tromso",
    "Dakar", "Hanoi", "Zagreb",
];
const WORDS: [&str; 12] = [
    "amber", "falcon", "harbor", "lantern", "meadow", "orchid", "pebble", "quartz", "saffron",
    "thistle", "velvet", "willow",
];

fn random_name(rng: &mut StdRng) -> String {
    (0..5).map(|_| (b'A' + rng.random_range(0..26)) as char).collect()
}

/// Filler repeated to `input.length` tokens with `needles` inserted: the first at
/// `input.depth`, the others spread evenly through the rest.
fn repeat_to_length(filler: &str, needles: &[String], input: &TaskInput<'_>) -> String {
    let needle_tokens: usize = needles.iter().map(|n| (input.count_tokens)(n)).sum();
    let per_unit = ((input.count_tokens)(&filler.repeat(20)) as f64 / 20.0).max(1.0);
    let mut units =
        (((input.length.saturating_sub(needle_tokens)) as f64 / per_unit).floor() as usize).max(1);
    let build = |units: usize| {
        let mut pieces: Vec<String> = vec![filler.to_string(); units];
        let mut slots: Vec<(usize, &String)> = Vec::new();
        for (i, n) in needles.iter().enumerate() {
            let depth = if i == 0 {
                input.depth
            } else {
                (input.depth + i as f64 / needles.len() as f64).fract()
            };
            slots.push(((depth * units as f64).round() as usize, n));
        }
        // Insert from the back so earlier slots keep their meaning.
        slots.sort_by_key(|slot| std::cmp::Reverse(slot.0));
        for (at, n) in slots {
            pieces.insert(at.min(pieces.len()), n.clone());
        }
        pieces.concat()
    };
    while units > 1 && (input.count_tokens)(&build(units)) > input.length {
        units -= 1;
    }
    build(units)
}

/// A passage of the haystack of about `input.length` tokens, from a seeded sentence start,
/// with `needle` inserted at the sentence boundary nearest `input.depth`.
fn haystack_to_length(input: &TaskInput<'_>, needle: &str, rng: &mut StdRng) -> Result<String> {
    let text = input
        .haystack
        .ok_or_else(|| EvalError::Task("the needle task needs a haystack text".into()))?;
    let budget = input.length.saturating_sub((input.count_tokens)(needle));
    let start = sentence_start(text, rng.random_range(0..text.len() / 2));
    let passage = take_tokens(&text[start..], budget, input.count_tokens);
    if (input.count_tokens)(&passage) + 64 < budget {
        return Err(EvalError::Task(format!(
            "the haystack is too short for {} tokens",
            input.length
        )));
    }
    let at = sentence_start(&passage, (input.depth * passage.len() as f64) as usize);
    Ok(format!("{}{}{}", &passage[..at], needle, &passage[at..]))
}

/// The start of the sentence at or after byte `at` (0 if none), on a char boundary.
fn sentence_start(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at += 1;
    }
    if at == 0 || at == text.len() {
        return at;
    }
    match text[at..].find(". ") {
        Some(i) => at + i + 2,
        None => 0,
    }
}

/// The longest prefix of `text` (cut at a char boundary) with at most `tokens` tokens.
fn take_tokens(text: &str, tokens: usize, count: &dyn Fn(&str) -> usize) -> String {
    // No tokenizer packs more than a dozen characters into a token of prose: search there.
    let mut limit = text.len().min(tokens.saturating_mul(12));
    while !text.is_char_boundary(limit) {
        limit -= 1;
    }
    let cuts: Vec<usize> =
        text.char_indices().map(|(i, _)| i).take_while(|&i| i <= limit).chain([limit]).collect();
    // Invariant: the prefix up to cuts[lo] fits.
    let (mut lo, mut hi) = (0, cuts.len() - 1);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if count(&text[..cuts[mid]]) <= tokens {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    text[..cuts[lo]].to_string()
}

/// Lines of random keys and values, a text unlike prose (for `kvmerger analyze`).
pub fn key_value_noise(lines: usize, seed: u64) -> String {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..lines)
        .map(|_| {
            format!(
                "key-{}: value-{}\n",
                rng.random_range(1000..10_000),
                rng.random_range(10_000..100_000)
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One token per word, as a stand-in tokenizer.
    fn words(s: &str) -> usize {
        s.split_whitespace().count()
    }

    fn input(length: usize, depth: f64, seed: u64, haystack: Option<&str>) -> TaskInput<'_> {
        TaskInput { length, depth, seed, count_tokens: &words, haystack }
    }

    fn book() -> String {
        (0..3000).map(|i| format!("Sentence number {i} tells of the sea and the whale. ")).collect()
    }

    #[test]
    fn generators_are_deterministic_for_a_seed() {
        let text = book();
        for kind in [
            TaskKind::Passkey,
            TaskKind::Needle,
            TaskKind::NiahMultikey,
            TaskKind::VariableTracking,
            TaskKind::Perplexity,
        ] {
            let a = generate(kind, &input(500, 0.3, 7, Some(&text))).unwrap();
            let b = generate(kind, &input(500, 0.3, 7, Some(&text))).unwrap();
            let c = generate(kind, &input(500, 0.3, 8, Some(&text))).unwrap();
            assert_eq!(a, b, "{kind:?}");
            assert_ne!(a.answers, c.answers, "{kind:?}: another seed, another answer");
        }
    }

    #[test]
    fn needles_sit_once_at_the_requested_depth_and_length_is_met() {
        let text = book();
        for kind in [TaskKind::Passkey, TaskKind::Needle, TaskKind::NiahSingle] {
            for depth in [0.0, 0.25, 0.5, 0.9] {
                let s = generate(kind, &input(800, depth, 3, Some(&text))).unwrap();
                let answer = &s.answers[0];
                let first = s.context.find(answer.as_str()).unwrap();
                let occurrences = s.context.matches(answer.as_str()).count();
                // The passkey sentence names its key twice; the others once.
                assert_eq!(occurrences, if kind == TaskKind::Passkey { 2 } else { 1 }, "{kind:?}");
                let at = first as f64 / s.context.len() as f64;
                assert!((at - depth).abs() < 0.05, "{kind:?} depth {depth}: found at {at}");
                let n = words(&s.context);
                assert!((740..=800).contains(&n), "{kind:?}: {n} tokens");
            }
        }
    }

    #[test]
    fn multi_value_and_variable_tracking_hide_every_answer() {
        for kind in [TaskKind::NiahMultivalue, TaskKind::VariableTracking] {
            let s = generate(kind, &input(600, 0.2, 5, None)).unwrap();
            assert!(s.answers.len() >= 4);
            assert!(s.answers.iter().all(|a| s.context.contains(a.as_str())));
            assert_eq!(s.metric, Metric::ContainsAll);
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(generate(TaskKind::Passkey, &input(500, 1.5, 1, None)).is_err());
        assert!(generate(TaskKind::Needle, &input(500, 0.5, 1, None)).is_err());
        assert!(generate(TaskKind::Passkey, &input(10, 0.5, 1, None)).is_err());
    }
}
