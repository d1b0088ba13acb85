//! Mutated model files: every load returns a model or an error — never a panic, an abort
//! or more than a fixed amount of memory.
//!
//! Inputs: the tiny random model written as a complete GGUF file (with a byte-level BPE
//! tokenizer), the real default model's header and metadata (its first 1.8 MB, tensor data
//! cut short), and the tiny model as a Hugging Face folder. A seeded RNG flips bits, writes
//! extreme integers, truncates and splices bytes. The loads run in a child process (this
//! test binary, re-run on the ignored `child_loads` test) under an address-space limit, so
//! an abort or an allocation past the limit fails the test and names the input.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use kvmerger_engine::testing::tiny_config;
use kvmerger_engine::tokenizer::TextTokenizer;
use kvmerger_engine::{load_hf_folder, load_model, read_gguf_header, ModelConfig, WeightFormats};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Address-space limit of the child process.
const MEMORY_LIMIT: u64 = 1 << 30;
const CHILD_DIR: &str = "KVMERGER_HOSTILE_DIR";

/// Seeded random tensor `[rows, cols]` (or `[rows]` when `cols` is 0) in -scale..scale.
fn random(rng: &mut StdRng, rows: usize, cols: usize, scale: f32) -> Tensor {
    let n = rows * cols.max(1);
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    let t = Tensor::from_vec(data, n, &Device::Cpu).unwrap();
    if cols == 0 {
        t
    } else {
        t.reshape((rows, cols)).unwrap()
    }
}

/// Every tensor of the tiny model (`[out, in]`), named as in GGUF files.
fn tiny_tensors() -> Vec<(String, Tensor)> {
    let c = tiny_config();
    let (h, q, kv, i) =
        (c.hidden_size, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.intermediate_size);
    let mut rng = StdRng::seed_from_u64(7);
    let mut t = vec![
        ("token_embd.weight".to_string(), random(&mut rng, c.vocab_size, h, 1.0)),
        ("output_norm.weight".to_string(), (random(&mut rng, h, 0, 0.1) + 1.0).unwrap()),
    ];
    for l in 0..c.n_layers {
        for (name, rows, cols) in [
            ("attn_norm.weight", h, 0),
            ("ffn_norm.weight", h, 0),
            ("attn_q.weight", q, h),
            ("attn_k.weight", kv, h),
            ("attn_v.weight", kv, h),
            ("attn_output.weight", h, q),
            ("ffn_gate.weight", i, h),
            ("ffn_up.weight", i, h),
            ("ffn_down.weight", h, i),
        ] {
            let w = if cols == 0 {
                (random(&mut rng, rows, 0, 0.1) + 1.0).unwrap()
            } else {
                random(&mut rng, rows, cols, 0.3)
            };
            t.push((format!("blk.{l}.{name}"), w));
        }
    }
    t
}

/// The tiny model as a GGUF file: Q8_0, Q4_1 and Q4_0 projections, f32 norms, a 64-token
/// byte-level BPE vocabulary.
fn tiny_gguf() -> Vec<u8> {
    let config = tiny_config();
    let tensors: Vec<(String, QTensor)> = tiny_tensors()
        .into_iter()
        .map(|(name, t)| {
            let dtype = match name.as_str() {
                _ if t.rank() == 1 => GgmlDType::F32,
                n if n.contains("attn_k") => GgmlDType::Q4_1,
                n if n.contains("ffn_gate") => GgmlDType::Q4_0,
                _ => GgmlDType::Q8_0,
            };
            let q = QTensor::quantize(&t, dtype).unwrap();
            (name, q)
        })
        .collect();
    // 62 single characters, one merge, one control token.
    let mut tokens: Vec<String> = (b'0'..=b'm').map(|c| (c as char).to_string()).collect();
    tokens.push("01".into());
    tokens.push("<|endoftext|>".into());
    assert_eq!(tokens.len(), config.vocab_size);
    let mut types = vec![Value::I32(1); tokens.len()];
    types[63] = Value::I32(3);
    let strings = |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U32(config.n_layers as u32)),
        ("llama.context_length", Value::U32(config.context_length as u32)),
        ("llama.embedding_length", Value::U32(config.hidden_size as u32)),
        ("llama.feed_forward_length", Value::U32(config.intermediate_size as u32)),
        ("llama.attention.head_count", Value::U32(config.n_heads as u32)),
        ("llama.attention.head_count_kv", Value::U32(config.n_kv_heads as u32)),
        ("llama.rope.dimension_count", Value::U32(config.head_dim as u32)),
        ("llama.rope.freq_base", Value::F32(config.rope_theta)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", strings(&["0 1".to_string()])),
        ("tokenizer.ggml.bos_token_id", Value::U32(63)),
        ("tokenizer.ggml.eos_token_id", Value::U32(63)),
    ];
    let metadata: Vec<(String, Value)> =
        metadata.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    gguf_bytes(&metadata, &tensors)
}

