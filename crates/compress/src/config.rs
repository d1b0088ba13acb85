//! `CompressionConfig`: every method and its parameters, as one serde-tagged enum, so a
//! method can be named on the command line (`--method kvmerger --budget 35% -P threshold=0.8`)
//! or in JSON (`{"method": "kvmerger", "budget": "35%", "threshold": 0.8}`).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::budget::Budget;
use crate::error::{CompressError, Result};
use crate::method::CompressionMethod;
use crate::methods::{
    CamConfig, FullCache, H2oConfig, KeyDiffConfig, KnormConfig, KvMergerConfig, SnapKvConfig,
    StreamingLlmConfig, TovaConfig,
};

/// What the method table says about one method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodInfo {
    /// The name on the command line and in JSON (`"method": "kvmerger"`).
    pub name: &'static str,
    /// Other names accepted for it.
    pub aliases: &'static [&'static str],
    /// One line: what it does and where it comes from.
    pub summary: &'static str,
}

/// The one list of methods. Each line names a variant, its parameter struct (which must
/// have a `budget` field and a `validate` method and implement [`CompressionMethod`]), its
/// name and aliases; the enum, [`METHODS`], [`METHOD_NAMES`] and the per-method `match`es of
/// [`CompressionConfig`] are all generated from it. The full cache, which has no
/// parameters, is written out by hand.
macro_rules! method_table {
    ($(
        #[doc = $summary:literal]
        $variant:ident($config:ty) = $name:literal $(| $alias:literal)*;
    )*) => {
        /// A compression method with its parameters.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
        #[serde(tag = "method")]
        pub enum CompressionConfig {
            /// Keep everything (the reference).
            #[default]
            #[serde(rename = "full")]
            Full,
            $(
                #[doc = $summary]
                #[serde(rename = $name $(, alias = $alias)*)]
                $variant($config),
            )*
        }

        /// Every method, the full cache first.
        pub const METHODS: &[MethodInfo] = &[
            MethodInfo { name: "full", aliases: &[], summary: "Keep everything (the reference)." },
            $(MethodInfo { name: $name, aliases: &[$($alias),*], summary: $summary.trim_ascii() },)*
        ];

        /// Every method name the CLI accepts (aliases aside).
        pub const METHOD_NAMES: [&str; 1 + [$($name),*].len()] = ["full", $($name),*];

        impl CompressionConfig {
            /// The method's name as on the command line.
            pub fn name(&self) -> &'static str {
                match self {
                    Self::Full => "full",
                    $(Self::$variant(_) => $name,)*
                }
            }

            /// The budget, or `Ratio(1.0)` for the full cache.
            pub fn budget(&self) -> Budget {
                match self {
                    Self::Full => Budget::Ratio(1.0),
                    $(Self::$variant(c) => c.budget,)*
                }
            }

            /// Checks every parameter's range; errors name the parameter.
            pub fn validate(&self) -> Result<()> {
                self.budget().validate()?;
                match self {
                    Self::Full => Ok(()),
                    $(Self::$variant(c) => c.validate(),)*
                }
            }

            /// The method object the engine drives.
            pub fn build(&self) -> Result<Box<dyn CompressionMethod>> {
                self.validate()?;
                Ok(match self {
                    Self::Full => Box::new(FullCache),
                    $(Self::$variant(c) => Box::new(c.clone()),)*
                })
            }
        }
    };
}

method_table! {
    /// Attention sinks plus a recent window (Xiao et al., 2024).
    StreamingLlm(StreamingLlmConfig) = "streaming_llm" | "streaming" | "streamingllm";
    /// Heavy hitters plus a recent window (Zhang et al., 2023).
    H2o(H2oConfig) = "h2o";
    /// Observation-window attention, pooled (Li et al., 2024).
    Snapkv(SnapKvConfig) = "snapkv" | "snap_kv";
    /// Eviction with value merging (Zhang et al., 2024).
    Cam(CamConfig) = "cam";
    /// Adaptive merging of similar adjacent keys (Wang et al., 2024).
    Kvmerger(KvMergerConfig) = "kvmerger" | "kv_merger";
    /// Lowest key norms (Devoto et al., 2024).
    Knorm(KnormConfig) = "knorm" | "k_norm";
    /// Keys least like the mean key direction (Park et al., 2025).
    Keydiff(KeyDiffConfig) = "keydiff" | "key_diff";
    /// Last query's attention, evicting each decode step (Oren et al., 2024).
    Tova(TovaConfig) = "tova";
}

