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
    kvmerger_engine::fetch::ensure_default_model().unwrap()
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
