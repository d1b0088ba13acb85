//! `CompressionConfig`: every method and its parameters, as one serde-tagged enum, so a
//! method can be named on the command line (`--method kvmerger --budget 0.35 -p threshold=0.8`)
//! or in JSON (`{"method": "kvmerger", "budget": {"ratio": 0.35}, "threshold": 0.8}`).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::budget::Budget;
use crate::error::{CompressError, Result};
use crate::method::CompressionMethod;
use crate::methods::{
    CamConfig, FullCache, H2oConfig, KvMergerConfig, SnapKvConfig, StreamingLlmConfig,
};

/// A compression method with its parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
#[derive(Default)]
pub enum CompressionConfig {
    /// Keep everything (the reference).
    #[default]
    Full,
    /// Attention sinks plus a recent window (Xiao et al., 2024).
    #[serde(alias = "streaming", alias = "streamingllm")]
    StreamingLlm(StreamingLlmConfig),
    /// Heavy hitters plus a recent window (Zhang et al., 2023).
    H2o(H2oConfig),
    /// Observation-window attention, pooled (Li et al., 2024).
    #[serde(alias = "snap_kv")]
    Snapkv(SnapKvConfig),
    /// Eviction with value merging (Zhang et al., 2024).
    Cam(CamConfig),
    /// Adaptive merging of similar adjacent keys (Wang et al., 2024).
    #[serde(alias = "kv_merger")]
    Kvmerger(KvMergerConfig),
}

/// Every method name the CLI accepts.
pub const METHOD_NAMES: [&str; 6] = ["full", "streaming_llm", "h2o", "snapkv", "cam", "kvmerger"];

