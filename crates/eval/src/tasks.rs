//! Seeded task generators: passkey retrieval, needle in a haystack over real text, RULER's
//! synthetic tasks ([`crate::ruler`]), and perplexity of a continuation.
//!
//! Contexts are sized in tokens of the model under test: generators take a token counter
//! and grow or trim their filler to hit the target length.

use std::fmt;
use std::str::FromStr;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::metrics::Metric;
use crate::ruler::RulerTask;
pub use crate::sample::{Sample, TaskInput, PASSKEY_FILLER};

/// Which generator. Written in JSON and reports by its name: `passkey`, `needle`,
/// `perplexity`, or a RULER subtask's (`niah_single_1`, ..., `vt`, `cwe`, `fwe`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum TaskKind {
    Passkey,
    /// Needle in a haystack of real text.
    Needle,
    /// Perplexity of the text that follows a compressed passage.
    Perplexity,
    Ruler(RulerTask),
}

impl TaskKind {
    /// Every task: ours, then RULER's subtasks.
    pub fn all() -> impl Iterator<Item = TaskKind> {
        [Self::Passkey, Self::Needle, Self::Perplexity]
            .into_iter()
            .chain(RulerTask::ALL.map(Self::Ruler))
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Passkey => "passkey",
            Self::Needle => "needle",
            Self::Perplexity => "perplexity",
            Self::Ruler(t) => t.name(),
        }
    }

    /// Whether the task reads a haystack corpus.
    pub fn needs_haystack(&self) -> bool {
        match self {
            Self::Needle | Self::Perplexity => true,
            Self::Passkey => false,
            Self::Ruler(t) => t.needs_haystack(),
        }
    }

    /// Whether the grid's depths place the needle (RULER draws its own depths; perplexity
    /// has no needle).
    pub fn takes_depth(&self) -> bool {
        matches!(self, Self::Passkey | Self::Needle)
    }

    /// Mixed into the seed so that tasks draw apart. The first three keep the numbers they
    /// had before RULER's tasks came, so their samples (and stored rows) stay the same.
    fn seed_tag(&self) -> u64 {
        match self {
            Self::Passkey => 0,
            Self::Needle => 1,
            Self::Perplexity => 6,
            Self::Ruler(t) => 16 + t.index() as u64,
        }
    }
}

impl fmt::Display for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A task name that is none of [`TaskKind::all`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown task `{name}` (expected one of: {})", TaskKind::all().map(|t| t.name()).collect::<Vec<_>>().join(", "))]
pub struct UnknownTask {
    pub name: String,
}

impl FromStr for TaskKind {
    type Err = UnknownTask;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Self::all().find(|t| t.name() == s).ok_or_else(|| UnknownTask { name: s.to_string() })
    }
}

impl TryFrom<String> for TaskKind {
    type Error = UnknownTask;

    fn try_from(s: String) -> std::result::Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<TaskKind> for String {
    fn from(t: TaskKind) -> String {
        t.name().to_string()
    }
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
    let mut rng = StdRng::seed_from_u64(input.seed ^ kind.seed_tag() << 56);
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
    Ok(match kind {
        TaskKind::Passkey => {
            let key = rng.random_range(10_000..100_000).to_string();
            let needle = format!("The pass key is {key}. Remember it. {key} is the pass key. ");
            sample(
                filler_to_length(PASSKEY_FILLER, &needle, input),
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
        TaskKind::Ruler(task) => return crate::ruler::generate(task, input, rng),
    })
}

const CITIES: [&str; 12] = [
    "Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Hobart", "Winnipeg", "Cusco", "Tromso",
    "Dakar", "Hanoi", "Zagreb",
];

/// Filler repeated to `input.length` tokens with `needle` inserted at `input.depth`.
fn filler_to_length(filler: &str, needle: &str, input: &TaskInput<'_>) -> String {
    let needle_tokens = (input.count_tokens)(needle);
    let per_unit = ((input.count_tokens)(&filler.repeat(20)) as f64 / 20.0).max(1.0);
    let mut units =
        (((input.length.saturating_sub(needle_tokens)) as f64 / per_unit).floor() as usize).max(1);
    let build = |units: usize| {
        let at = (input.depth * units as f64).round() as usize;
        format!("{}{needle}{}", filler.repeat(at), filler.repeat(units - at.min(units)))
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
        for kind in TaskKind::all() {
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
        for kind in [TaskKind::Passkey, TaskKind::Needle] {
            for depth in [0.0, 0.25, 0.5, 0.9] {
                let s = generate(kind, &input(800, depth, 3, Some(&text))).unwrap();
                let answer = &s.answers[0];
                let first = s.context.find(answer.as_str()).unwrap();
                let occurrences = s.context.matches(answer.as_str()).count();
                // The passkey sentence names its key twice; the needle once.
                assert_eq!(occurrences, if kind == TaskKind::Passkey { 2 } else { 1 }, "{kind:?}");
                let at = first as f64 / s.context.len() as f64;
                assert!((at - depth).abs() < 0.05, "{kind:?} depth {depth}: found at {at}");
                let n = words(&s.context);
                assert!((740..=800).contains(&n), "{kind:?}: {n} tokens");
            }
        }
    }

    #[test]
    fn task_names_round_trip_through_text_and_json() {
        for kind in TaskKind::all() {
            assert_eq!(kind.name().parse::<TaskKind>(), Ok(kind));
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{kind}\""));
            assert_eq!(serde_json::from_str::<TaskKind>(&format!("\"{kind}\"")).unwrap(), kind);
        }
        assert_eq!(TaskKind::all().count(), 14);
        let err = serde_json::from_str::<TaskKind>("\"niah_single\"").unwrap_err().to_string();
        assert!(
            err.contains("unknown task `niah_single`") && err.contains("niah_single_1"),
            "{err}"
        );
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(generate(TaskKind::Passkey, &input(500, 1.5, 1, None)).is_err());
        assert!(generate(TaskKind::Needle, &input(500, 0.5, 1, None)).is_err());
        assert!(generate(TaskKind::Passkey, &input(10, 0.5, 1, None)).is_err());
        let essay = TaskKind::Ruler(RulerTask::NiahSingle2);
        let err = generate(essay, &input(500, 0.0, 1, None)).unwrap_err().to_string();
        assert!(err.contains("--haystack"), "{err}");
        // 128 tokens of answer leave no room for a prompt in 100.
        let err = generate(TaskKind::Ruler(RulerTask::NiahSingle1), &input(100, 0.0, 1, None))
            .unwrap_err()
            .to_string();
        assert!(err.contains("too short"), "{err}");
    }
}
