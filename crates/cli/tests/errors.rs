//! Bad input gives a clear message and a non-zero exit, never a panic.

use std::path::PathBuf;
use std::process::Command;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

fn kvmerger(args: &[&str]) -> (i32, String) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_kvmerger")).args(args).output().expect("run kvmerger");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvmerger-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn default_model() -> PathBuf {
    kvmerger_models::ensure_default_model().unwrap()
}

#[test]
fn missing_model_file() {
    let (code, err) =
        kvmerger(&["generate", "--model", "/nonexistent/model.gguf", "--prompt", "hi"]);
    assert_eq!(code, 1);
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn truncated_gguf() {
    let bytes = std::fs::read(default_model()).unwrap();
    let path = temp("truncated.gguf");
    std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
    let (code, err) = kvmerger(&["generate", "--model", path.to_str().unwrap(), "--prompt", "hi"]);
    assert_eq!(code, 1);
    assert!(err.to_lowercase().contains("gguf"), "{err}");
}

#[test]
fn not_a_gguf_file() {
    let path = temp("garbage.gguf");
    std::fs::write(&path, b"this is not a model at all, just some text").unwrap();
    let (code, err) = kvmerger(&["generate", "--model", path.to_str().unwrap(), "--prompt", "hi"]);
    assert_eq!(code, 1);
    assert!(err.to_lowercase().contains("gguf"), "{err}");
}

#[test]
fn unsupported_architecture() {
    let path = temp("gemma.gguf");
    let tensor = QTensor::quantize(
        &Tensor::zeros((4, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let arch = Value::String("gemma".into());
    let mut file = std::fs::File::create(&path).unwrap();
    gguf_file::write(
        &mut file,
        &[("general.architecture", &arch)],
        &[("token_embd.weight", &tensor)],
    )
    .unwrap();
    drop(file);
    let (code, err) = kvmerger(&["generate", "--model", path.to_str().unwrap(), "--prompt", "hi"]);
    assert_eq!(code, 1);
    assert!(err.contains("gemma") && err.contains("unsupported"), "{err}");
}

#[test]
fn empty_prompt() {
    let (code, err) = kvmerger(&["generate", "--prompt", "   "]);
    assert_eq!(code, 1);
    assert!(err.contains("empty"), "{err}");
}

#[test]
fn prompt_longer_than_the_context() {
    let path = temp("long.txt");
    std::fs::write(&path, "word ".repeat(9000)).unwrap();
    let model = default_model();
    let (code, err) = kvmerger(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt-file",
        path.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("context") && err.contains("8192"), "{err}");
}

#[test]
fn prompt_tokens_cuts_a_long_prompt_to_an_exact_length() {
    let path = temp("long-cut.txt");
    std::fs::write(&path, "word ".repeat(9000)).unwrap();
    let model = default_model();
    let record = temp("cut.json");
    let run = |n: &str| {
        kvmerger(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt-file",
            path.to_str().unwrap(),
            "--prompt-tokens",
            n,
            "-n",
            "1",
            "--out",
            record.to_str().unwrap(),
        ])
    };
    let (code, err) = run("0");
    assert_eq!(code, 1);
    assert!(err.contains("at least 1"), "{err}");
    let (code, err) = run("20000");
    assert_eq!(code, 1);
    assert!(err.contains("--prompt-tokens 20000") && err.contains("only"), "{err}");
    let (code, err) = run("100");
    assert_eq!(code, 0, "{err}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert_eq!(r["prompt_tokens"], 100);
    assert_eq!(r["peak_head_entries"], 100);
    // The process held at least its KV cache and the model file's weights at once.
    let rss = r["peak_process_rss_bytes"].as_u64().expect("Linux reports VmHWM");
    let floor =
        r["peak_resident_bytes"].as_u64().unwrap() + std::fs::metadata(&model).unwrap().len() / 2;
    assert!(rss > floor, "{rss} <= {floor}");
}

#[test]
fn invalid_method_parameters_name_the_parameter() {
    for (args, needle) in [
        (vec!["--method", "kvmerger", "--budget", "0"], "budget"),
        (vec!["--method", "kvmerger", "--budget", "1.5"], "budget"),
        (vec!["--method", "magic", "--budget", "0.5"], "magic"),
        (vec!["--method", "kvmerger", "--budget", "0.5", "-P", "sigma=-1"], "sigma"),
    ] {
        let mut all = vec!["generate", "--prompt", "hello"];
        all.extend(args);
        let (code, err) = kvmerger(&all);
        assert_ne!(code, 0);
        assert!(err.contains(needle), "{all:?}: {err}");
    }
}

/// `kvmerger generate -p "   " <flags>`: everything about the flags is checked before the
/// prompt, so "the prompt is empty" means the flags were accepted, without loading a model.
fn generate_flags(flags: &[&str]) -> (i32, String) {
    let mut all = vec!["generate", "-p", "   "];
    all.extend(flags);
    kvmerger(&all)
}

#[test]
fn one_budget_grammar_on_the_command_line() {
    for ok in ["0.35", "35%", "1", "100%", "512t", "512 tokens", "1 token"] {
        let (code, err) = generate_flags(&["--method", "h2o", "--budget", ok]);
        assert!(code == 1 && err.contains("prompt is empty"), "--budget {ok}: {err}");
        let param = format!("budget={ok}");
        let (code, err) = generate_flags(&["--method", "h2o", "-P", &param]);
        assert!(code == 1 && err.contains("prompt is empty"), "-P {param}: {err}");
    }
    for (bad, needle) in [
        ("512", "512t"),
        ("0", "budget"),
        ("1.5", "at most 1"),
        ("nan", "budget"),
        ("0t", "budget"),
    ] {
        let (code, err) = generate_flags(&["--method", "h2o", "--budget", bad]);
        assert!(code != 0 && err.contains(needle), "--budget {bad}: {err}");
        let param = format!("budget={bad}");
        let (code, err) = generate_flags(&["--method", "h2o", "-P", &param]);
        assert!(code != 0 && err.contains(needle), "-P {param}: {err}");
    }
    // eval and analyze parse budgets before anything else fails.
    let (code, err) = kvmerger(&["eval", "--budgets", "35%,0.2,512t", "--preset", "nope"]);
    assert!(code == 1 && err.contains("unknown preset"), "{err}");
    let (code, err) = kvmerger(&["eval", "--budgets", "35%,512"]);
    assert!(code == 2 && err.contains("512t"), "{err}");
    let (code, err) = kvmerger(&["analyze", "--suggest-budget", "35%", "--threshold", "5"]);
    assert!(code == 1 && err.contains("--threshold"), "{err}");
    let (code, err) = kvmerger(&["analyze", "--suggest-budget", "512t"]);
    assert!(code == 1 && err.contains("--suggest-budget"), "{err}");
}

#[test]
fn one_budget_grammar_in_json_configs_and_sweep_specs() {
    for budget in
        [r#"0.35"#, r#""35%""#, r#"1"#, r#""512t""#, r#"{"ratio": 0.35}"#, r#"{"tokens": 512}"#]
    {
        let path = temp("budget-config.json");
        std::fs::write(&path, format!(r#"{{"method": "snapkv", "budget": {budget}}}"#)).unwrap();
        let (code, err) = generate_flags(&["--method-config", path.to_str().unwrap()]);
        assert!(code == 1 && err.contains("prompt is empty"), "{budget}: {err}");
    }
    let path = temp("budget-config-bad.json");
    std::fs::write(&path, r#"{"method": "snapkv", "budget": 512}"#).unwrap();
    let (code, err) = generate_flags(&["--method-config", path.to_str().unwrap()]);
    assert!(code == 1 && err.contains("512t"), "{err}");

    // A spec whose budgets parse fails later, at its unknown method; one whose budgets do not
    // fails at the budget.
    let spec = |budgets: &str| {
        let path = temp("budget-spec.json");
        let text = format!(
            r#"{{"name": "b", "tasks": [], "methods": ["magic"], "budgets": [{budgets}]}}"#
        );
        std::fs::write(&path, text).unwrap();
        kvmerger(&["eval", "--spec", path.to_str().unwrap()])
    };
    let (code, err) = spec(r#"0.5, "35%", "512t", {"tokens": 64}, {"ratio": 0.2}, 1"#);
    assert!(code == 1 && err.contains("magic"), "{err}");
    let (code, err) = spec(r#"0.5, 512"#);
    assert!(code == 1 && err.contains("512t"), "{err}");
}

#[test]
fn conflicting_method_flags_are_refused() {
    let path = temp("conflict.json");
    std::fs::write(&path, r#"{"method": "kvmerger", "budget": "35%"}"#).unwrap();
    let config = path.to_str().unwrap();
    let (code, err) = generate_flags(&["--method-config", config, "--method", "h2o"]);
    assert!(code == 2 && err.contains("--method"), "{err}");
    let (code, err) =
        generate_flags(&["--method-config", config, "--budget", "0.2", "-P", "budget=0.3"]);
    assert!(code == 1 && err.contains("twice"), "{err}");
    // --budget and -P override the file's fields (checked by the values they are given).
    let (code, err) = generate_flags(&["--method-config", config, "-P", "sigma=-1"]);
    assert!(code == 1 && err.contains("sigma"), "{err}");
    let (code, err) = generate_flags(&["--method-config", config, "--budget", "2"]);
    assert!(code != 0 && err.contains("budget"), "{err}");
    let (code, err) = generate_flags(&["--method-config", config, "--budget", "20%"]);
    assert!(code == 1 && err.contains("prompt is empty"), "{err}");
}

#[test]
fn non_finite_and_out_of_range_floats_name_their_flag() {
    for (flags, needle) in [
        (vec!["--temperature", "nan"], "--temperature"),
        (vec!["--temperature", "inf"], "--temperature"),
        (vec!["--top-p", "inf"], "--top-p"),
        (vec!["--top-p", "NaN"], "--top-p"),
        (vec!["--repeat-penalty", "-inf"], "--repeat-penalty"),
        (vec!["--temperature", "-1"], "--temperature"),
        (vec!["--top-p", "0"], "--top-p"),
        (vec!["--top-p", "1.5"], "--top-p"),
        (vec!["--repeat-penalty", "0"], "--repeat-penalty"),
        (vec!["--method", "kvmerger", "-P", "sigma=nan"], "sigma"),
        (vec!["--method", "kvmerger", "-P", "threshold=inf"], "threshold"),
        (vec!["--method", "h2o", "-P", "recent_ratio=-inf"], "recent_ratio"),
        (vec!["--method", "kvmerger", "-P", "recent=1e999"], "recent"),
        (vec!["--method", "h2o", "--budget", "inf%"], "budget"),
    ] {
        let (code, err) = generate_flags(&flags);
        assert!(code != 0 && err.contains(needle), "{flags:?}: {err}");
        assert!(!err.contains("prompt is empty"), "{flags:?} was accepted");
    }
    for (flags, needle) in [
        (vec!["--threshold", "nan"], "--threshold"),
        (vec!["--threshold", "2"], "--threshold"),
        (vec!["--suggest-budget", "nan"], "--suggest-budget"),
    ] {
        let mut all = vec!["analyze"];
        all.extend(&flags);
        let (code, err) = kvmerger(&all);
        assert!(code != 0 && err.contains(needle), "{flags:?}: {err}");
    }
}

#[test]
fn a_closed_stdout_ends_generate_quietly() {
    use std::io::Read;
    use std::process::Stdio;
    let model = default_model();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvmerger"))
        .args(["generate", "-m", model.to_str().unwrap(), "-n", "200"])
        .args(["-p", "Count from one to two hundred: 1, 2, 3, 4,", "-t", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kvmerger");
    // Read the first bytes, then close the pipe, as `| head -c 5` does.
    let mut first = [0u8; 5];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("error:"), "{stderr}");
    assert!(!stderr.to_lowercase().contains("broken pipe"), "{stderr}");
    // It stopped at the closed pipe, before the speed summary of a finished run.
    assert!(!stderr.contains("tokens/s"), "{stderr}");
}

#[test]
fn prompt_file_dash_reads_stdin() {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvmerger"))
        .args(["generate", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kvmerger");
    child.stdin.take().unwrap().write_all(b"   \n").unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("prompt is empty"), "{stderr}");
}

#[test]
fn methods_lists_every_method_and_parameter_with_its_default() {
    let path = temp("methods.json");
    let out = Command::new(env!("CARGO_BIN_EXE_kvmerger"))
        .args(["methods", "--out", path.to_str().unwrap()])
        .output()
        .expect("run kvmerger");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let listing: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (i, info) in kvmerger_compress::METHODS.iter().enumerate() {
        assert!(text.contains(info.name) && text.contains(info.summary));
        let defaults =
            kvmerger_compress::CompressionConfig::from_cli(info.name, None, &[]).unwrap();
        let serde_json::Value::Object(fields) = serde_json::to_value(&defaults).unwrap() else {
            panic!("{} is not an object", info.name)
        };
        let block: String = text
            .split_once(info.summary)
            .unwrap()
            .1
            .lines()
            .skip(1)
            .take_while(|l| l.starts_with("    "))
            .collect::<Vec<_>>()
            .join("\n");
        for (key, value) in fields.iter().filter(|(k, _)| *k != "method") {
            assert!(block.contains(&format!("    {key} = ")), "{}: {key} in\n{block}", info.name);
            assert_eq!(&listing[i]["parameters"][key], value, "{} {key}", info.name);
        }
        assert_eq!(listing[i]["name"], info.name);
    }
    assert!(text.contains("budget = 50%"), "{text}");
}

/// Runs `generate` on the default model with `flags`, writing its record (`--out`); returns
/// the exit code, stderr and the record.
fn generate_record(flags: &[&str]) -> (i32, String, serde_json::Value) {
    let model = default_model();
    // Tests run in parallel: each run its own file.
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let record = temp(&format!("record-{run}.json"));
    let _ = std::fs::remove_file(&record);
    let mut all = vec!["generate", "-m", model.to_str().unwrap(), "-t", "1"];
    all.extend(["--out", record.to_str().unwrap()]);
    all.extend(flags);
    let (code, err) = kvmerger(&all);
    let json = std::fs::read_to_string(&record)
        .map(|t| serde_json::from_str(&t).unwrap())
        .unwrap_or_default();
    (code, err, json)
}

const PROMPT: &str = "The quick brown fox jumps over the lazy dog. It was a bright cold day in \
                      April, and the clocks were striking thirteen. Call me Ishmael. Some years \
                      ago, never mind how long precisely, having little money in my purse.";

/// `--budget` overrides a method file's per-layer budgets (from `analyze
/// --suggest-budget`): the cache keeps the share asked for, and the label says it.
#[test]
fn a_budget_overrides_the_per_layer_budgets_of_a_method_file() {
    let layers: Vec<f64> = (0..30).map(|l| 0.25 + 0.2 * (l % 2) as f64).collect();
    let path = temp("layer-budgets.json");
    let config = serde_json::json!({"method": "kvmerger", "budget": 0.35, "layer_budgets": layers});
    std::fs::write(&path, config.to_string()).unwrap();
    let (code, err, record) = generate_record(&[
        "--method-config",
        path.to_str().unwrap(),
        "--budget",
        "20%",
        "-n",
        "1",
        "-p",
        PROMPT,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(record["label"].as_str().unwrap().ends_with("@20%"), "{record}");
    let kept = record["cache"]["achieved_ratio"].as_f64().unwrap();
    assert!((kept - 0.2).abs() < 0.02, "kept {kept} for a 20% budget");
}

/// Per-layer budgets of the wrong length are refused, naming the model's layer count.
#[test]
fn per_layer_budgets_must_fit_the_model() {
    for shares in ["[0.2]", &format!("[{}]", ["0.2"; 40].join(","))] {
        let param = format!("layer_budgets={shares}");
        let (code, err, _) =
            generate_record(&["--method", "kvmerger", "--budget", "0.2", "-P", &param, "-p", "hi"]);
        assert!(code == 1 && err.contains("layer_budgets") && err.contains("30 layers"), "{err}");
    }
}

/// A parameter the chosen mode does not read is refused, naming the mode that reads it.
#[test]
fn parameters_without_effect_are_refused() {
    for (flags, needle) in [
        (vec!["--method", "kvmerger", "-P", "threshold=0.8"], "budget_mode = merge"),
        (vec!["--method", "kvmerger", "-P", "threshold=-5"], "budget_mode = exact or threshold"),
        (vec!["--method", "cam", "-P", "recent_ratio=0.3"], "eviction = h2o"),
    ] {
        let (code, err) = generate_flags(&flags);
        assert!(code == 1 && err.contains(needle), "{flags:?}: {err}");
    }
    let (code, err) =
        generate_flags(&["--method", "kvmerger", "-P", "budget_mode=exact", "-P", "threshold=0.8"]);
    assert!(code == 1 && err.contains("prompt is empty"), "{err}");
}

/// A token budget above the prompt is a bound, not the prompt's length: nothing is evicted
/// while the cache stays under it.
#[test]
fn a_token_budget_beyond_the_prompt_is_kept_as_asked() {
    let (code, err, record) =
        generate_record(&["--method", "h2o", "--budget", "5000t", "-n", "2", "-p", PROMPT]);
    assert_eq!(code, 0, "{err}");
    let budgets = record["cache"]["layer_budgets"].as_array().unwrap();
    assert!(budgets.iter().all(|b| b == 5000), "{budgets:?}");
    let (code, err, record) =
        generate_record(&["--method", "h2o", "--budget", "1", "-n", "2", "-p", PROMPT]);
    assert_eq!(code, 0, "{err}");
    let budgets = record["cache"]["layer_budgets"].as_array().unwrap();
    assert!(budgets.iter().all(|b| b.is_null()), "a share of 1 has no bound: {budgets:?}");
}

#[test]
fn errors_say_what_is_wrong() {
    for (flags, needles) in [
        (vec!["--method", "kvmerger", "-P", "sigma=abc"], vec!["`sigma`", "adaptive"]),
        (
            vec!["--method", "kvmerger", "-P", "budget_mode=exact", "-P", "threshold=abc"],
            vec!["`threshold`"],
        ),
        (vec!["--method", "h2o", "--budget", "-0.2"], vec!["budget", "(0, 1]"]),
        (vec!["--method", "full", "--budget", "0.35"], vec!["budget", "full cache"]),
    ] {
        let (code, err) = generate_flags(&flags);
        assert!(code != 0 && needles.iter().all(|n| err.contains(n)), "{flags:?}: {err}");
    }
    for ok in ["512T", "512 Tokens"] {
        let (code, err) = generate_flags(&["--method", "h2o", "--budget", ok]);
        assert!(code == 1 && err.contains("prompt is empty"), "--budget {ok}: {err}");
    }
    for args in [
        vec!["generate", "-f", "/nonexistent/prompt.txt"],
        vec!["eval", "--dataset", "/nonexistent/data.jsonl"],
        vec!["eval", "--spec", "/nonexistent/spec.json"],
    ] {
        let (code, err) = kvmerger(&args);
        assert!(code == 1 && err.matches("No such file").count() == 1, "{args:?}: {err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_kvmerger"))
        .args(["generate", "-p", "hi"])
        .env("KVMERGER_MODEL", "/nonexistent/model.gguf")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("$KVMERGER_MODEL"), "{err}");
}

/// `-n` beyond what the context leaves is an error, as the server's `max_tokens` is; a
/// prompt that fills the context says there is no room to generate.
#[test]
fn generation_longer_than_the_context_is_refused() {
    let (code, err, _) = generate_record(&["-c", "20", "-n", "100", "-p", "Once upon a time"]);
    assert!(code == 1 && err.contains("-n/--max-tokens 100") && err.contains("at most"), "{err}");
    let (code, err, _) = generate_record(&["-c", "5", "-p", PROMPT]);
    assert!(code == 1 && err.contains("no room"), "{err}");
    let (code, err, record) = generate_record(&["-c", "12", "-p", "Once upon a time"]);
    assert_eq!(code, 0, "without -n, what the context leaves: {err}");
    assert!(record["output_tokens"].as_u64().unwrap() <= 12);
}

#[test]
fn analyze_needs_two_texts_to_compare() {
    let path = temp("one-text.txt");
    std::fs::write(&path, "a text").unwrap();
    let (code, err) = kvmerger(&["analyze", "--text", path.to_str().unwrap()]);
    assert!(code == 1 && err.contains("at least two"), "{err}");
}