impl CompressionConfig {
    /// Builds a configuration from a method name, an optional budget and `key=value`
    /// parameter overrides. Values are read as JSON where they parse (`0.8`, `true`,
    /// `{"fixed": 5}`), as strings otherwise (`adaptive`, `log_count`).
    pub fn from_cli(
        method: &str,
        budget: Option<Budget>,
        params: &[(String, String)],
    ) -> Result<Self> {
        let method = method.trim().to_ascii_lowercase().replace('-', "_");
        if !METHOD_NAMES.contains(&method.as_str())
            && !["streaming", "streamingllm", "snap_kv", "kv_merger"].contains(&method.as_str())
        {
            return Err(CompressError::UnknownMethod(method));
        }
        let mut obj = Map::new();
        obj.insert("method".into(), Value::String(method.clone()));
        if let Some(b) = budget {
            if method == "full" {
                if b != Budget::Ratio(1.0) {
                    return Err(CompressError::invalid("budget", "the full cache takes no budget"));
                }
            } else {
                obj.insert("budget".into(), serde_json::to_value(b).expect("budget serialises"));
            }
        }
        for (k, v) in params {
            let key = k.trim().replace('-', "_");
            let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.clone()));
            obj.insert(key, value);
        }
        let config: Self = serde_json::from_value(Value::Object(obj))
            .map_err(|e| CompressError::invalid(format!("{method} parameters"), e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a JSON configuration and validates it.
    pub fn from_json(text: &str) -> Result<Self> {
        let config: Self = serde_json::from_str(text)
            .map_err(|e| CompressError::invalid("configuration", e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// The method's name as on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::StreamingLlm(_) => "streaming_llm",
            Self::H2o(_) => "h2o",
            Self::Snapkv(_) => "snapkv",
            Self::Cam(_) => "cam",
            Self::Kvmerger(_) => "kvmerger",
        }
    }

    /// The budget, or `Ratio(1.0)` for the full cache.
    pub fn budget(&self) -> Budget {
        match self {
            Self::Full => Budget::Ratio(1.0),
            Self::StreamingLlm(c) => c.budget,
            Self::H2o(c) => c.budget,
            Self::Snapkv(c) => c.budget,
            Self::Cam(c) => c.budget,
            Self::Kvmerger(c) => c.budget,
        }
    }

    /// Checks every parameter's range; errors name the parameter.
    pub fn validate(&self) -> Result<()> {
        self.budget().validate()?;
        match self {
            Self::Full => Ok(()),
            Self::StreamingLlm(c) => c.validate(),
            Self::H2o(c) => c.validate(),
            Self::Snapkv(c) => c.validate(),
            Self::Cam(c) => c.validate(),
            Self::Kvmerger(c) => c.validate(),
        }
    }

    /// The method object the engine drives.
    pub fn build(&self) -> Result<Box<dyn CompressionMethod>> {
        self.validate()?;
        Ok(match self {
            Self::Full => Box::new(FullCache),
            Self::StreamingLlm(c) => Box::new(c.clone()),
            Self::H2o(c) => Box::new(c.clone()),
            Self::Snapkv(c) => Box::new(c.clone()),
            Self::Cam(c) => Box::new(c.clone()),
            Self::Kvmerger(c) => Box::new(c.clone()),
        })
    }

    /// A short label for tables: `kvmerger@35%`, with the parameters that differ from the
    /// method's defaults: `kvmerger(mass=log_count;sigma=adaptive)@35%`.
    pub fn label(&self) -> String {
        if *self == Self::Full {
            return "full".to_string();
        }
        let changed = match (
            serde_json::to_value(self),
            Self::from_cli(self.name(), Some(self.budget()), &[]).map(serde_json::to_value),
        ) {
            (Ok(Value::Object(mine)), Ok(Ok(Value::Object(default)))) => mine
                .iter()
                .filter(|(k, v)| default.get(*k) != Some(*v))
                .map(|(k, v)| format!("{k}={}", short(v)))
                .collect::<Vec<_>>(),
            _ => Vec::new(),
        };
        if changed.is_empty() {
            format!("{}@{}", self.name(), self.budget())
        } else {
            format!("{}({})@{}", self.name(), changed.join(";"), self.budget())
        }
    }
}

/// A parameter value as a label shows it: strings bare, numbers to four decimals.
fn short(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(x) if n.is_f64() => {
                let t = format!("{x:.4}");
                t.trim_end_matches('0').trim_end_matches('.').to_string()
            }
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::{MassRule, Sigma};

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn cli_parameters_reach_the_method() {
        let c = CompressionConfig::from_cli(
            "kvmerger",
            Some(Budget::Ratio(0.35)),
            &kv(&[("threshold", "0.8"), ("sigma", "adaptive"), ("mass", "log_count")]),
        )
        .unwrap();
        let CompressionConfig::Kvmerger(k) = &c else { panic!("{c:?}") };
        assert_eq!(
            (k.threshold, k.sigma, k.mass, k.budget),
            (0.8, Sigma::Adaptive, MassRule::LogCount, Budget::Ratio(0.35))
        );
        assert_eq!(c.label(), "kvmerger(mass=log_count;sigma=adaptive;threshold=0.8)@35%");
        assert_eq!(
            CompressionConfig::from_cli("h2o", Some(Budget::Ratio(0.5)), &[]).unwrap().label(),
            "h2o@50%"
        );
        let again = CompressionConfig::from_json(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(again, c);
        let c = CompressionConfig::from_cli("kvmerger", None, &kv(&[("sigma", "3")])).unwrap();
        assert!(matches!(c, CompressionConfig::Kvmerger(ref k) if k.sigma == Sigma::Fixed(3.0)));
    }

    #[test]
    fn every_method_parses_from_its_name() {
        for name in METHOD_NAMES {
            let budget = (name != "full").then_some(Budget::Ratio(0.5));
            assert_eq!(CompressionConfig::from_cli(name, budget, &[]).unwrap().name(), name);
        }
    }

    #[test]
    fn bad_input_names_what_is_wrong() {
        let err = CompressionConfig::from_cli("magic", None, &[]).unwrap_err();
        assert!(err.to_string().contains("magic"));
        let err =
            CompressionConfig::from_cli("kvmerger", None, &kv(&[("sigma", "-1")])).unwrap_err();
        assert!(err.to_string().contains("sigma"), "{err}");
        let err = CompressionConfig::from_cli("h2o", None, &kv(&[("bogus", "1")])).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        let err = CompressionConfig::from_json(r#"{"method": "h2o", "budget": {"ratio": 0}}"#)
            .unwrap_err();
        assert!(err.to_string().contains("budget"), "{err}");
    }
}
