//! RULER's synthetic tasks (Hsieh et al., 2024, "RULER: What's the Real Context Size of
//! Your Long-Context Language Models?"), generated as NVIDIA/RULER's
//! `scripts/data/synthetic/` generates them, with the settings of its `synthetic.yaml`, its
//! templates and answer prefixes, and scored by its `string_match_all`.
//!
//! A sample is sized as RULER sizes it: the prompt (context, question and answer prefix)
//! plus the tokens the answer may take fits the requested length, counted by the model's
//! tokenizer, and the haystack's size is found by bisection. Where these generators depart
//! from RULER (the essay corpus, the word lists, the sentence splitter) is said in
//! `docs/ruler.md`; its `qa_1` and `qa_2` need SQuAD and HotpotQA and are not here.

use rand::rngs::StdRng;

use crate::error::{EvalError, Result};
use crate::metrics::Metric;
use crate::sample::{Sample, TaskInput};

mod aggregation;
mod niah;
mod tracing;
mod words;

use niah::{Haystack, Kind, NiahConfig};

/// One of RULER's synthetic subtasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RulerTask {
    NiahSingle1,
    NiahSingle2,
    NiahSingle3,
    NiahMultikey1,
    NiahMultikey2,
    NiahMultikey3,
    NiahMultivalue,
    NiahMultiquery,
    /// Variable tracking: follow a chain of assignments.
    Vt,
    /// Common words extraction: the ten most common words of a numbered list.
    Cwe,
    /// Frequent words extraction: the three most frequent words of a coded text.
    Fwe,
}

impl RulerTask {
    /// Every subtask, in RULER's order.
    pub const ALL: [RulerTask; 11] = [
        RulerTask::NiahSingle1,
        RulerTask::NiahSingle2,
        RulerTask::NiahSingle3,
        RulerTask::NiahMultikey1,
        RulerTask::NiahMultikey2,
        RulerTask::NiahMultikey3,
        RulerTask::NiahMultivalue,
        RulerTask::NiahMultiquery,
        RulerTask::Vt,
        RulerTask::Cwe,
        RulerTask::Fwe,
    ];

    /// RULER's name of the subtask.
    pub fn name(self) -> &'static str {
        match self {
            RulerTask::NiahSingle1 => "niah_single_1",
            RulerTask::NiahSingle2 => "niah_single_2",
            RulerTask::NiahSingle3 => "niah_single_3",
            RulerTask::NiahMultikey1 => "niah_multikey_1",
            RulerTask::NiahMultikey2 => "niah_multikey_2",
            RulerTask::NiahMultikey3 => "niah_multikey_3",
            RulerTask::NiahMultivalue => "niah_multivalue",
            RulerTask::NiahMultiquery => "niah_multiquery",
            RulerTask::Vt => "vt",
            RulerTask::Cwe => "cwe",
            RulerTask::Fwe => "fwe",
        }
    }

    /// The subtask of that name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The subtask's place in [`RulerTask::ALL`].
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|&t| t == self).unwrap_or_default()
    }

    /// Whether the haystack is the essay corpus (`--haystack`, Moby-Dick by default).
    pub fn needs_haystack(self) -> bool {
        niah_config(self).is_some_and(|c| c.haystack == Haystack::Essay)
    }

    /// RULER's `tokens_to_generate`: what the answer may take, counted in the length.
    pub fn max_new_tokens(self) -> usize {
        match self {
            RulerTask::Vt => 30,
            RulerTask::Cwe => 120,
            RulerTask::Fwe => 50,
            _ => 128,
        }
    }
}

/// A niah subtask's settings (`synthetic.yaml`); `None` for the others.
fn niah_config(task: RulerTask) -> Option<NiahConfig> {
    use Haystack::{Essay, Needle, Noise};
    use Kind::{Numbers, Uuids, Words};
    let (haystack, key, value, num_keys, num_values, num_queries) = match task {
        RulerTask::NiahSingle1 => (Noise, Words, Numbers, 1, 1, 1),
        RulerTask::NiahSingle2 => (Essay, Words, Numbers, 1, 1, 1),
        RulerTask::NiahSingle3 => (Essay, Words, Uuids, 1, 1, 1),
        RulerTask::NiahMultikey1 => (Essay, Words, Numbers, 4, 1, 1),
        RulerTask::NiahMultikey2 => (Needle, Words, Numbers, 1, 1, 1),
        RulerTask::NiahMultikey3 => (Needle, Uuids, Uuids, 1, 1, 1),
        RulerTask::NiahMultivalue => (Essay, Words, Numbers, 1, 4, 1),
        RulerTask::NiahMultiquery => (Essay, Words, Numbers, 1, 1, 4),
        RulerTask::Vt | RulerTask::Cwe | RulerTask::Fwe => return None,
    };
    Some(NiahConfig { haystack, key, value, num_keys, num_values, num_queries })
}

