//! What compressing during the served chunked prefill costs against compressing once after
//! the prompt: mean KL(full || method) over the full cache's greedy answer, teacher-forced,
//! on development samples (passkey and single-needle, question read after compression).
//!
//! ```sh
//! cargo run --release -p kvmerger-eval --example prefill_compression_kl -- \
//!     [MODEL.gguf] [--length 2000] [--chunk 256] [--seeds 2]
//! ```

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

use kvmerger_compress::{Budget, CompressionConfig};
use kvmerger_engine::{
    load_model, GenerationRequest, Logits, PrefillCompression, PrefillOptions, RequestLimits,
    RequestOptions, Sampler, SamplingConfig, Sequence, Session, WeightFormat, WeightFormats,
};
use kvmerger_eval::ruler::RulerTask;
use kvmerger_eval::runner::{mean_kl, prompt_texts, teacher_forced, RunOptions};
use kvmerger_eval::tasks::{generate, TaskInput, TaskKind};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, default: usize| -> Result<usize> {
        match args.iter().position(|a| a == name) {
            Some(at) => Ok(args
                .get(at + 1)
                .ok_or(format!("{name} needs a value"))?
                .parse()
                .map_err(|_| format!("{name} must be a number"))?),
            None => Ok(default),
        }
    };
    let (length, chunk, seeds) =
        (flag("--length", 2000)?, flag("--chunk", 256)?, flag("--seeds", 2)?);
    let path = match args.first().filter(|a| !a.starts_with("--")) {
        Some(p) => p.into(),
        None => kvmerger_models::default_model_path(),
    };
    let formats = WeightFormats { prefill: WeightFormat::F32, decode: WeightFormat::F32 };
    let model = load_model(&path, formats)?;
    let tok = &model.tokenizer;
    let count = |s: &str| tok.encode(s, true).map_or(0, |t| t.len());
    let methods: Vec<CompressionConfig> = ["kvmerger", "h2o", "snapkv"]
        .iter()
        .map(|m| CompressionConfig::from_cli(m, Some(Budget::Ratio(0.35)), &[]))
        .collect::<std::result::Result<_, _>>()?;
    println!("| sample | method | KL once | KL incremental | compressions during prefill |");
    println!("|---|---|---:|---:|---:|");
    let mut totals = vec![(0.0, 0.0); methods.len()];
    let mut n = 0;
    for kind in [TaskKind::Passkey, TaskKind::Ruler(RulerTask::NiahSingle1)] {
        for seed in 0..seeds as u64 {
            let input =
                TaskInput { length, depth: 0.5, seed, count_tokens: &count, haystack: None };
            let sample = generate(kind, &input)?;
            let (context, question) = prompt_texts(&model, &sample, RunOptions::default())?;
            let context = tok.encode(&context, true)?;
            let question = tok.encode(&question, false)?;
            // The reference: the full cache's greedy answer.
            let mut full = Session::new(&model.model, &CompressionConfig::Full)?;
            full.prefill(&context)?;
            let logits = full.extend(&question, Logits::Last)?.swap_remove(0);
            let mut greedy = Sampler::new(SamplingConfig::default());
            let answer = full.generate(logits, 16, &mut greedy, &tok.eos_ids(), |_| true)?;
            let mut reference = Session::new(&model.model, &CompressionConfig::Full)?;
            let first = reference.prefill(&context)?;
            let reference = teacher_forced(reference, first, &question, &answer)?;
            for (m, method) in methods.iter().enumerate() {
                let mut kl = [0.0; 2];
                let mut compressions = 0;
                for (i, mode) in [PrefillCompression::Once, PrefillCompression::Incremental]
                    .into_iter()
                    .enumerate()
                {
                    let options = RequestOptions {
                        max_tokens: Some(answer.len().max(1) + question.len()),
                        default_max_tokens: 1,
                        sampling: SamplingConfig::default(),
                        compression: method.clone(),
                        stop_tokens: vec![],
                        max_kv: None,
                        prefill_compression: None,
                        kv_dtype: None,
                    };
                    let limits = RequestLimits::of(&model.model.config, None);
                    let request = GenerationRequest::new(context.clone(), options, &limits)?;
                    let (session, first) = served_prefill(&model.model, request, chunk, mode)?;
                    compressions = compressions.max(session.1);
                    let forced = teacher_forced(session.0, first, &question, &answer)?;
                    kl[i] = mean_kl(&reference.log_probs, &forced.log_probs);
                }
                totals[m].0 += kl[0];
                totals[m].1 += kl[1];
                println!(
                    "| {} | {} | {:.4} | {:.4} | {compressions} |",
                    sample.id,
                    method.label(),
                    kl[0],
                    kl[1]
                );
            }
            n += 1;
        }
    }
    for (method, (once, inc)) in methods.iter().zip(totals) {
        println!(
            "| mean of {n} | {} | {:.4} | {:.4} | |",
            method.label(),
            once / n as f64,
            inc / n as f64
        );
    }
    Ok(())
}

/// Prefills `request` in chunks of `chunk`, compressing as `mode` says (the server's
/// prefill, which every command shares), and returns the session with the count of
/// compressions before the last chunk, and the last prompt logits.
fn served_prefill<'m>(
    model: &'m kvmerger_engine::Llama,
    request: GenerationRequest,
    chunk: usize,
    mode: PrefillCompression,
) -> Result<((Session<'m>, usize), Vec<f32>)> {
    let plan = Sequence::new(1, request.clone(), &model.config, chunk, mode)?;
    let compressions = plan.plan().compress_after.iter().filter(|&&c| c).count();
    let options = PrefillOptions { chunk, compression: mode, ..PrefillOptions::default() };
    let mut session = Session::new(model, request.compression())?.with_options(options);
    let first = session.prefill(request.prompt())?;
    Ok(((session, compressions), first))
}
