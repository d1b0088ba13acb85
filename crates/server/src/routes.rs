//! The HTTP routes: completions, chat completions (both with SSE streaming), models,
//! health and metrics.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kvmerger_compress::CompressionConfig;
use kvmerger_engine::tokenizer::TextTokenizer;
use kvmerger_engine::{
    check_prompt_text, EngineHandle, GenerationRequest, RequestLimits, RequestOptions,
    SamplingConfig,
};
use kvmerger_models::{ChatMessage, ChatTemplate, ModelsError};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio_stream::wrappers::ReceiverStream;

use crate::error::ApiError;
use crate::generation::{complete, Running, Step, TextStream};
use crate::kv_compression::RequestCompression;
use crate::types::{
    ChatRequest, CompletionRequest, Content, Generation, Prompt, TokenizeRequest, UsageBody,
};

/// What the handlers share: the engine handle, and what turns text into tokens and back.
pub struct ServerState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<TextTokenizer>,
    /// The compiled chat template, or why chat is unavailable for this model.
    pub chat: Result<ChatTemplate, String>,
    /// The name `/v1/models` lists.
    pub model_name: String,
    /// Compression of requests that carry no `kv_compression`.
    pub default_compression: CompressionConfig,
    /// `max_tokens` of requests that give none (capped by the context left).
    pub default_max_tokens: usize,
    /// What requests are checked against (the context capped as `--ctx-size` says).
    pub limits: RequestLimits,
}

type AppState = Arc<ServerState>;

/// Every route of the server.
pub fn router(state: ServerState) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("no such route") })
        .with_state(Arc::new(state))
}

/// Parses a JSON body; errors name the field at fault.
fn parse<T: DeserializeOwned>(state: &ServerState, body: &Bytes) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        state.engine.metrics().requests_invalid.fetch_add(1, Ordering::Relaxed);
        if inner.is_syntax() || inner.is_eof() {
            ApiError::invalid("body", format!("malformed JSON: {inner}"))
        } else if path == "." {
            ApiError::invalid("body", inner.to_string())
        } else {
            ApiError::invalid(path.clone(), format!("`{path}`: {inner}"))
        }
    })
}

fn counted(state: &ServerState, e: ApiError) -> ApiError {
    if e.status.is_client_error() {
        state.engine.metrics().requests_invalid.fetch_add(1, Ordering::Relaxed);
    }
    e
}

/// The checked engine request of a prompt under the request's settings (see
/// [`GenerationRequest::new`]: every rule is checked there).
fn engine_request(
    state: &ServerState,
    prompt: Vec<u32>,
    g: &Generation,
    default_max: usize,
) -> Result<GenerationRequest, ApiError> {
    let kv = RequestCompression::parse(g.kv_compression.as_ref(), &state.default_compression)?;
    let seed = g.seed.unwrap_or_else(|| {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    });
    let options = RequestOptions {
        max_tokens: g.max_tokens,
        default_max_tokens: default_max,
        sampling: SamplingConfig {
            temperature: g.temperature.unwrap_or(1.0),
            top_p: g.top_p.unwrap_or(1.0),
            seed,
            ..SamplingConfig::default()
        },
        compression: kv.method,
        stop_tokens: state.tokenizer.eos_ids(),
        max_kv: kv.max_kv,
        prefill_compression: kv.prefill_compression,
        kv_dtype: kv.kv_dtype,
    };
    Ok(GenerationRequest::new(prompt, options, &state.limits)?)
}

fn encode(state: &ServerState, text: &str) -> Result<Vec<u32>, ApiError> {
    check_prompt_text(text)?;
    state.tokenizer.encode(text, true).map_err(|e| ApiError::invalid("prompt", e.to_string()))
}

