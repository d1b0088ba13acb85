//! The OpenAI wire format: request bodies (with the `kv_compression` extension) and
//! response bodies (with `usage.kv_compression`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ApiError;

/// `prompt`: a string, a list holding one string, or a list of token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
}

/// `stop`: one string or up to four.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Result<Vec<String>, ApiError> {
        let stops = match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        };
        if stops.len() > 4 {
            return Err(ApiError::invalid("stop", "at most 4 stop sequences"));
        }
        if stops.iter().any(String::is_empty) {
            return Err(ApiError::invalid("stop", "stop sequences must not be empty"));
        }
        Ok(stops)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Settings shared by both endpoints.
#[derive(Debug, Clone, Default)]
pub struct Generation {
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub stream: bool,
    pub include_usage: bool,
    pub kv_compression: Option<Value>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: Prompt,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// The extension: a compression method in `--method-config`'s schema.
    pub kv_compression: Option<Value>,
    pub n: Option<u32>,
    pub user: Option<String>,
    pub echo: Option<bool>,
    pub logprobs: Option<Value>,
    pub best_of: Option<u32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<Value>,
    pub suffix: Option<String>,
}

/// `POST /tokenize` (an extension, as vLLM and llama.cpp's servers have): the token ids a
/// completion prompt string becomes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: String,
}

/// A chat message's content: a string or a list of `{"type": "text", "text": ...}` parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub name: Option<String>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<Message>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub kv_compression: Option<Value>,
    pub n: Option<u32>,
    pub user: Option<String>,
    pub logprobs: Option<bool>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<Value>,
}

/// Rejects OpenAI options this server does not implement unless they hold their defaults.
fn unsupported_unless(ok: bool, field: &str) -> Result<(), ApiError> {
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(field, format!("`{field}` is not supported by this server")))
    }
}

fn check_common(
    n: Option<u32>,
    presence: Option<f32>,
    frequency: Option<f32>,
    logit_bias: &Option<Value>,
) -> Result<(), ApiError> {
    unsupported_unless(n.unwrap_or(1) == 1, "n")?;
    unsupported_unless(presence.unwrap_or(0.0) == 0.0, "presence_penalty")?;
    unsupported_unless(frequency.unwrap_or(0.0) == 0.0, "frequency_penalty")?;
    let empty_bias = match logit_bias {
        None | Some(Value::Null) => true,
        Some(Value::Object(m)) => m.is_empty(),
        Some(_) => false,
    };
    unsupported_unless(empty_bias, "logit_bias")
}

impl CompletionRequest {
    /// The generation settings, after rejecting options that are not implemented.
    pub fn generation(&self) -> Result<Generation, ApiError> {
        check_common(self.n, self.presence_penalty, self.frequency_penalty, &self.logit_bias)?;
        unsupported_unless(!self.echo.unwrap_or(false), "echo")?;
        unsupported_unless(self.best_of.unwrap_or(1) == 1, "best_of")?;
        unsupported_unless(self.suffix.is_none(), "suffix")?;
        let no_logprobs =
            matches!(self.logprobs, None | Some(Value::Null) | Some(Value::Bool(false)))
                || self.logprobs == Some(Value::from(0));
        unsupported_unless(no_logprobs, "logprobs")?;
        Ok(Generation {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            stop: self.stop.clone(),
            stream: self.stream,
            include_usage: self.stream_options.as_ref().is_some_and(|o| o.include_usage),
            kv_compression: self.kv_compression.clone(),
        })
    }
}

impl ChatRequest {
    pub fn generation(&self) -> Result<Generation, ApiError> {
        check_common(self.n, self.presence_penalty, self.frequency_penalty, &self.logit_bias)?;
        unsupported_unless(!self.logprobs.unwrap_or(false), "logprobs")?;
        Ok(Generation {
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            stop: self.stop.clone(),
            stream: self.stream,
            include_usage: self.stream_options.as_ref().is_some_and(|o| o.include_usage),
            kv_compression: self.kv_compression.clone(),
        })
    }
}

/// `usage`, with the compression this request ran under.
#[derive(Debug, Clone, Serialize)]
pub struct UsageBody {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    /// Extension: what compression did to this request's cache.
    pub kv_compression: KvCompressionUsage,
}

/// `usage.kv_compression`.
#[derive(Debug, Clone, Serialize)]
pub struct KvCompressionUsage {
    /// The method and budget, e.g. `kvmerger@35%`.
    pub method: String,
    /// Cache entries kept over the full prompt cache's entries.
    pub achieved_ratio: f64,
    /// Bytes the cache held right after compression.
    pub resident_kv_bytes: usize,
    /// Bytes the uncompressed prompt cache held.
    pub full_kv_bytes: usize,
}

impl From<&kvmerger_engine::Usage> for UsageBody {
    fn from(u: &kvmerger_engine::Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            kv_compression: KvCompressionUsage {
                method: u.method.clone(),
                achieved_ratio: u.achieved_ratio,
                resident_kv_bytes: u.resident_kv_bytes,
                full_kv_bytes: u.full_kv_bytes,
            },
        }
    }
}
