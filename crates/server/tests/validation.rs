//! Every rule of a request, over HTTP on a tiny random model: a request that breaks one is
//! refused once (400, counted once) with the field at fault in `error.param`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use kvmerger_compress::CompressionConfig;
use kvmerger_engine::testing::{random_llama, tiny_config, tiny_sentencepiece};
use kvmerger_engine::{EngineConfig, EngineHandle, ModelConfig, RequestLimits};
use kvmerger_server::{router, ServerState};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

/// The tiny model over the tiny tokenizer's 277 tokens; a context of 256 tokens.
fn state() -> ServerState {
    let tokenizer = tiny_sentencepiece();
    let config = ModelConfig { vocab_size: tokenizer.vocab_size(), ..tiny_config() };
    let model = random_llama(config, 7).unwrap();
    let limits = RequestLimits::of(&model.config, None);
    ServerState {
        engine: EngineHandle::spawn(Arc::new(model), EngineConfig::default()).unwrap(),
        tokenizer: Arc::new(tokenizer),
        chat: Err("the tiny tokenizer has no chat template".into()),
        model_name: "tiny".into(),
        default_compression: CompressionConfig::Full,
        default_max_tokens: 8,
        limits,
    }
}

/// Serves `state` on a free local port from a thread of its own; returns its address.
fn start(state: ServerState) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, router(state)).await.unwrap();
        });
    });
    rx.recv().unwrap()
}

/// POSTs `body` as JSON; returns the status code and the JSON answer.
fn post(addr: SocketAddr, path: &str, body: Value) -> (u16, Value) {
    let body = body.to_string();
    let mut stream = TcpStream::connect(addr).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all((head + &body).as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap())
}

#[test]
fn each_rule_is_refused_once_with_its_field_named() {
    let state = state();
    let metrics = state.engine.metrics();
    let app = start(state);
    let completion = |extra: Value| {
        let mut body = json!({"prompt": "hello world", "max_tokens": 4, "temperature": 0});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let cases = [
        (completion(json!({"prompt": ""})), "prompt"),
        (completion(json!({"prompt": " \n "})), "prompt"),
        (completion(json!({"prompt": []})), "prompt"),
        (completion(json!({"prompt": [1, 277]})), "prompt"),
        (completion(json!({"prompt": vec![5; 256]})), "prompt"),
        (completion(json!({"max_tokens": 0})), "max_tokens"),
        (completion(json!({"prompt": vec![5; 200], "max_tokens": 57})), "max_tokens"),
        (completion(json!({"temperature": 2.5})), "temperature"),
        (completion(json!({"temperature": -0.5})), "temperature"),
        (completion(json!({"top_p": 0})), "top_p"),
        (completion(json!({"top_p": 1.5})), "top_p"),
        (
            completion(json!({"kv_compression": {"method": "no-such-method"}})),
            "kv_compression.method",
        ),
        (
            completion(json!({"kv_compression": {"method": "h2o", "budget": 2}})),
            "kv_compression.budget",
        ),
    ];
    for (i, (body, field)) in cases.iter().enumerate() {
        let (status, answer) = post(app, "/v1/completions", body.clone());
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["param"], *field, "{body}: {answer}");
        assert_eq!(answer["error"]["type"], "invalid_request_error");
        let counted = metrics.requests_invalid.load(Ordering::Relaxed);
        assert_eq!(counted, i as u64 + 1, "{body} was counted {} times", counted - i as u64);
    }
    let chat = json!({"messages": [{"role": "user", "content": "hi"}]});
    let (status, answer) = post(app, "/v1/chat/completions", chat);
    assert_eq!((status, &answer["error"]["param"]), (400, &json!("messages")));
    // Within every bound (the edges included) the request is served, whatever bytes the
    // random model samples at temperature 2.
    for seed in 0..4 {
        let edges = completion(json!({
            "prompt": vec![5; 200], "max_tokens": 56, "temperature": 2, "seed": seed
        }));
        let (status, answer) = post(app, "/v1/completions", edges);
        assert_eq!(status, 200, "{answer}");
        // All 56 tokens, or fewer where the end-of-sequence token came first (it is no text).
        let generated = answer["usage"]["completion_tokens"].as_u64().unwrap();
        assert!((1..=56).contains(&generated), "{answer}");
        assert!(!answer["choices"][0]["text"].as_str().unwrap().contains("</s>"), "{answer}");
    }
}