async fn completions(State(state): State<AppState>, body: Bytes) -> Response {
    let result = async {
        let req: CompletionRequest = parse(&state, &body)?;
        let g = req.generation().map_err(|e| counted(&state, e))?;
        let prompt = match &req.prompt {
            Prompt::Text(t) => encode(&state, t),
            Prompt::Texts(v) if v.len() == 1 => encode(&state, &v[0]),
            Prompt::Texts(_) => Err(ApiError::invalid("prompt", "exactly one prompt per request")),
            Prompt::Tokens(ids) => Ok(ids.clone()),
        }
        .map_err(|e| counted(&state, e))?;
        let request = engine_request(&state, prompt, &g, 16).map_err(|e| counted(&state, e))?;
        respond(state.clone(), request, g, Kind::Completion).await
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions(State(state): State<AppState>, body: Bytes) -> Response {
    let result = async {
        let req: ChatRequest = parse(&state, &body)?;
        let g = req.generation().map_err(|e| counted(&state, e))?;
        let prompt = chat_prompt(&state, &req).map_err(|e| counted(&state, e))?;
        let request = engine_request(&state, prompt, &g, state.default_max_tokens)
            .map_err(|e| counted(&state, e))?;
        respond(state.clone(), request, g, Kind::Chat).await
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

/// The roles of OpenAI's chat messages.
const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// Renders the conversation with the model's chat template and encodes it.
fn chat_prompt(state: &ServerState, req: &ChatRequest) -> Result<Vec<u32>, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages", "at least one message is needed"));
    }
    let messages = req
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role"),
                    format!("unknown role `{}`: expected one of {}", m.role, ROLES.join(", ")),
                ));
            }
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => parts
                    .iter()
                    .map(|p| match (&*p.kind, &p.text) {
                        ("text", Some(t)) => Ok(t.as_str()),
                        _ => Err(ApiError::invalid(
                            format!("messages[{i}].content"),
                            "only text content parts are supported",
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .concat(),
            };
            Ok(ChatMessage::new(&m.role, content))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let template = state.chat.as_ref().map_err(|e| ApiError::invalid("messages", e.clone()))?;
    let text = template.render(&messages, true).map_err(|e| match e {
        ModelsError::Messages(reason) => ApiError::invalid(
            "messages",
            format!("the chat template refused the messages: {reason}"),
        ),
        other => ApiError::invalid("messages", other.to_string()),
    })?;
    if messages.iter().all(|m| m.content.trim().is_empty()) {
        return Err(ApiError::invalid("messages", "every message is empty"));
    }
    state.tokenizer.encode(&text, true).map_err(|e| ApiError::invalid("messages", e.to_string()))
}

/// The token ids of a prompt string, encoded exactly as `/v1/completions` encodes it (so a
/// client can send a prompt of an exact length as ids).
async fn tokenize(State(state): State<AppState>, body: Bytes) -> Response {
    let result = parse::<TokenizeRequest>(&state, &body)
        .and_then(|req| encode(&state, &req.prompt).map_err(|e| counted(&state, e)));
    match result {
        Ok(tokens) => Json(json!({"count": tokens.len(), "tokens": tokens})).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Completion,
    Chat,
}

impl Kind {
    fn id_prefix(self) -> &'static str {
        match self {
            Kind::Completion => "cmpl",
            Kind::Chat => "chatcmpl",
        }
    }
}

/// One choice of a response or of a stream chunk.
fn choice(kind: Kind, text: &str, finish: Option<&str>, stream: bool, first: bool) -> Value {
    match (kind, stream) {
        (Kind::Completion, _) => {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
        }
        (Kind::Chat, false) => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": finish,
        }),
        (Kind::Chat, true) => {
            let delta = match (first, text.is_empty() && finish.is_some()) {
                (true, _) => json!({"role": "assistant", "content": text}),
                (false, true) => json!({}),
                (false, false) => json!({"content": text}),
            };
            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
        }
    }
}

/// Runs the request and answers with one JSON body, or with server-sent events.
async fn respond(
    state: AppState,
    request: GenerationRequest,
    g: Generation,
    kind: Kind,
) -> Result<Response, ApiError> {
    let stops = match g.stop.clone() {
        Some(s) => s.into_vec().map_err(|e| counted(&state, e))?,
        None => Vec::new(),
    };
    let running = Running::submit(&state.engine, request).await?;
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let id = format!("{}-{:x}", kind.id_prefix(), created ^ rand_suffix());
    let object = match (kind, g.stream) {
        (Kind::Completion, _) => "text_completion",
        (Kind::Chat, false) => "chat.completion",
        (Kind::Chat, true) => "chat.completion.chunk",
    };
    let model = state.model_name.clone();
    if !g.stream {
        let (text, finish, usage) = complete(state.tokenizer.clone(), running, stops).await?;
        return Ok(Json(json!({
            "id": id,
            "object": object,
            "created": created,
            "model": model,
            "choices": [choice(kind, &text, Some(finish), false, true)],
            "usage": UsageBody::from(&usage),
        }))
        .into_response());
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let tokenizer = state.tokenizer.clone();
    tokio::spawn(async move {
        let mut running = running;
        let mut text_stream = TextStream::new(&tokenizer, stops);
        let chunk = |choices: Vec<Value>, usage: Option<Value>| {
            let mut body = json!({
                "id": id, "object": object, "created": created, "model": model, "choices": choices,
            });
            if let Some(u) = usage {
                body["usage"] = u;
            }
            SseEvent::default().data(body.to_string())
        };
        let mut first = true;
        loop {
            let event = match text_stream.next(&mut running).await {
                Ok(Step::Text(t)) if t.is_empty() && !first => continue,
                Ok(Step::Text(t)) => chunk(vec![choice(kind, &t, None, true, first)], None),
                Ok(Step::Done { text, finish_reason, usage }) => {
                    let last =
                        chunk(vec![choice(kind, &text, Some(finish_reason), true, first)], None);
                    if tx.send(Ok(last)).await.is_err() {
                        return;
                    }
                    if g.include_usage {
                        let usage = serde_json::to_value(UsageBody::from(&usage)).ok();
                        let _ = tx.send(Ok(chunk(vec![], usage))).await;
                    }
                    let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
                    return;
                }
                Err(e) => {
                    let body = json!({"error": {"message": e.message, "type": "server_error"}});
                    let _ = tx.send(Ok(SseEvent::default().data(body.to_string()))).await;
                    return;
                }
            };
            first = false;
            // A client that went away drops the stream: stop, which cancels the sequence.
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
    });
    Ok(Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default()).into_response())
}

/// A few bits that differ between requests of the same second.
fn rand_suffix() -> u64 {
    use std::sync::atomic::AtomicU64;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    COUNTER.fetch_add(1, Ordering::Relaxed) << 40
}

async fn models(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": state.model_name, "object": "model", "created": 0, "owned_by": "kvmerger"}],
    }))
}

async fn health(State(state): State<AppState>) -> Response {
    if state.engine.is_running() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        ApiError::internal("the engine thread has stopped").into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let body = crate::metrics::render(&state.engine.metrics());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
