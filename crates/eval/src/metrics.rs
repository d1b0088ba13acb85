//! Answer-scoring metrics: LongBench's (token F1, ROUGE-L, classification, retrieval,
//! count, edit similarity) and the containment scores of passkey, needle and RULER tasks.
//!
//! The LongBench functions follow its `metrics.py` line by line, quirks included, so that
//! scores are comparable with published numbers; each function says where it departs.
//! Only the English metrics are here (the Chinese ones need a word segmenter).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How the predictions of one dataset (one task, one JSONL file) are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Token F1 after [`normalize_answer`] ([`qa_f1`]).
    QaF1,
    /// ROUGE-L F-measure as the `rouge` package computes it ([`rouge_l`]).
    RougeL,
    /// LongBench's classification accuracy; needs the list of classes ([`classification_score`]).
    Classification,
    /// LongBench's passage-retrieval score ([`retrieval_score`]).
    Retrieval,
    /// LongBench's passage-count score ([`count_score`]).
    Count,
    /// Edit similarity of the first code line ([`code_sim_score`]).
    CodeSim,
    /// 1 if the prediction contains the answer ([`exact_contains`]): passkey and needle.
    Contains,
    /// RULER's `string_match_all` ([`string_match_all`]): the share of the answers the
    /// prediction contains, ignoring case; its niah, vt, cwe and fwe tasks.
    StringMatchAll,
    /// Perplexity of a reference continuation: the runner computes it from the model's
    /// log-probabilities, so there is no text to score and [`Metric::score`] returns 0.
    Perplexity,
}

impl Metric {
    /// Every metric, in declaration order.
    pub const ALL: [Metric; 9] = [
        Metric::QaF1,
        Metric::RougeL,
        Metric::Classification,
        Metric::Retrieval,
        Metric::Count,
        Metric::CodeSim,
        Metric::Contains,
        Metric::StringMatchAll,
        Metric::Perplexity,
    ];