/// The method a name or alias stands for; case and `-`/`_` do not matter.
pub fn method_info(name: &str) -> Option<&'static MethodInfo> {
    let name = name.trim().to_ascii_lowercase().replace('-', "_");
    METHODS.iter().find(|m| m.name == name || m.aliases.contains(&name.as_str()))
}

impl CompressionConfig {
    /// Builds a configuration from a method name, an optional budget and `key=value`
    /// parameter overrides. Values are read as JSON where they parse (`0.8`, `true`,
    /// `{"fixed": 5}`), as strings otherwise (`adaptive`, `log_count`).
    pub fn from_cli(
        method: &str,
        budget: Option<Budget>,
        params: &[(String, String)],
    ) -> Result<Self> {
        let info = method_info(method)
            .ok_or_else(|| CompressError::UnknownMethod(method.trim().to_string()))?;
        let mut obj = Map::new();
        obj.insert("method".into(), Value::String(info.name.into()));
        Self::from_fields(obj, budget, params)
    }

    /// This configuration with the budget and `key=value` parameters replaced, read as in
    /// [`Self::from_cli`] (a configuration file, then flags that override it).
    pub fn with_overrides(
        &self,
        budget: Option<Budget>,
        params: &[(String, String)],
    ) -> Result<Self> {
        match serde_json::to_value(self) {
            Ok(Value::Object(obj)) => Self::from_fields(obj, budget, params),
            _ => unreachable!("a configuration serialises to a JSON object"),
        }
    }

    /// Applies a budget and parameters to a configuration's JSON fields, then parses and
    /// validates the result.
    fn from_fields(
        mut obj: Map<String, Value>,
        budget: Option<Budget>,
        params: &[(String, String)],
    ) -> Result<Self> {
        let method = obj.get("method").and_then(Value::as_str).unwrap_or_default().to_string();
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
            if key == "budget" && budget.is_some() {
                return Err(CompressError::invalid(
                    "budget",
                    "given twice: as --budget and as a parameter; keep one",
                ));
            }
            // `nan`, `inf` and `1e999` read as strings or infinities below: refuse them here,
            // naming the parameter.
            if v.trim().parse::<f64>().is_ok_and(|x| !x.is_finite()) {
                return Err(CompressError::invalid(key, format!("must be finite, got `{v}`")));
            }
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
            &kv(&[("threshold", "0.8"), ("sigma", "adaptive"), ("mass", "scale_values")]),
        )
        .unwrap();
        let CompressionConfig::Kvmerger(k) = &c else { panic!("{c:?}") };
        assert_eq!(
            (k.threshold, k.sigma, k.mass, k.budget),
            (0.8, Sigma::Adaptive, MassRule::ScaleValues, Budget::Ratio(0.35))
        );
        assert_eq!(c.label(), "kvmerger(mass=scale_values;sigma=adaptive;threshold=0.8)@35%");
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

