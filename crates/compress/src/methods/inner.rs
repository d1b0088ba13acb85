//! The method a wrapper (AdaKV, merge-on-evict) drives: a method configuration without a
//! budget of its own (the wrapper's applies), written as its name when it keeps its
//! defaults (`scorer=snapkv`) or as a JSON object otherwise
//! (`scorer={"method":"snapkv","window":64}`).

use std::fmt;
use std::sync::Arc;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use crate::config::{CompressionConfig, METHOD_NAMES};
use crate::error::{CompressError, Result};
use crate::method::{CompressionMethod, Scorer};

/// A wrapped method: its configuration and the method built from it.
#[derive(Clone)]
pub struct InnerMethod {
    config: Box<CompressionConfig>,
    method: Arc<dyn CompressionMethod>,
}

impl InnerMethod {
    /// The method `name` with its default parameters.
    pub fn named(name: &str) -> Result<Self> {
        Self::new(CompressionConfig::from_cli(name, None, &[])?)
    }

    fn new(config: CompressionConfig) -> Result<Self> {
        if config == CompressionConfig::Full {
            return Err(CompressError::invalid("method", "the full cache compresses nothing"));
        }
        let method = Arc::from(config.build()?);
        Ok(Self { config: Box::new(config), method })
    }

    pub fn config(&self) -> &CompressionConfig {
        &self.config
    }

    pub fn method(&self) -> &dyn CompressionMethod {
        &*self.method
    }

    pub fn name(&self) -> &'static str {
        self.config.name()
    }

    /// The wrapped method as a scorer, or an error naming `field` and the methods that are.
    pub fn scorer(&self, field: &str) -> Result<&dyn Scorer> {
        self.method.scorer().ok_or_else(|| {
            let scorers: Vec<&str> = METHOD_NAMES
                .iter()
                .filter(|name| Self::named(name).is_ok_and(|m| m.method.scorer().is_some()))
                .copied()
                .collect();
            CompressError::invalid(
                field,
                format!(
                    "`{}` keeps no per-entry scores; a scorer is one of: {}",
                    self.name(),
                    scorers.join(", ")
                ),
            )
        })
    }

    /// The configuration's fields other than the method and its (unused) budget.
    fn parameters(config: &CompressionConfig) -> serde_json::Map<String, Value> {
        match serde_json::to_value(config) {
            Ok(Value::Object(mut obj)) => {
                obj.remove("budget");
                obj
            }
            _ => unreachable!("a configuration serialises to a JSON object"),
        }
    }
}

impl PartialEq for InnerMethod {
    fn eq(&self, other: &Self) -> bool {
        self.config == other.config
    }
}

impl fmt::Debug for InnerMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.config.fmt(f)
    }
}

impl Serialize for InnerMethod {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mine = Self::parameters(&self.config);
        let defaults = Self::named(self.name()).map(|d| Self::parameters(&d.config));
        if defaults.is_ok_and(|d| d == mine) {
            serializer.serialize_str(self.name())
        } else {
            mine.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for InnerMethod {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let inner = match Value::deserialize(deserializer)? {
            Value::String(name) => Self::named(&name),
            Value::Object(obj) if obj.contains_key("budget") => Err(CompressError::invalid(
                "budget",
                "a wrapped method takes the wrapper's budget, not one of its own",
            )),
            Value::Object(obj) => {
                CompressionConfig::from_json(&Value::Object(obj).to_string()).and_then(Self::new)
            }
            other => Err(CompressError::invalid(
                "method",
                format!("expected a method name or a JSON object, got {other}"),
            )),
        };
        inner.map_err(de::Error::custom)
    }
}
