//! RULER's aggregation tasks: common words extraction (`common_words_extraction.py`: ten
//! words repeated often among words repeated rarely, in a numbered list, after one solved
//! example) and frequent words extraction (`freq_words_extraction.py`: coded words drawn
//! with Zipf frequencies; the answer is the three most frequent after the noise word).

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;

use super::{fit, words, Prompt};
use crate::error::Result;
use crate::sample::TaskInput;

/// RULER's `num_cw`: how many common words the answer names.
const COMMON: usize = 10;

const CWE_INSTRUCTION: &str = "Below is a numbered list of words. In these words, some appear \
                               more often than others. Memorize the ones that appear most often.";

/// `num_words` distinct words, the first [`COMMON`] repeated `common` times and the others
/// `uncommon` times, shuffled into RULER's numbered list (`1. word 2. word ...`); with the
/// common words. Plain words while there are enough, `adjective-noun` compounds beyond.
fn numbered_list(
    num_words: usize,
    common: usize,
    uncommon: usize,
    rng: &mut StdRng,
) -> (String, Vec<String>) {
    let plain: Vec<&str> = words::plain().collect();
    let drawn: Vec<String> = if num_words <= plain.len() {
        plain.choose_multiple(rng, num_words).map(|w| w.to_string()).collect()
    } else {
        let n = num_words.min(words::COMPOUNDS);
        rand::seq::index::sample(rng, words::COMPOUNDS, n)
            .into_iter()
            .map(words::compound)
            .collect()
    };
    let split = COMMON.min(drawn.len());
    let mut list: Vec<&str> = Vec::new();
    for (i, w) in drawn.iter().enumerate() {
        let times = if i < split { common } else { uncommon };
        list.extend(std::iter::repeat_n(w.as_str(), times));
    }
    list.shuffle(rng);
    (numbered(&list), drawn[..split].to_vec())
}

fn numbered(words: &[impl AsRef<str>]) -> String {
    let entries: Vec<String> =
        words.iter().enumerate().map(|(i, w)| format!("{}. {}", i + 1, w.as_ref())).collect();
    entries.join(" ")
}

/// One common-words sample: below 4,096 tokens RULER repeats words less (6 and 1 times, the
/// example 3 and 1) than from there on (30 and 3, the example 10 and 3).
pub(super) fn common_words(
    input: &TaskInput<'_>,
    max_new_tokens: usize,
    rng: StdRng,
) -> Result<Prompt> {
    let ((example_words, example_common, example_uncommon), (common, uncommon)) =
        if input.length < 4096 { ((20, 3, 1), (6, 1)) } else { ((40, 10, 3), (30, 3)) };
    let question = format!("Question: What are the {COMMON} most common words in the above list?");
    let answer_prefix =
        format!("Answer: The top {COMMON} words that appear most often in the list are:");
    fit(input, max_new_tokens, COMMON + 1, &rng, |n, rng| {
        let (example, example_answers) =
            numbered_list(example_words, example_common, example_uncommon, rng);
        let (list, answers) = numbered_list(n, common, uncommon, rng);
        Ok(Prompt {
            context: format!(
                "{CWE_INSTRUCTION}\n{example}\n{question}\n{answer_prefix} {}\n{CWE_INSTRUCTION}\n{list}",
                numbered(&example_answers)
            ),
            question: question.clone(),
            answer_prefix: answer_prefix.clone(),
            answers,
        })
    })
}

/// RULER's `coded_wordlen`.
const CODED_LEN: usize = 6;
/// RULER's Zipf exponent `alpha`, and zeta(2) = pi^2 / 6 its normaliser.
const ALPHA: f64 = 2.0;
const ZETA_ALPHA: f64 = std::f64::consts::PI * std::f64::consts::PI / 6.0;
/// Below this many words the four most frequent can tie with the fifth.
const MIN_CODED_WORDS: usize = 100;

/// One frequent-words sample: a vocabulary of one random six-letter word per 50 tokens, the
/// word of rank `k` repeated `floor(n k^-2 / zeta(2))` times; rank 1 is the noise word `...`,
/// and the answer is ranks 2 to 4.
pub(super) fn frequent_words(
    input: &TaskInput<'_>,
    max_new_tokens: usize,
    rng: StdRng,
) -> Result<Prompt> {
    let vocab_size = (input.length.saturating_sub(max_new_tokens) / 50).max(5);
    fit(input, max_new_tokens, MIN_CODED_WORDS, &rng, |n, rng| {
        let mut vocab: Vec<String> = Vec::with_capacity(vocab_size);
        while vocab.len() < vocab_size {
            let w: String =
                (0..CODED_LEN).map(|_| char::from(rng.random_range(b'a'..=b'z'))).collect();
            if !vocab.contains(&w) {
                vocab.push(w);
            }
        }
        vocab[0] = "...".into();
        let mut text: Vec<&str> = Vec::new();
        for (k, w) in vocab.iter().enumerate() {
            let times = (n as f64 * ((k + 1) as f64).powf(-ALPHA) / ZETA_ALPHA) as usize;
            text.extend(std::iter::repeat_n(w.as_str(), times));
        }
        text.shuffle(rng);
        Ok(Prompt {
            context: format!(
                "Read the following coded text and track the frequency of each coded word. Find \
                 the three most frequently appeared coded words. {}",
                text.join(" ")
            ),
            question: "Question: Do not provide any explanation. Please ignore the dots '....'. \
                       What are the three most frequently appeared words in the above coded text?"
                .into(),
            answer_prefix: "Answer: According to the coded text above, the three most frequently \
                            appeared words are:"
                .into(),
            answers: vocab[1..4].to_vec(),
        })
    })
}
