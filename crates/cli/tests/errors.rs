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
        (vec!["--method", "kvmerger", "--budget", "0.5", "-p", "sigma=-1"], "sigma"),
    ] {
        let mut all = vec!["generate", "--prompt", "hello"];
        all.extend(args);
        let (code, err) = kvmerger(&all);
        assert_ne!(code, 0);
        assert!(err.contains(needle), "{all:?}: {err}");
    }
}