/// The default model's metadata (architecture, 49k-token vocabulary, 48k merges, chat
/// template), written as a GGUF file without tensors.
fn real_metadata() -> HashMap<String, Value> {
    let path = kvmerger_models::ensure_default_model().expect("default model");
    read_gguf_header(&path).unwrap().0.metadata
}

fn gguf_bytes(metadata: &[(String, Value)], tensors: &[(String, QTensor)]) -> Vec<u8> {
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    candle_core::quantized::gguf_file::write(&mut out, &md, &ts).unwrap();
    out.into_inner()
}

/// Inconsistent but well-formed metadata: a key removed, an array cut short, an id out of
/// range, a merge of unknown tokens, a value of the wrong type, a size set to an extreme.
fn mutate_metadata(base: &[(String, Value)], rng: &mut StdRng) -> Vec<(String, Value)> {
    let mut md = base.to_vec();
    for _ in 0..rng.random_range(1..=2) {
        let at = rng.random_range(0..md.len());
        let extreme = EXTREMES[rng.random_range(0..EXTREMES.len())];
        let value = &mut md[at].1;
        match (rng.random_range(0..6), &mut *value) {
            (0, _) => {
                md.remove(at);
            }
            (1, Value::Array(items)) => {
                let keep = rng.random_range(0..=items.len());
                items.truncate(keep);
            }
            (2, Value::Array(items)) if !items.is_empty() => {
                let i = rng.random_range(0..items.len());
                items[i] = match &items[i] {
                    Value::String(_) => {
                        Value::String(["zz qq", "", " ", "a", "<0xZZ>"][i % 5].into())
                    }
                    // Arrays hold one type: an extreme of the same type.
                    Value::I32(_) => Value::I32([-1, i32::MAX, 7][i % 3]),
                    Value::U32(_) => Value::U32(u32::MAX),
                    Value::F32(_) => Value::F32([f32::NAN, f32::INFINITY, -1e30][i % 3]),
                    other => other.clone(),
                };
            }
            (3, Value::U32(_) | Value::I32(_) | Value::U64(_)) => *value = Value::U64(extreme),
            (4, Value::String(s)) => {
                *s = ["", "gpt2", "llama", "qwen2", "bert"][rng.random_range(0..5)].into()
            }
            _ => *value = Value::Bool(true),
        }
    }
    md
}

/// Values that break counts, lengths, offsets and type ids.
const EXTREMES: [u64; 9] =
    [0, 1, 31, 0xff, 0xffff_ffff, 0x8000_0000, 1 << 40, u64::MAX / 2, u64::MAX];

/// One seeded mutation of `base`; mutations land in the first `hot` bytes 4 times in 5.
fn mutate(base: &[u8], hot: usize, rng: &mut StdRng) -> Vec<u8> {
    let mut b = base.to_vec();
    let pos = |rng: &mut StdRng, len: usize| {
        if rng.random_bool(0.8) {
            rng.random_range(0..hot.min(len).max(1))
        } else {
            rng.random_range(0..len.max(1))
        }
    };
    for _ in 0..rng.random_range(1..=3) {
        let len = b.len();
        if len < 16 {
            break;
        }
        match rng.random_range(0..6) {
            0 => {
                for _ in 0..rng.random_range(1..=8) {
                    let at = pos(rng, len);
                    b[at] ^= 1 << rng.random_range(0..8);
                }
            }
            1 | 2 => {
                let at = pos(rng, len - 8);
                let value = EXTREMES[rng.random_range(0..EXTREMES.len())];
                if rng.random_bool(0.5) {
                    b[at..at + 8].copy_from_slice(&value.to_le_bytes());
                } else {
                    b[at..at + 4].copy_from_slice(&(value as u32).to_le_bytes());
                }
            }
            3 => b.truncate(pos(rng, len)),
            4 => {
                // Copy a chunk of the file over another place.
                let (from, to) = (pos(rng, len), pos(rng, len));
                let n = rng.random_range(1..=64).min(len - from).min(len - to);
                let chunk = b[from..from + n].to_vec();
                b[to..to + n].copy_from_slice(&chunk);
            }
            _ => {
                // Insert or delete a few bytes, shifting everything after.
                let at = pos(rng, len);
                let n = rng.random_range(1..=16).min(len - at);
                if rng.random_bool(0.5) {
                    b.drain(at..at + n);
                } else {
                    let junk: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                    b.splice(at..at, junk);
                }
            }
        }
    }
    b
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvmerger-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What one load did.
enum Outcome {
    Loaded,
    Error(String),
}

/// Loads one input the way its kind is loaded in the program.
fn load_one(path: &Path) -> Outcome {
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    let result: Result<(), String> = if name.starts_with("tiny") {
        load_model(path, WeightFormats::default()).map(|_| ()).map_err(|e| e.to_string())
    } else if name.starts_with("header") {
        // Everything a load reads from the header: config and tokenizer.
        read_gguf_header(path)
            .and_then(|(content, _)| {
                ModelConfig::from_gguf_metadata(&content.metadata)?;
                TextTokenizer::from_gguf_metadata(&content.metadata)
            })
            .map(|_| ())
            .map_err(|e| e.to_string())
    } else {
        load_hf_folder(path, &Device::Cpu).map(|_| ()).map_err(|e| e.to_string())
    };
    match result {
        Ok(()) => Outcome::Loaded,
        Err(e) => Outcome::Error(e),
    }
}

/// Run by the tests below in a child process: loads every input in `$KVMERGER_HOSTILE_DIR`
/// and prints one line per input.
#[test]
#[ignore = "run by the mutation tests in a child process"]
fn child_loads() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else { return };
    let mut inputs: Vec<PathBuf> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    inputs.sort();
    let mut out = std::io::stdout().lock();
    // The harness's "test child_loads ... " has no line break.
    writeln!(out).unwrap();
    for path in inputs {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        // Written before the load, so an abort leaves the culprit's name as the last line.
        writeln!(out, "@start {name}").unwrap();
        out.flush().unwrap();
        match std::panic::catch_unwind(|| load_one(&path)) {
            Ok(Outcome::Loaded) => writeln!(out, "@loaded {name}").unwrap(),
            Ok(Outcome::Error(e)) => {
                let line = e.lines().next().unwrap_or("").to_string();
                writeln!(out, "@error {name}: {line}").unwrap()
            }
            Err(_) => writeln!(out, "@PANIC {name}").unwrap(),
        }
    }
}