    #[test]
    fn budget_parameter_takes_the_budget_grammar() {
        for (text, budget) in [
            ("0.35", Budget::Ratio(0.35)),
            ("35%", Budget::Ratio(0.35)),
            ("1", Budget::Ratio(1.0)),
            ("512t", Budget::Tokens(512)),
            (r#"{"tokens": 512}"#, Budget::Tokens(512)),
        ] {
            let c = CompressionConfig::from_cli("h2o", None, &kv(&[("budget", text)])).unwrap();
            assert_eq!(c.budget(), budget, "{text}");
        }
        for (text, needle) in [("512", "512t"), ("0", "ratio"), ("2.5", "at most 1")] {
            let err = CompressionConfig::from_cli("h2o", None, &kv(&[("budget", text)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
        let err =
            CompressionConfig::from_cli("h2o", Some(Budget::Ratio(0.5)), &kv(&[("budget", "0.3")]))
                .unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
    }

    #[test]
    fn json_configs_take_the_budget_grammar() {
        for (json, budget) in [
            (r#"{"method": "snapkv", "budget": 0.35}"#, Budget::Ratio(0.35)),
            (r#"{"method": "snapkv", "budget": "35%"}"#, Budget::Ratio(0.35)),
            (r#"{"method": "snapkv", "budget": "512t"}"#, Budget::Tokens(512)),
            (r#"{"method": "snapkv", "budget": {"ratio": 0.35}}"#, Budget::Ratio(0.35)),
            (r#"{"method": "snapkv", "budget": {"tokens": 512}}"#, Budget::Tokens(512)),
            (r#"{"method": "snapkv", "budget": 1}"#, Budget::Ratio(1.0)),
        ] {
            assert_eq!(CompressionConfig::from_json(json).unwrap().budget(), budget, "{json}");
        }
        let err = CompressionConfig::from_json(r#"{"method": "snapkv", "budget": 512}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("512t"), "{err}");
    }

    #[test]
    fn overrides_replace_fields_of_a_configuration() {
        let file = CompressionConfig::from_json(
            r#"{"method": "kvmerger", "budget": "35%", "threshold": 0.8, "mass": "log_count"}"#,
        )
        .unwrap();
        let c =
            file.with_overrides(Some(Budget::Ratio(0.2)), &kv(&[("threshold", "0.6")])).unwrap();
        let CompressionConfig::Kvmerger(k) = &c else { panic!("{c:?}") };
        assert_eq!(
            (k.budget, k.threshold, k.mass),
            (Budget::Ratio(0.2), 0.6, MassRule::LogCount),
            "flags override the file's fields, the rest stays"
        );
        assert_eq!(file.with_overrides(None, &[]).unwrap(), file);
        let err = file.with_overrides(None, &kv(&[("bogus", "1")])).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn non_finite_parameters_are_refused_by_name() {
        for info in METHODS {
            let Value::Object(defaults) =
                serde_json::to_value(CompressionConfig::from_cli(info.name, None, &[]).unwrap())
                    .unwrap()
            else {
                panic!("{} does not serialise to an object", info.name)
            };
            for key in defaults.keys().filter(|k| *k != "method") {
                for bad in ["nan", "NaN", "inf", "-inf", "1e999"] {
                    let err = CompressionConfig::from_cli(info.name, None, &kv(&[(key, bad)]))
                        .unwrap_err()
                        .to_string();
                    assert!(err.contains(key.as_str()), "{} {key}={bad}: {err}", info.name);
                }
            }
        }
    }

    #[test]
    fn the_method_table_resolves_names_and_aliases() {
        assert_eq!(
            METHOD_NAMES,
            [
                "full",
                "streaming_llm",
                "h2o",
                "snapkv",
                "cam",
                "kvmerger",
                "knorm",
                "keydiff",
                "tova"
            ]
        );
        for info in METHODS {
            for name in std::iter::once(&info.name).chain(info.aliases) {
                assert_eq!(method_info(name).map(|m| m.name), Some(info.name));
                assert_eq!(method_info(&name.to_uppercase().replace('_', "-")), Some(info));
                let budget = (info.name != "full").then_some(Budget::Ratio(0.5));
                let c = CompressionConfig::from_cli(name, budget, &[]).unwrap();
                assert_eq!(c.name(), info.name);
                let json = format!(r#"{{"method": "{name}"}}"#);
                assert_eq!(CompressionConfig::from_json(&json).unwrap().name(), info.name);
            }
            assert!(!info.summary.is_empty() && !info.summary.starts_with(' '));
        }
        let err = CompressionConfig::from_cli("magic", None, &[]).unwrap_err().to_string();
        assert!(METHOD_NAMES.iter().all(|n| err.contains(n)), "{err}");
    }
}
