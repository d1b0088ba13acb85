//! The `kv_compression` request field: a method in `--method-config`'s schema, beside
//! which three fields apply to the request rather than to the method: `max_kv` (entries a
//! head may hold while decoding), `prefill_compression` (`once` or `incremental`, over
//! the server's `--prefill-compression`) and `kv_dtype` (how the request's cache stores
//! keys and values, over the server's `--kv-dtype`: `f16`, `q8_0`, `q4_0r`, ...).

use kvmerger_compress::{CompressionConfig, KvDtype};
use kvmerger_engine::PrefillCompression;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// What a request's `kv_compression` asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestCompression {
    pub method: CompressionConfig,
    pub max_kv: Option<usize>,
    pub prefill_compression: Option<PrefillCompression>,
    pub kv_dtype: Option<KvDtype>,
}

impl RequestCompression {
    /// Reads `kv_compression` (`None`, null, or an object with only the request-level
    /// fields: `default` for the method). Errors name the field at fault.
    pub fn parse(value: Option<&Value>, default: &CompressionConfig) -> Result<Self, ApiError> {
        let mut fields = match value {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(fields)) => fields.clone(),
            Some(other) => {
                let e = CompressionConfig::from_value(other.clone())
                    .err()
                    .map(|e| ApiError::compression(&e));
                return Err(e.unwrap_or_else(|| {
                    ApiError::invalid("kv_compression", "must be an object naming a method")
                }));
            }
        };
        let max_kv = match fields.remove("max_kv") {
            None | Some(Value::Null) => None,
            // Its value's rules are the request's (`GenerationRequest::new`).
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                ApiError::invalid(
                    "kv_compression.max_kv",
                    format!("must be a whole number of entries per head; got {v}"),
                )
            })? as usize),
        };
        let prefill_compression = match fields.remove("prefill_compression") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let invalid = |e| ApiError::invalid("kv_compression.prefill_compression", e);
                let text =
                    v.as_str().ok_or_else(|| invalid(format!("must be a string, got {v}")))?;
                Some(text.parse().map_err(invalid)?)
            }
        };
        let kv_dtype = match fields.remove("kv_dtype") {
            None | Some(Value::Null) => None,
            // Whether it fits the model's heads is the request's rule (`check_kv_dtype`).
            Some(v) => {
                let invalid = |e: String| ApiError::invalid("kv_compression.kv_dtype", e);
                let text =
                    v.as_str().ok_or_else(|| invalid(format!("must be a string, got {v}")))?;
                Some(text.parse::<KvDtype>().map_err(|e| invalid(e.to_string()))?)
            }
        };
        let method = if fields.is_empty() {
            default.clone()
        } else {
            CompressionConfig::from_value(Value::Object(fields))
                .map_err(|e| ApiError::compression(&e))?
        };
        Ok(Self { method, max_kv, prefill_compression, kv_dtype })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<RequestCompression, ApiError> {
        RequestCompression::parse(Some(&v), &CompressionConfig::Full)
    }

    #[test]
    fn request_fields_sit_beside_the_method() {
        let r = parse(json!({"method": "h2o", "budget": 0.5, "max_kv": 64})).unwrap();
        assert_eq!(r.method.label(), "h2o@50%");
        assert_eq!((r.max_kv, r.prefill_compression), (Some(64), None));
        // Alone, they apply to the server's default method.
        let r = parse(json!({"max_kv": 8, "prefill_compression": "once"})).unwrap();
        assert_eq!(r.method, CompressionConfig::Full);
        assert_eq!((r.max_kv, r.prefill_compression), (Some(8), Some(PrefillCompression::Once)));
        let r = parse(json!({"method": "h2o", "budget": 0.5, "kv_dtype": "q4_0r"})).unwrap();
        assert_eq!(
            (r.method.label().as_str(), r.kv_dtype),
            ("h2o@50%", Some(KvDtype::Q4_0Rotated))
        );
        let none = RequestCompression::parse(None, &CompressionConfig::Full).unwrap();
        assert_eq!((none.max_kv, none.prefill_compression, none.kv_dtype), (None, None, None));
    }

    #[test]
    fn bad_request_fields_are_named() {
        let param = |v: Value| parse(v).unwrap_err().param.unwrap();
        assert_eq!(param(json!({"method": "h2o", "max_kv": "many"})), "kv_compression.max_kv");
        // The bound's value is the request's rule, named as this API names the field.
        let zero = ApiError::from(kvmerger_engine::check_max_kv(Some(0)).unwrap_err());
        assert_eq!(zero.param.as_deref(), Some("kv_compression.max_kv"));
        assert_eq!(
            param(json!({"method": "h2o", "prefill_compression": "twice"})),
            "kv_compression.prefill_compression"
        );
        assert_eq!(param(json!({"kv_dtype": "q2_k"})), "kv_compression.kv_dtype");
        assert_eq!(param(json!({"kv_dtype": 8})), "kv_compression.kv_dtype");
        assert_eq!(param(json!({"method": "nope"})), "kv_compression.method");
    }
}