struct Tally {
    loaded: usize,
    errors: usize,
}

/// Runs the child over `dir` under the memory limit; fails on any panic, abort or crash.
fn run_child(dir: &Path) -> Tally {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["child_loads", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir)
        // One malloc arena: the limit then measures data, not per-thread reservations.
        .env("MALLOC_ARENA_MAX", "1")
        .env("RAYON_NUM_THREADS", "1");
    limit_memory(&mut cmd);
    let output = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last_started = stdout.lines().rfind(|l| l.starts_with("@start ")).unwrap_or("none");
    assert!(
        output.status.success(),
        "the child died ({}) at `{last_started}` under a {} MiB address-space limit: {}",
        output.status,
        MEMORY_LIMIT >> 20,
        String::from_utf8_lossy(&output.stderr)
            .lines()
            .rev()
            .take(8)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let panics: Vec<&str> = stdout.lines().filter(|l| l.starts_with("@PANIC")).collect();
    assert!(panics.is_empty(), "loads panicked: {panics:?}");
    let count = |prefix: &str| stdout.lines().filter(|l| l.starts_with(prefix)).count();
    if std::env::var_os("KVMERGER_HOSTILE_LOG").is_some() {
        eprintln!("{stdout}");
    }
    let tally = Tally { loaded: count("@loaded "), errors: count("@error ") };
    let started = count("@start ");
    assert_eq!(tally.loaded + tally.errors, started, "every input ends in a model or an error");
    // Errors are typed messages, never a bare debug dump.
    for line in stdout.lines().filter(|l| l.starts_with("@error ")) {
        assert!(line.split_once(": ").is_some_and(|(_, m)| m.len() > 8), "{line}");
    }
    tally
}

#[cfg(unix)]
fn limit_memory(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: MEMORY_LIMIT, rlim_max: MEMORY_LIMIT };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(unix))]
fn limit_memory(_cmd: &mut Command) {}

