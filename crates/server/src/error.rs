//! OpenAI-style error responses: `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kvmerger_compress::CompressError;
use kvmerger_engine::{AddError, Refusal, RequestError, RequestField};
use serde_json::json;

/// An error answered to one request; the server keeps serving.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    /// Seconds after which a refused request may be retried (429).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// A 400 naming the field at fault.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param.into()),
            retry_after: None,
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    /// A compression configuration error, located under `kv_compression`.
    pub fn compression(e: &CompressError) -> Self {
        let param = match e {
            CompressError::InvalidParameter { name, .. } if name != "configuration" => {
                format!("kv_compression.{name}")
            }
            CompressError::UnknownMethod { .. } => "kv_compression.method".into(),
            CompressError::InvalidParameter { reason, .. }
                if reason.contains("unknown variant") =>
            {
                "kv_compression.method".into()
            }
            // A parameter's own check, reported through the JSON parser.
            CompressError::InvalidParameter { reason, .. } => match reason
                .split_once("invalid parameter `")
                .and_then(|(_, rest)| rest.split_once('`'))
            {
                Some((name, _)) => format!("kv_compression.{name}"),
                None => "kv_compression".into(),
            },
            _ => "kv_compression".into(),
        };
        Self::invalid(param, format!("kv_compression: {e}"))
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::NOT_FOUND => "not_found_error",
            s if s.is_client_error() => "invalid_request_error",
            _ => "server_error",
        }
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::Invalid { field, reason } => Self::invalid(param_of(field), reason),
            RequestError::Compression(c) => Self::compression(&c),
        }
    }
}

/// A request field as this API names it: the compression fields sit inside `kv_compression`.
fn param_of(field: RequestField) -> &'static str {
    match field {
        RequestField::MaxKv => "kv_compression.max_kv",
        RequestField::PrefillCompression => "kv_compression.prefill_compression",
        RequestField::KvDtype => "kv_compression.kv_dtype",
        other => other.name(),
    }
}

impl From<AddError> for ApiError {
    fn from(e: AddError) -> Self {
        match e {
            // The request was checked: the engine failing to build it is its own fault.
            AddError::Invalid(error) => Self::internal(error.to_string()),
            AddError::Request(error) => error.into(),
            AddError::Refused(r @ Refusal::QueueFull { .. }) => Self {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: r.to_string(),
                param: None,
                retry_after: Some(1),
            },
            AddError::Refused(r @ Refusal::NeverFits { .. }) => {
                Self::invalid("prompt", r.to_string())
            }
            AddError::Stopped => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: e.to_string(),
                param: None,
                retry_after: Some(1),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": null,
        }});
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
