//! Batched decode steps of the serving engine, without HTTP: for each count of concurrent
//! sequences, the time of an engine step where every sequence decodes (forward pass,
//! decode-time policy and sampling), the aggregate tokens/s, and where the forward pass's
//! time goes. Counts run in interleaved rounds; each keeps its fastest round.
//!
//!     cargo run --release -p kvmerger-engine --example batch_decode -- --sessions 1,4 --steps 48
//!
//! Default model, f16 KV cache, the file's weights for decode; prompts of about 90 tokens
//! (as the server benchmark's decode part sends).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvmerger_compress::{CompressionConfig, KvDtype};
use kvmerger_engine::{
    load_model, Engine, EngineConfig, Event, GenerationRequest, Part, RequestLimits,
    RequestOptions, SamplingConfig, StepProfile, WeightFormat, WeightFormats,
};

struct Args {
    sessions: Vec<usize>,
    steps: usize,
    rounds: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args { sessions: vec![1, 2, 4, 8], steps: 48, rounds: 3 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--sessions" => {
                args.sessions = value.split(',').map(str::parse).collect::<Result<_, _>>()?
            }
            "--steps" => args.steps = value.parse()?,
            "--rounds" => args.rounds = value.parse()?,
            _ => anyhow::bail!("unknown flag {flag} (--sessions, --steps, --rounds)"),
        }
    }
    Ok(args)
}

/// A prompt of six short sentences, distinct per `seed`.
fn prompt_text(seed: usize) -> String {
    let colours = ["red", "blue", "green", "amber", "violet", "grey", "white", "black"];
    let things =
        ["river", "mountain", "harbour", "library", "garden", "station", "market", "bridge"];
    (0..6)
        .map(|i| {
            format!(
                "Note {seed}-{i}: the {} {} was visited on day {}.",
                colours[(i * 3 + seed) % 8],
                things[(i * 5 + seed) % 8],
                (i * 7 + seed) % 31 + 1
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One measured round: wall time of `steps` all-decoding steps and the profile's parts.
struct Round {
    wall: Duration,
    parts: Vec<Duration>,
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let path = kvmerger_models::ensure_default_model()?;
    let formats = WeightFormats { prefill: WeightFormat::F32, decode: WeightFormat::File };
    let mut loaded = load_model(&path, formats)?;
    loaded.model.kv_dtype = KvDtype::F16;
    let profile = Arc::new(StepProfile::new());
    loaded.model.set_profile(Some(profile.clone()));
    let model = Arc::new(loaded.model);
    let prompts: Vec<Vec<u32>> = (0..*args.sessions.iter().max().unwrap_or(&1))
        .map(|i| loaded.tokenizer.encode(&prompt_text(100 + i), false))
        .collect::<Result<_, _>>()?;
    let mut best: Vec<Option<Round>> = args.sessions.iter().map(|_| None).collect();
    // Per round, each count's aggregate speed over the first count's in the same round: the
    // machine's speed drifts between rounds, and a round's counts run back to back.
    let mut paired: Vec<Vec<f64>> = args.sessions.iter().map(|_| Vec::new()).collect();
    for _ in 0..args.rounds {
        let mut first_per_token = None;
        for (i, (slot, &n)) in best.iter_mut().zip(&args.sessions).enumerate() {
            let mut engine = Engine::new(model.clone(), EngineConfig::default());
            let limits = RequestLimits::of(&model.config, None);
            for prompt in &prompts[..n] {
                let options = RequestOptions {
                    max_tokens: Some(args.steps + n + 1),
                    default_max_tokens: args.steps + n + 1,
                    sampling: SamplingConfig::default(),
                    compression: CompressionConfig::Full,
                    stop_tokens: vec![],
                    max_kv: None,
                    prefill_compression: None,
                    kv_dtype: None,
                };
                let request = GenerationRequest::new(prompt.clone(), options, &limits)?;
                engine.add(request).map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            // One prefill per step: after n steps every sequence decodes.
            for _ in 0..n {
                engine.step();
            }
            profile.reset();
            let start = Instant::now();
            for _ in 0..args.steps {
                let events = engine.step();
                let tokens = events.iter().filter(|(_, e)| matches!(e, Event::Token(_))).count();
                anyhow::ensure!(tokens == n, "a step decoded {tokens} tokens, not {n}");
            }
            let round =
                Round { wall: start.elapsed(), parts: Part::ALL.map(|p| profile.get(p)).to_vec() };
            let per_token = round.wall.as_secs_f64() / n as f64;
            let first = *first_per_token.get_or_insert(per_token);
            paired[i].push(first / per_token);
            if slot.as_ref().is_none_or(|b| round.wall < b.wall) {
                *slot = Some(round);
            }
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3 / args.steps as f64;
    let base = best[0].as_ref().map(|r| r.wall.as_secs_f64() / args.sessions[0] as f64);
    print!("| part (ms/step) |");
    args.sessions.iter().for_each(|n| print!(" {n} seq |"));
    println!();
    println!("|---|{}", "---:|".repeat(args.sessions.len()));
    for (i, part) in Part::ALL.iter().enumerate() {
        print!("| {} |", part.name());
        best.iter().flatten().for_each(|r| print!(" {:.3} |", ms(r.parts[i])));
        println!();
    }
    // Attention and RoPE run side by side for several sequences (their parts add each
    // sequence's time); the step's wall time less every other part is theirs plus the rest.
    let side_by_side = [Part::RopeAppend, Part::Attention];
    print!("| attention + rope + sampling + plumbing (wall) |");
    for r in best.iter().flatten() {
        let serial: Duration = Part::ALL
            .iter()
            .zip(&r.parts)
            .filter(|(p, _)| !side_by_side.contains(p))
            .map(|(_, d)| *d)
            .sum();
        print!(" {:.3} |", ms(r.wall.saturating_sub(serial)));
    }
    println!();
    print!("| **step** |");
    best.iter().flatten().for_each(|r| print!(" **{:.3}** |", ms(r.wall)));
    println!();
    print!("| aggregate tokens/s (vs first) |");
    for (r, &n) in best.iter().flatten().zip(&args.sessions) {
        let per_token = r.wall.as_secs_f64() / n as f64;
        print!(
            " {:.1} ({:.2}x) |",
            1.0 / (per_token / args.steps as f64),
            base.unwrap_or(per_token) / per_token
        );
    }
    println!();
    print!("| speed vs first, median of rounds (paired) |");
    for ratios in &mut paired {
        ratios.sort_by(f64::total_cmp);
        print!(" {:.2}x |", ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN));
    }
    println!();
    println!("(attention and rope rows add each sequence's time; the sequences run side by side)");
    Ok(())
}