/// A generated prompt in the runner's three parts, with the reference answers.
struct Prompt {
    context: String,
    question: String,
    answer_prefix: String,
    answers: Vec<String>,
}

impl Prompt {
    /// The prompt as the runner lays out a raw prompt, for counting its tokens.
    fn text(&self) -> String {
        format!("{}\n{}\n{}", self.context, self.question, self.answer_prefix)
    }
}

/// One sample of `task`, drawn from `rng`.
pub(crate) fn generate(task: RulerTask, input: &TaskInput<'_>, rng: StdRng) -> Result<Sample> {
    let max_new_tokens = task.max_new_tokens();
    let prompt = match (task, niah_config(task)) {
        (_, Some(config)) => niah::generate(config, input, max_new_tokens, rng)?,
        (RulerTask::Vt, _) => tracing::variable_tracking(input, max_new_tokens, rng)?,
        (RulerTask::Cwe, _) => aggregation::common_words(input, max_new_tokens, rng)?,
        _ => aggregation::frequent_words(input, max_new_tokens, rng)?,
    };
    // Where the first answer sits, as RULER records it; aggregation answers are everywhere.
    let depth = match task {
        RulerTask::Cwe | RulerTask::Fwe => None,
        _ => prompt.answers.first().and_then(|a| prompt.context.find(a.as_str())).map(|at| {
            prompt.context[..at].chars().count() as f64 / prompt.context.chars().count() as f64
        }),
    };
    Ok(Sample {
        id: format!("{}-{}-s{}", task.name(), input.length, input.seed),
        task: task.name().to_string(),
        context: prompt.context,
        question: prompt.question,
        answer_prefix: prompt.answer_prefix,
        answers: prompt.answers,
        max_new_tokens,
        depth,
        metric: Metric::StringMatchAll,
        all_classes: None,
    })
}

/// The prompt `build` makes from the most haystack units (words, lines, list entries) that
/// leave `max_new_tokens` of `input.length` for the answer, at least `min_units` of them:
/// RULER's bisection over the haystack size. `build` draws from its own copy of `rng`, so
/// one size always gives one prompt.
fn fit(
    input: &TaskInput<'_>,
    max_new_tokens: usize,
    min_units: usize,
    rng: &StdRng,
    build: impl Fn(usize, &mut StdRng) -> Result<Prompt>,
) -> Result<Prompt> {
    let budget = input.length.saturating_sub(max_new_tokens);
    let fits = |p: &Prompt| (input.count_tokens)(&p.text()) <= budget;
    let smallest = build(min_units, &mut rng.clone())?;
    if !fits(&smallest) {
        return Err(EvalError::Task(format!(
            "length {} is too short for this RULER task: its smallest prompt takes {} tokens \
             and the answer {max_new_tokens}",
            input.length,
            (input.count_tokens)(&smallest.text())
        )));
    }
    // A unit takes at least half a token (fwe's noise word `...` may share one with the
    // space before it), so no more than twice `budget` of them fit.
    let (mut lo, mut hi, mut best) = (min_units, budget.saturating_mul(2).max(min_units), smallest);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        let prompt = build(mid, &mut rng.clone())?;
        if fits(&prompt) {
            (lo, best) = (mid, prompt);
        } else {
            hi = mid - 1;
        }
    }
    Ok(best)
}

