//! RULER's variable tracking (`variable_tracking.py`, one chain of four hops): `VAR A =
//! 12345`, `VAR B = VAR A`, ... hidden between noise lines; the answer is every variable
//! that ends up holding the value. A solved example with three-letter names comes first.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{fit, insert_at_random_lines, Prompt};
use crate::error::Result;
use crate::sample::{TaskInput, PASSKEY_FILLER};

/// RULER's `num_hops`: assignments after the first.
const HOPS: usize = 4;
/// The solved example's length in tokens (RULER fits it to 500).
const EXAMPLE_TOKENS: usize = 500;

/// Variable names (`len` uppercase letters, all distinct) and the statements that chain
/// them to a five-digit value.
struct Chain {
    names: Vec<String>,
    value: String,
    statements: Vec<String>,
}

impl Chain {
    fn random(len: usize, rng: &mut StdRng) -> Self {
        let mut names: Vec<String> = Vec::with_capacity(HOPS + 1);
        while names.len() < HOPS + 1 {
            let name: String =
                (0..len).map(|_| char::from(rng.random_range(b'A'..=b'Z'))).collect();
            if !names.contains(&name) {
                names.push(name);
            }
        }
        // `np.random.randint(10000, 99999)`, whose upper end is exclusive.
        let value = rng.random_range(10_000..99_999).to_string();
        let mut statements = vec![format!("VAR {} = {value}", names[0])];
        statements.extend(names.windows(2).map(|w| format!("VAR {} = VAR {}", w[1], w[0])));
        Self { names, value, statements }
    }

    /// The task's prompt with the chain among `noise_lines` filler lines, after `shown`.
    fn prompt(self, shown: &str, noise_lines: usize, rng: &mut StdRng) -> Prompt {
        let lines = vec![PASSKEY_FILLER.trim_end().to_string(); noise_lines];
        let haystack = insert_at_random_lines(lines, self.statements, rng).join("\n");
        let value = &self.value;
        Prompt {
            context: format!(
                "{shown}Memorize and track the chain(s) of variable assignment hidden in the \
                 following text.\n\n{haystack}"
            ),
            question: format!(
                "Question: Find all variables that are assigned the value {value} in the text \
                 above."
            ),
            answer_prefix: format!(
                "Answer: According to the chain(s) of variable assignment in the text above, {} \
                 variables are assigned the value {value}, they are: ",
                self.names.len()
            ),
            answers: self.names,
        }
    }
}

/// One sample, fitted to `input.length` tokens with its solved example.
pub(super) fn variable_tracking(
    input: &TaskInput<'_>,
    max_new_tokens: usize,
    mut rng: StdRng,
) -> Result<Prompt> {
    // The example takes at most half of a short context, so small lengths still fit a task.
    let example_input = TaskInput { length: EXAMPLE_TOKENS.min(input.length / 2), ..*input };
    let example_rng = StdRng::seed_from_u64(rng.random());
    let example = fit(&example_input, 0, HOPS + 1, &example_rng, |n, rng| {
        Ok(Chain::random(3, rng).prompt("", n, rng))
    })?;
    // Shown as the runner lays out a prompt, then answered.
    let shown = format!(
        "{}\n{}\n{}{}\n\n",
        example.context,
        example.question,
        example.answer_prefix,
        example.answers.join(" ")
    );
    fit(input, max_new_tokens, HOPS + 1, &rng, |n, rng| {
        Ok(Chain::random(5, rng).prompt(&shown, n, rng))
    })
}