#[test]
fn mutated_gguf_files_load_or_fail_cleanly() {
    let start = Instant::now();
    let dir = scratch("hostile-gguf");
    let tiny = tiny_gguf();
    let mut metadata: Vec<(String, Value)> = real_metadata().into_iter().collect();
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    let header = gguf_bytes(&metadata, &[]);
    let tiny_header_len = 2048;
    std::fs::write(dir.join("tiny-original.gguf"), &tiny).unwrap();
    std::fs::write(dir.join("header-original.gguf"), &header).unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    const TINY_CASES: usize = 1000;
    const HEADER_CASES: usize = 16;
    const METADATA_CASES: usize = 24;
    for i in 0..TINY_CASES {
        let bytes = mutate(&tiny, tiny_header_len, &mut rng);
        std::fs::write(dir.join(format!("tiny-{i:04}.gguf")), bytes).unwrap();
    }
    for i in 0..HEADER_CASES {
        // Mutations land in the first 64 KiB (counts, architecture keys, the start of the
        // vocabulary) or anywhere in the metadata.
        let hot = if i % 2 == 0 { 64 << 10 } else { header.len() };
        let bytes = mutate(&header, hot, &mut rng);
        std::fs::write(dir.join(format!("header-{i:04}.gguf")), bytes).unwrap();
    }
    for i in 0..METADATA_CASES {
        let bytes = gguf_bytes(&mutate_metadata(&metadata, &mut rng), &[]);
        std::fs::write(dir.join(format!("header-md-{i:04}.gguf")), bytes).unwrap();
    }
    let tally = run_child(&dir);
    // The unmutated files load; some mutations (bits flipped in weights) still load.
    assert!(tally.loaded >= 2, "the originals load");
    assert!(tally.errors > TINY_CASES / 4, "most header mutations are caught: {}", tally.errors);
    eprintln!(
        "{} mutated GGUF inputs ({TINY_CASES} tiny, {HEADER_CASES} real header bytes, \
         {METADATA_CASES} real metadata values): {} loaded, {} errors, {:.1} s",
        TINY_CASES + HEADER_CASES + METADATA_CASES,
        tally.loaded,
        tally.errors,
        start.elapsed().as_secs_f64()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

const HF_CONFIG: &str = r#"{"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
"vocab_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
"rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256}"#;

fn tiny_safetensors() -> Vec<u8> {
    let hf_name = |gguf: &str| -> String {
        let table = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("attn_norm", "input_layernorm"),
            ("ffn_norm", "post_attention_layernorm"),
            ("attn_q", "self_attn.q_proj"),
            ("attn_k", "self_attn.k_proj"),
            ("attn_v", "self_attn.v_proj"),
            ("attn_output", "self_attn.o_proj"),
            ("ffn_gate", "mlp.gate_proj"),
            ("ffn_up", "mlp.up_proj"),
            ("ffn_down", "mlp.down_proj"),
            ("blk.", "model.layers."),
        ];
        table.iter().fold(gguf.to_string(), |name, (from, to)| name.replace(from, to))
    };
    let t: HashMap<String, Tensor> =
        tiny_tensors().into_iter().map(|(name, t)| (hf_name(&name), t)).collect();
    let path = std::env::temp_dir().join(format!("kvmerger-st-{}.safetensors", std::process::id()));
    candle_core::safetensors::save(&t, &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    bytes
}

/// Text mutations of config.json: absurd numbers, deleted fields, wrong types.
fn mutate_config(rng: &mut StdRng) -> String {
    let fields = [
        "hidden_size",
        "intermediate_size",
        "vocab_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rope_theta",
        "rms_norm_eps",
    ];
    let mut json: serde_json::Value = serde_json::from_str(HF_CONFIG).unwrap();
    let obj = json.as_object_mut().unwrap();
    for _ in 0..rng.random_range(1..=2) {
        let field = fields[rng.random_range(0..fields.len())];
        let value = match rng.random_range(0..8) {
            0 => {
                obj.remove(field);
                continue;
            }
            1 => serde_json::json!(0),
            2 => serde_json::json!(-1),
            3 => serde_json::json!(u64::MAX),
            4 => serde_json::json!(1u64 << 40),
            5 => serde_json::json!("32"),
            6 => serde_json::json!(1e300),
            _ => serde_json::json!(rng.random_range(1..100)),
        };
        obj.insert(field.into(), value);
    }
    json.to_string()
}

#[test]
fn mutated_hugging_face_folders_load_or_fail_cleanly() {
    let start = Instant::now();
    let dir = scratch("hostile-hf");
    let weights = tiny_safetensors();
    // The header is a u64 length and JSON; the rest is tensor data.
    let header_len = 8 + u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let mut rng = StdRng::seed_from_u64(12);
    const CASES: usize = 200;
    for i in 0..=CASES {
        let folder = dir.join(format!("hf-{i:04}"));
        std::fs::create_dir_all(&folder).unwrap();
        let (config, st) = match i {
            0 => (HF_CONFIG.to_string(), weights.clone()),
            _ if i % 2 == 0 => (mutate_config(&mut rng), weights.clone()),
            _ => (HF_CONFIG.to_string(), mutate(&weights, header_len, &mut rng)),
        };
        std::fs::write(folder.join("config.json"), config).unwrap();
        std::fs::write(folder.join("model.safetensors"), st).unwrap();
    }
    let tally = run_child(&dir);
    assert!(tally.loaded >= 1, "the original folder loads");
    assert!(tally.errors > CASES / 4, "most mutations are caught: {}", tally.errors);
    eprintln!(
        "{CASES} mutated Hugging Face folders: {} loaded, {} errors, {:.1} s",
        tally.loaded,
        tally.errors,
        start.elapsed().as_secs_f64()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