/// `items` put between `lines` in their order, each before a distinct line drawn uniformly:
/// RULER's insertion into line haystacks. (Items left over when there are fewer lines than
/// items, which the callers' minimum sizes rule out, go at the end.)
fn insert_at_random_lines(lines: Vec<String>, items: Vec<String>, rng: &mut StdRng) -> Vec<String> {
    let slots = lines.len().max(items.len());
    let mut at = rand::seq::index::sample(rng, slots, items.len()).into_vec();
    at.sort_unstable();
    let mut out = Vec::with_capacity(lines.len() + items.len());
    let mut items = items.into_iter();
    let mut next = at.into_iter().peekable();
    for (i, line) in lines.into_iter().enumerate() {
        if next.next_if_eq(&i).is_some() {
            out.extend(items.next());
        }
        out.push(line);
    }
    out.extend(items);
    out
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use super::*;
    use crate::tasks::{generate as generate_task, TaskKind};

    /// One token per whitespace-separated word, as a stand-in tokenizer.
    fn words(s: &str) -> usize {
        s.split_whitespace().count()
    }

    fn essay() -> String {
        (0..3000).map(|i| format!("Sentence number {i} tells of the sea and the whale. ")).collect()
    }

    fn sample(task: RulerTask, length: usize, seed: u64, corpus: &str) -> Sample {
        let input =
            TaskInput { length, depth: 0.0, seed, count_tokens: &words, haystack: Some(corpus) };
        generate_task(TaskKind::Ruler(task), &input).unwrap()
    }

    fn prompt_tokens(s: &Sample) -> usize {
        words(&format!("{}\n{}\n{}", s.context, s.question, s.answer_prefix))
    }

    #[test]
    fn every_subtask_fills_its_length_and_hides_every_answer() {
        let corpus = essay();
        for length in [1024, 4096] {
            for task in RulerTask::ALL {
                let s = sample(task, length, 1000, &corpus);
                let total = prompt_tokens(&s) + s.max_new_tokens;
                // Within one haystack unit (a noise line is 19 words) of the length.
                assert!((length - 40..=length).contains(&total), "{task:?} at {length}: {total}");
                assert_eq!(s.max_new_tokens, task.max_new_tokens());
                assert_eq!((s.task.as_str(), s.metric), (task.name(), Metric::StringMatchAll));
                for a in &s.answers {
                    assert!(
                        s.context.contains(a.as_str()),
                        "{task:?}: `{a}` is not in the context"
                    );
                }
                // The reference answers score 1, as RULER's string_match_all would.
                let said = s.answers.join(", ").to_uppercase();
                assert_eq!(s.metric.score(&said, &s.answers, None), 1.0, "{task:?}");
            }
        }
    }

    /// The needle of each answer sits once in the context, and a multikey distractor never
    /// names the asked key.
    #[test]
    fn niah_answers_are_their_needles_and_templates_follow_the_count() {
        let corpus = essay();
        for task in &RulerTask::ALL[..8] {
            let config = niah_config(*task).unwrap();
            let s = sample(*task, 2048, 1001, &corpus);
            let expected = config.num_values * config.num_queries;
            assert_eq!(s.answers.len(), expected, "{task:?}");
            for a in &s.answers {
                assert_eq!(s.context.matches(&format!(" is: {a}.")).count(), 1, "{task:?}");
            }
            let asked = s.question.split(" for ").nth(1).unwrap().split(" mentioned").next();
            let keys: Vec<&str> =
                asked.unwrap().split(", ").map(|k| k.trim_start_matches("and ")).collect();
            assert_eq!(keys.len(), config.num_queries, "{task:?}: {}", s.question);
            for k in keys {
                assert_eq!(s.context.matches(&format!(" for {k} is: ")).count(), config.num_values);
            }
            if expected == 1 {
                assert!(s.context.starts_with("A special magic "), "{task:?}");
                assert!(s.question.starts_with("What is the special magic "), "{task:?}");
                assert!(s.answer_prefix.ends_with(" is"), "{task:?}");
            } else {
                assert!(s.context.starts_with("Some special magic numbers are hidden"));
                assert!(s.question.starts_with("What are all the special magic numbers for "));
                assert!(s.answer_prefix.ends_with(" are"), "{task:?}");
            }
        }
    }

    #[test]
    fn needle_depths_vary_across_seeds_over_the_whole_context() {
        let corpus = essay();
        for task in [RulerTask::NiahSingle1, RulerTask::NiahSingle2, RulerTask::NiahMultikey2] {
            let depths: Vec<f64> =
                (1000..1016).map(|seed| sample(task, 1024, seed, &corpus).depth.unwrap()).collect();
            let distinct: BTreeSet<u64> = depths.iter().map(|d| (d * 1000.0) as u64).collect();
            let (low, high) =
                depths.iter().fold((1.0f64, 0.0f64), |(l, h), &d| (l.min(d), h.max(d)));
            assert!(distinct.len() >= 10 && low < 0.3 && high > 0.7, "{task:?}: {depths:?}");
        }
        assert_eq!(sample(RulerTask::Cwe, 1024, 1000, &corpus).depth, None);
    }

    /// Following the assignments from the value reaches exactly the answers.
    #[test]
    fn variable_tracking_chain_resolves_to_the_answers() {
        for seed in 1000..1005 {
            let s = sample(RulerTask::Vt, 2048, seed, "");
            let task_text = s.context.rsplit_once("following text.\n\n").unwrap().1;
            let assigned: HashMap<&str, &str> = task_text
                .lines()
                .filter_map(|l| l.strip_prefix("VAR ")?.split_once(" = "))
                .collect();
            let value: String = s.question.chars().filter(char::is_ascii_digit).collect();
            // A variable's value, following `VAR B = VAR A` to a number.
            let resolve = |name: &str| {
                let mut at = assigned.get(name).copied();
                while let Some(next) = at.and_then(|v| v.strip_prefix("VAR ")) {
                    at = assigned.get(next).copied();
                }
                at
            };
            let holding: BTreeSet<&str> =
                assigned.keys().copied().filter(|n| resolve(n) == Some(value.as_str())).collect();
            let answers: BTreeSet<&str> = s.answers.iter().map(String::as_str).collect();
            assert_eq!((holding, answers.len()), (answers, 5));
            // The solved example comes first, with its own three-letter chain and answers.
            assert!(s.context.starts_with("Memorize and track"));
            assert_eq!(s.context.matches("Memorize and track").count(), 2);
        }
    }

    /// Each word's count in `text`'s whitespace-separated `items`.
    fn counts<'a>(items: impl Iterator<Item = &'a str>) -> HashMap<&'a str, usize> {
        let mut c = HashMap::new();
        for w in items {
            *c.entry(w).or_default() += 1;
        }
        c
    }

    #[test]
    fn common_words_are_the_most_common_of_the_list() {
        for length in [1024, 4096] {
            let s = sample(RulerTask::Cwe, length, 1002, "");
            let list = s.context.rsplit_once("most often.\n").unwrap().1;
            // `1. word 2. word ...`: every second item is a word.
            let c = counts(list.split_whitespace().skip(1).step_by(2));
            assert_eq!(s.answers.len(), 10);
            let least_common = s.answers.iter().map(|a| c[a.as_str()]).min().unwrap();
            let most_other =
                c.iter().filter(|(w, _)| !s.answers.iter().any(|a| a == *w)).map(|(_, n)| *n);
            assert!(least_common > most_other.max().unwrap(), "at {length}");
            assert_eq!(least_common, if length < 4096 { 6 } else { 30 });
        }
    }

    #[test]
    fn frequent_words_are_ranks_two_to_four() {
        for length in [1024, 4096] {
            let s = sample(RulerTask::Fwe, length, 1003, "");
            let text = s.context.split_once("coded words. ").unwrap().1;
            let c = counts(text.split_whitespace());
            let mut ranked: Vec<(&str, usize)> = c.into_iter().collect();
            ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            assert_eq!(ranked[0].0, "...");
            let top: Vec<&str> = ranked[1..4].iter().map(|r| r.0).collect();
            assert_eq!(top, s.answers, "at {length}");
            assert!(ranked[0].1 > ranked[1].1 && ranked[3].1 > ranked[4].1, "{ranked:?}");
        }
    }

    #[test]
    fn names_and_settings_follow_rulers_config() {
        for t in RulerTask::ALL {
            assert_eq!(RulerTask::from_name(t.name()), Some(t));
            assert_eq!(RulerTask::ALL[t.index()], t);
        }
        assert_eq!(RulerTask::from_name("qa_1"), None);
        let essays: Vec<&str> =
            RulerTask::ALL.into_iter().filter(|t| t.needs_haystack()).map(|t| t.name()).collect();
        assert_eq!(
            essays,
            [
                "niah_single_2",
                "niah_single_3",
                "niah_multikey_1",
                "niah_multivalue",
                "niah_multiquery"
            ]
        );
    }
}