    /// The metric's name, as written in JSON and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Metric::QaF1 => "qa_f1",
            Metric::RougeL => "rouge_l",
            Metric::Classification => "classification",
            Metric::Retrieval => "retrieval",
            Metric::Count => "count",
            Metric::CodeSim => "code_sim",
            Metric::Contains => "contains",
            Metric::StringMatchAll => "string_match_all",
            Metric::Perplexity => "perplexity",
        }
    }

    /// Whether scoring needs the dataset's list of classes (`all_classes`).
    pub fn needs_classes(self) -> bool {
        self == Metric::Classification
    }

    /// The metric LongBench uses for one of its English datasets (`hotpotqa`, `gov_report`,
    /// `trec`, `lcc`, ...); `None` for the Chinese datasets and unknown names.
    pub fn for_longbench_dataset(dataset: &str) -> Option<Metric> {
        Some(match dataset {
            "narrativeqa" | "qasper" | "multifieldqa_en" | "hotpotqa" | "2wikimqa" | "musique"
            | "triviaqa" => Metric::QaF1,
            "gov_report" | "qmsum" | "multi_news" | "samsum" => Metric::RougeL,
            "trec" => Metric::Classification,
            "passage_retrieval_en" => Metric::Retrieval,
            "passage_count" => Metric::Count,
            "lcc" | "repobench-p" => Metric::CodeSim,
            _ => return None,
        })
    }

    /// Scores `prediction` against the reference `answers`.
    ///
    /// [`Metric::StringMatchAll`] returns the share of `answers` found in the prediction; every
    /// other metric returns the best score over the answers, as LongBench does. No answers
    /// score 0, and so does [`Metric::Classification`] without `all_classes`.
    pub fn score(
        self,
        prediction: &str,
        answers: &[String],
        all_classes: Option<&[String]>,
    ) -> f64 {
        let best = |f: &dyn Fn(&str) -> f64| answers.iter().map(|a| f(a)).fold(0.0, f64::max);
        match self {
            Metric::QaF1 => best(&|a| qa_f1(prediction, a)),
            Metric::RougeL => best(&|a| rouge_l(prediction, a)),
            Metric::Classification => match all_classes {
                Some(classes) => best(&|a| classification_score(prediction, a, classes)),
                None => 0.0,
            },
            Metric::Retrieval => best(&|a| retrieval_score(prediction, a)),
            Metric::Count => best(&|a| count_score(prediction, a)),
            Metric::CodeSim => best(&|a| code_sim_score(prediction, a)),
            Metric::Contains => best(&|a| exact_contains(prediction, a)),
            Metric::StringMatchAll => string_match_all(prediction, answers),
            Metric::Perplexity => 0.0,
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A metric name that is not one of [`Metric::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown metric `{name}` (expected one of: {})", Metric::ALL.map(Metric::name).join(", "))]
pub struct UnknownMetric {
    /// The name that was given.
    pub name: String,
}

impl FromStr for Metric {
    type Err = UnknownMetric;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Metric::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| UnknownMetric { name: s.to_string() })
    }
}

/// LongBench's (and SQuAD's) answer normalisation: lowercase, drop ASCII punctuation, drop
/// the articles `a`, `an`, `the` where they stand as words, collapse whitespace.
pub fn normalize_answer(s: &str) -> String {
    let cleaned: String = s.to_lowercase().chars().filter(|c| !c.is_ascii_punctuation()).collect();
    // `re.sub(r"\b(a|an|the)\b", " ", text)`: replace whole-word articles by a space.
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut without_articles = String::with_capacity(cleaned.len());
    let mut rest = cleaned.as_str();
    while let Some(first) = rest.chars().next() {
        let word_run = is_word(first);
        let end = rest.find(|c: char| is_word(c) != word_run).unwrap_or(rest.len());
        let (run, tail) = rest.split_at(end);
        if word_run && matches!(run, "a" | "an" | "the") {
            without_articles.push(' ');
        } else {
            without_articles.push_str(run);
        }
        rest = tail;
    }
    without_articles.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Token-level F1 of two token lists, counting repeated tokens (multiset intersection).
fn token_f1(prediction: &[&str], reference: &[&str]) -> f64 {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for t in reference {
        *counts.entry(t).or_default() += 1;
    }
    let mut same = 0usize;
    for t in prediction {
        if let Some(c) = counts.get_mut(t).filter(|c| **c > 0) {
            *c -= 1;
            same += 1;
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / prediction.len() as f64;
    let recall = same as f64 / reference.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// LongBench `qa_f1_score`: token F1 between the normalised prediction and answer.
pub fn qa_f1(prediction: &str, answer: &str) -> f64 {
    let (p, a) = (normalize_answer(prediction), normalize_answer(answer));
    token_f1(&p.split_whitespace().collect::<Vec<_>>(), &a.split_whitespace().collect::<Vec<_>>())
}

/// The `rouge` package's sentences: split at `.`, drop empty pieces, collapse whitespace
/// (a piece of only spaces survives as an empty sentence, as there).
fn rouge_sentences(text: &str) -> Vec<Vec<&str>> {
    text.split('.')
        .filter(|piece| !piece.is_empty())
        .map(|piece| {
            let words: Vec<&str> = piece.split_whitespace().collect();
            // `"".split(" ")` is `[""]` in Python: an empty sentence is one empty word.
            if words.is_empty() {
                vec![""]
            } else {
                words
            }
        })
        .collect()
}

/// The words of `x` on one longest common subsequence with `y`, reconstructed the way the
/// `rouge` package does (its choice among equally long subsequences decides the score).
fn lcs_words<'a>(x: &[&'a str], y: &[&str]) -> Vec<&'a str> {
    let (n, m) = (x.len(), y.len());
    let mut table = vec![vec![0usize; m + 1]; n + 1];
    for i in 1..=n {
        for j in 1..=m {
            table[i][j] = if x[i - 1] == y[j - 1] {
                table[i - 1][j - 1] + 1
            } else {
                table[i - 1][j].max(table[i][j - 1])
            };
        }
    }
    let (mut i, mut j, mut words) = (n, m, Vec::new());
    while i > 0 && j > 0 {
        if x[i - 1] == y[j - 1] {
            words.push(x[i - 1]);
            i -= 1;
            j -= 1;
        } else if table[i - 1][j] > table[i][j - 1] {
            i -= 1;
        } else {
            j -= 1;
        }
    }
    words
}

/// ROUGE-L F-measure as the `rouge` package (used by LongBench) computes `rouge-l` `f`:
/// summary-level union LCS over `.`-separated sentences, with words counted as sets
/// (its default `exclusive=True`), so a repeated word counts once.
///
/// With `m` distinct reference words, `n` distinct prediction words and `u` the distinct
/// words on the union of the sentence-pair LCSs: `r = u/m`, `p = u/n`,
/// `f = 2pr / (p + r + 1e-8)`. An empty prediction or reference scores 0 (the package
/// raises, and LongBench scores 0).
pub fn rouge_l(prediction: &str, reference: &str) -> f64 {
    let (hyp, refs) = (rouge_sentences(prediction), rouge_sentences(reference));
    if hyp.is_empty() || refs.is_empty() {
        return 0.0;
    }
    let distinct = |sentences: &[Vec<&str>]| {
        sentences.iter().flatten().copied().collect::<BTreeSet<&str>>().len()
    };
    let (m, n) = (distinct(&refs), distinct(&hyp));
    let union: BTreeSet<&str> =
        refs.iter().flat_map(|r| hyp.iter().flat_map(move |h| lcs_words(r, h))).collect();
    let u = union.len() as f64;
    let (r, p) = (u / m as f64, u / n as f64);
    2.0 * (p * r) / (p + r + 1e-8)
}

/// LongBench `classification_score`: the classes named in the prediction, less those that
/// are part of (but not equal to) the answer; `1/len` of that list if the answer is in it.
///
/// The pruning loop keeps LongBench's quirk of removing list items while iterating over
/// the list, which skips the item after each removal.
pub fn classification_score(prediction: &str, answer: &str, all_classes: &[String]) -> f64 {
    let mut matches: Vec<&str> =
        all_classes.iter().map(String::as_str).filter(|c| prediction.contains(c)).collect();
    let mut i = 0;
    while i < matches.len() {
        let term = matches[i];
        if answer.contains(term) && term != answer {
            // `list.remove` drops the first equal item, which precedes or is item `i`.
            if let Some(first) = matches.iter().position(|m| *m == term) {
                matches.remove(first);
            }
        }
        i += 1;
    }
    if matches.contains(&answer) {
        1.0 / matches.len() as f64
    } else {
        0.0
    }
}

/// The runs of ASCII digits in `text` (`re.findall(r"\d+", text)`, ASCII digits only).
fn digit_runs(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !c.is_ascii_digit()).filter(|run| !run.is_empty())
}

/// The share of the numbers in `prediction` that equal `expected`; 0 without numbers.
fn share_of_numbers_equal(prediction: &str, expected: &str) -> f64 {
    let (mut total, mut right) = (0usize, 0usize);
    for number in digit_runs(prediction) {
        total += 1;
        right += usize::from(number == expected);
    }
    if total == 0 {
        0.0
    } else {
        right as f64 / total as f64
    }
}

/// LongBench `retrieval_score`: the paragraph number in the answer (`Paragraph 12`) as a
/// share of all numbers in the prediction. An answer without `Paragraph <n>` scores 0
/// (LongBench would crash).
pub fn retrieval_score(prediction: &str, answer: &str) -> f64 {
    const PREFIX: &str = "Paragraph ";
    let id = answer.match_indices(PREFIX).find_map(|(at, _)| {
        let tail = &answer[at + PREFIX.len()..];
        let end = tail.find(|c: char| !c.is_ascii_digit()).unwrap_or(tail.len());
        (end > 0).then(|| &tail[..end])
    });
    id.map_or(0.0, |id| share_of_numbers_equal(prediction, id))
}

/// LongBench `count_score`: the share of the numbers in the prediction equal to the answer.
pub fn count_score(prediction: &str, answer: &str) -> f64 {
    share_of_numbers_equal(prediction, answer)
}

/// `fuzz.ratio` of `fuzzywuzzy` (with `python-Levenshtein`) divided by 100: the Indel
/// similarity `2 * LCS / (len_a + len_b)` over characters, rounded to whole percent (ties
/// to even, as Python's `round`); 0 if either string is empty.
pub fn edit_similarity(a: &str, b: &str) -> f64 {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    let mut prev = vec![0usize; b.len() + 1];
    let mut row = vec![0usize; b.len() + 1];
    for ca in &a {
        for (j, cb) in b.iter().enumerate() {
            row[j + 1] = if ca == cb { prev[j] + 1 } else { prev[j + 1].max(row[j]) };
        }
        std::mem::swap(&mut prev, &mut row);
    }
    let lcs = prev[b.len()] as f64;
    let ratio = 2.0 * lcs / (a.len() + b.len()) as f64;
    (100.0 * ratio).round_ties_even() / 100.0
}

/// LongBench `code_sim_score`: [`edit_similarity`] between the answer and the first line of
/// the prediction that holds no `` ` ``, `#` or `//` (no fence or comment), after dropping
/// leading newlines; an empty line if there is none.
pub fn code_sim_score(prediction: &str, answer: &str) -> f64 {
    let first_code_line = prediction
        .trim_start_matches('\n')
        .split('\n')
        .find(|line| !line.contains('`') && !line.contains('#') && !line.contains("//"))
        .unwrap_or("");
    edit_similarity(first_code_line, answer)
}

/// 1 if `prediction` contains `answer` verbatim (case-sensitive), else 0; an empty answer
/// matches nothing.
pub fn exact_contains(prediction: &str, answer: &str) -> f64 {
    if !answer.is_empty() && prediction.contains(answer) {
        1.0
    } else {
        0.0
    }
}

/// RULER's `string_match_all`: the share of `answers` that `prediction` contains, both
/// lowercased; 0 without answers. (RULER's score is this times 100, averaged over samples;
/// its prediction clean-up, stripping and control characters turned into newlines, cannot
/// change a containment.) An empty answer is contained in anything, as in RULER.
pub fn string_match_all(prediction: &str, answers: &[String]) -> f64 {
    if answers.is_empty() {
        return 0.0;
    }
    let prediction = prediction.to_lowercase();
    let found = answers.iter().filter(|a| prediction.contains(&a.to_lowercase())).count();
    found as f64 / answers.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn normalisation_drops_case_punctuation_articles_and_spacing() {
        assert_eq!(normalize_answer("The  Cat, an Apple & a dog!"), "cat apple dog");
        // Articles go only as whole words; punctuation goes first, so "the-end" is one word.
        assert_eq!(normalize_answer("Theater anthem the-end"), "theater anthem theend");
        assert_eq!(normalize_answer("   "), "");
    }

    #[test]
    fn qa_f1_matches_hand_computed_values() {
        // "the cat sat on the mat." -> [cat sat on mat]; "A cat sat on a hat yesterday" ->
        // [cat sat on hat yesterday]. Common: cat, sat, on = 3. P = 3/4, R = 3/5,
        // F1 = 2 * 0.75 * 0.6 / 1.35 = 2/3.
        assert!(close(qa_f1("The cat sat on the mat.", "A cat sat on a hat yesterday"), 2.0 / 3.0));
        // Repeated tokens count as a multiset: [dog dog cat] vs [dog cat cat] share dog x1
        // and cat x1 = 2. P = R = 2/3, F1 = 2/3.
        assert!(close(qa_f1("dog dog cat", "dog cat cat"), 2.0 / 3.0));
        assert_eq!(qa_f1("Paris", "Paris."), 1.0);
        assert_eq!(qa_f1("", "Paris"), 0.0);
        assert_eq!(qa_f1("The", "a"), 0.0);
    }

    #[test]
    fn rouge_l_matches_hand_computed_values() {
        // One sentence each. Reference words (distinct): the cat was under bed -> m = 5.
        // Prediction words (distinct): the cat was found under bed -> n = 6. The LCS is
        // "the cat was under the bed", whose distinct words are 5. r = 5/5, p = 5/6,
        // f = 2 * (5/6) / (5/6 + 1) = 10/11.
        assert!(close(
            rouge_l("the cat was found under the bed", "the cat was under the bed"),
            10.0 / 11.0
        ));
        // The package's docstring example: reference "a b c d e"; prediction sentences
        // "a b f g h" and "a c h i e". LCS with the first: a b; with the second: a c e.
        // Union {a b c e} = 4, m = 5, n = |{a b f g h c i e}| = 8.
        // r = 0.8, p = 0.5, f = 0.8 / 1.3 = 8/13.
        assert!(close(rouge_l("a b f g h. a c h i e", "a b c d e"), 8.0 / 13.0));
        assert!(close(rouge_l("same words here", "same words here"), 1.0));
        assert_eq!(rouge_l("", "anything"), 0.0);
        assert_eq!(rouge_l("...", "anything"), 0.0);
        assert_eq!(rouge_l("nothing shared", "other words"), 0.0);
    }

    #[test]
    fn classification_matches_longbench_including_its_pruning_quirk() {
        let classes = strings(&["Human", "Human being", "Location"]);
        // Named: Human, Human being. "Human" is part of the answer "Human being": pruned.
        // [Human being] -> 1/1.
        assert_eq!(classification_score("It is a Human being", "Human being", &classes), 1.0);
        // Named: Human, Human being, Location; none is part of "Location" -> 1/3.
        assert!(close(
            classification_score("Location or Human being", "Location", &classes),
            1.0 / 3.0
        ));
        assert_eq!(classification_score("Location", "Human being", &classes), 0.0);
        // The quirk: [New, York, New York City]; removing "New" shifts "York" into the slot
        // just visited, so it is skipped and stays: 1/2, not 1.
        let cities = strings(&["New", "York", "New York City"]);
        assert_eq!(classification_score("New York City", "New York City", &cities), 0.5);
    }

    #[test]
    fn retrieval_and_count_share_the_numbers_rule() {
        // Numbers in the prediction: 12 and 3; the answer's paragraph is 12 -> 1/2.
        assert_eq!(retrieval_score("Paragraph 12, or maybe Paragraph 3", "Paragraph 12"), 0.5);
        assert_eq!(retrieval_score("Paragraph 12", "Paragraph 12"), 1.0);
        assert_eq!(retrieval_score("no numbers", "Paragraph 12"), 0.0);
        assert_eq!(retrieval_score("12", "no paragraph here"), 0.0);
        // The first "Paragraph" followed by digits wins.
        assert_eq!(retrieval_score("7", "Paragraph x, Paragraph 7"), 1.0);
        // Numbers: 4 and 10; answer 4 -> 1/2.
        assert_eq!(count_score("There are 4 unique paragraphs out of 10", "4"), 0.5);
        assert_eq!(count_score("I count 14", "4"), 0.0);
    }

    #[test]
    fn edit_similarity_matches_hand_computed_values() {
        // "x = a + b" vs "x = a + c": 9 chars each, LCS "x = a + " = 8 chars.
        // 2 * 8 / 18 = 0.8889 -> 89% -> 0.89.
        assert_eq!(edit_similarity("x = a + b", "x = a + c"), 0.89);
        // "kitten" vs "sitting": LCS "ittn" = 4, 2 * 4 / 13 = 0.6154 -> 62% -> 0.62.
        assert_eq!(edit_similarity("kitten", "sitting"), 0.62);
        // "ab" vs "abcdefgh": LCS 2, 4 / 10 = 0.4.
        assert_eq!(edit_similarity("ab", "abcdefgh"), 0.4);
        // "abc" vs "abcde": 6 / 8 = 0.75 exactly.
        assert_eq!(edit_similarity("abc", "abcde"), 0.75);
        // 1/8 = 12.5% rounds half to even: 12% ("a" vs "abcdefg": 2 / 8 = 0.25 -> 25).
        // "a" vs "abcdefghijklmno" (16 chars in all): 2/16 = 12.5% -> 0.12.
        assert_eq!(edit_similarity("a", "abcdefghijklmno"), 0.12);
        assert_eq!(edit_similarity("", "x"), 0.0);
        assert_eq!(edit_similarity("é", "é"), 1.0);
    }

    #[test]
    fn code_similarity_scores_the_first_code_line() {
        let prediction = "\n\n```python\n# add them\nx = a + b\nreturn x";
        assert_eq!(code_sim_score(prediction, "x = a + c"), 0.89);
        assert_eq!(code_sim_score("// only comments\n# here", "x"), 0.0);
    }

    #[test]
    fn containment_scores() {
        assert_eq!(exact_contains("The pass key is 48213.", "48213"), 1.0);
        assert_eq!(exact_contains("The pass key is 4821.", "48213"), 0.0);
        assert_eq!(exact_contains("anything", ""), 0.0);
    }

    /// Cases worked by hand from RULER's `string_match_all` (`r.lower() in pred.lower()`,
    /// averaged over the references).
    #[test]
    fn string_match_all_matches_rulers() {
        let answers = strings(&["111", "222", "333", "444"]);
        assert_eq!(string_match_all("111 and 333", &answers), 0.5);
        assert_eq!(string_match_all("111", &[]), 0.0);
        // Case is ignored both ways; a reference inside a longer word still counts.
        let words = strings(&["Bold-Apple", "zebra", "ARC"]);
        assert!(close(string_match_all("bold-apple, ZEBRA, search", &words), 1.0));
        assert!(close(string_match_all("The answer is bold-apple.", &words), 1.0 / 3.0));
        // Each reference counts once, however often it appears.
        assert!(close(string_match_all("zebra zebra zebra", &words), 1.0 / 3.0));
        assert_eq!(string_match_all("", &words), 0.0);
        // An empty reference: Python's `"" in pred` is True.
        assert_eq!(string_match_all("x", &strings(&[""])), 1.0);
    }

    #[test]
    fn metric_takes_the_best_answer_except_string_match_all() {
        let answers = strings(&["cat", "cat sat"]);
        // F1 against "cat": P = 1/2, R = 1, F1 = 2/3; against "cat sat": 1. Max = 1.
        assert_eq!(Metric::QaF1.score("cat sat", &answers, None), 1.0);
        assert_eq!(Metric::QaF1.score("cat sat", &[], None), 0.0);
        assert_eq!(Metric::StringMatchAll.score("Cat only", &strings(&["cat", "dog"]), None), 0.5);
        let classes = strings(&["cat", "dog"]);
        assert_eq!(Metric::Classification.score("dog", &strings(&["dog"]), Some(&classes)), 1.0);
        assert_eq!(Metric::Classification.score("dog", &strings(&["dog"]), None), 0.0);
    }

    #[test]
    fn metric_names_round_trip_through_text_and_json() {
        for m in Metric::ALL {
            assert_eq!(m.name().parse::<Metric>(), Ok(m));
            assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{}\"", m.name()));
        }
        let err = "f1".parse::<Metric>().unwrap_err();
        assert!(err.to_string().contains("qa_f1"), "{err}");
        assert_eq!(Metric::for_longbench_dataset("hotpotqa"), Some(Metric::QaF1));
        assert_eq!(Metric::for_longbench_dataset("lcc"), Some(Metric::CodeSim));
        assert_eq!(Metric::for_longbench_dataset("dureader"), None);
    }
}
