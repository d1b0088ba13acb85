//! `CompressionConfig`: every method and its parameters, as one serde-tagged enum, so a
//! method can be named on the command line (`--method kvmerger --budget 35% -P threshold=0.8`)
//! or in JSON (`{"method": "kvmerger", "budget": "35%", "threshold": 0.8}`).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::budget::Budget;
use crate::error::{CompressError, Result};
use crate::method::CompressionMethod;
use crate::methods::{
    AdaKvConfig, CamConfig, ExpectedAttentionConfig, FullCache, H2oConfig, KeyDiffConfig,
    KnormConfig, KvMergerConfig, KvzipConfig, MergeOnEvictConfig, PyramidKvConfig, SnapKvConfig,
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
    /// A scorer's entries compared over the heads of a layer, which share its budget (Feng et al., 2024).
    Adakv(AdaKvConfig) = "adakv" | "ada_kv";
    /// SnapKV under layer budgets falling linearly with depth (Cai et al., 2024).
    Pyramidkv(PyramidKvConfig) = "pyramidkv" | "pyramid_kv";
    /// A scorer's evicted entries folded into their most similar kept ones (kvpress's MergingPress).
    Merge(MergeOnEvictConfig) = "merge" | "merge_on_evict" | "merging";
    /// Attention expected from future queries, modelled from the prompt's (Devoto et al., 2025).
    ExpectedAttention(ExpectedAttentionConfig) = "expected_attention" | "expectedattention" | "ea";
    /// Most attention paid while the model repeats its context, at the cost of a second prefill (Kim et al., 2025).
    Kvzip(KvzipConfig) = "kvzip" | "kv_zip";
}

/// The error for a name that [`method_info`] does not know, listing the names it does.
fn unknown_method(name: &str) -> CompressError {
    CompressError::UnknownMethod { name: name.trim().to_string(), known: METHOD_NAMES.join(", ") }
}

/// The method a name or alias stands for; case and `-`/`_` do not matter.
pub fn method_info(name: &str) -> Option<&'static MethodInfo> {
    let name = name.trim().to_ascii_lowercase().replace('-', "_");
    METHODS.iter().find(|m| m.name == name || m.aliases.contains(&name.as_str()))
}

impl CompressionConfig {
    /// Every parameter of the method with its value, `method` left out (`kvmerger
    /// methods` lists them); unlike the serialised form, this includes KVMerger's
    /// parameters that are written out only when set.
    pub fn parameters(&self) -> Map<String, Value> {
        let mut params = match self {
            Self::Kvmerger(c) => c.all_parameters(),
            _ => match serde_json::to_value(self) {
                Ok(Value::Object(obj)) => obj,
                _ => unreachable!("a configuration serialises to a JSON object"),
            },
        };
        params.remove("method");
        params
    }

    /// Builds a configuration from a method name, an optional budget and `key=value`
    /// parameter overrides. Values are read as JSON where they parse (`0.8`, `true`,
    /// `{"fixed": 5}`), as strings otherwise (`adaptive`, `log_count`).
    pub fn from_cli(
        method: &str,
        budget: Option<Budget>,
        params: &[(String, String)],
    ) -> Result<Self> {
        let info = method_info(method).ok_or_else(|| unknown_method(method))?;
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
    /// validates the result. A budget given to a configuration with per-layer budgets
    /// rescales them to average it (see [`scale_layer_budgets`]).
    fn from_fields(
        mut obj: Map<String, Value>,
        budget: Option<Budget>,
        params: &[(String, String)],
    ) -> Result<Self> {
        if let Some(b) = budget {
            let b_value = serde_json::to_value(b).expect("budget serialises");
            let changed = obj.get("budget") != Some(&b_value);
            if let Some(profile) = obj.get("layer_budgets").filter(|v| changed && !v.is_null()) {
                let Budget::Ratio(mean) = b else {
                    return Err(CompressError::invalid(
                        "budget",
                        format!(
                            "`layer_budgets` are shares of the prompt: a token budget ({b}) \
                             cannot rescale them; give a share (0.35, 35%)"
                        ),
                    ));
                };
                let profile: Vec<f64> = serde_json::from_value(profile.clone())
                    .map_err(|e| CompressError::invalid("layer_budgets", e.to_string()))?;
                obj.insert("layer_budgets".into(), scale_layer_budgets(&profile, mean).into());
            }
            obj.insert("budget".into(), b_value);
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
        Self::from_object(obj)
    }

    /// Parses a JSON configuration and validates it.
    pub fn from_json(text: &str) -> Result<Self> {
        match serde_json::from_str(text) {
            Ok(value) => Self::from_value(value),
            Err(e) => Err(CompressError::invalid("configuration", format!("not JSON: {e}"))),
        }
    }

    /// A configuration from parsed JSON (an HTTP request's `kv_compression`), checked as
    /// [`Self::from_json`] checks it.
    pub fn from_value(value: Value) -> Result<Self> {
        match value {
            Value::Object(obj) => Self::from_object(obj),
            other => Err(CompressError::invalid(
                "configuration",
                format!("expected a JSON object such as {{\"method\": \"h2o\"}}, got {other}"),
            )),
        }
    }

    /// Parses and validates a configuration's fields: the method by name or alias (case and
    /// `-`/`_` aside), then its parameters; errors name the field at fault.
    fn from_object(mut obj: Map<String, Value>) -> Result<Self> {
        let name = match obj.get("method") {
            Some(Value::String(name)) => name.clone(),
            Some(other) => {
                return Err(CompressError::invalid(
                    "method",
                    format!("must be a method name, got {other}"),
                ))
            }
            None => {
                return Err(CompressError::invalid(
                    "method",
                    format!("missing; one of: {}", METHOD_NAMES.join(", ")),
                ))
            }
        };
        let info = method_info(&name).ok_or_else(|| unknown_method(&name))?;
        obj.insert("method".into(), Value::String(info.name.into()));
        if info.name == "full" {
            return Self::full_from(&obj);
        }
        let config: Self = serde_json::from_value(Value::Object(obj.clone()))
            .map_err(|e| field_at_fault(&obj, e))?;
        config.validate()?;
        Ok(config)
    }

    /// The full cache: it has no parameters, and its only budget is everything (`1`), the
    /// same rule for the command line and JSON.
    fn full_from(obj: &Map<String, Value>) -> Result<Self> {
        for (key, value) in obj.iter().filter(|(k, _)| *k != "method") {
            if key != "budget" {
                return Err(CompressError::invalid(key, "the full cache takes no parameters"));
            }
            let budget: Budget = serde_json::from_value(value.clone())
                .map_err(|e| CompressError::invalid("budget", without_prefix("budget", &e)))?;
            if budget != Budget::Ratio(1.0) {
                return Err(CompressError::invalid(
                    "budget",
                    format!("the full cache keeps everything; it takes no budget (got {budget})"),
                ));
            }
        }
        Ok(Self::Full)
    }

    /// Checks the configuration against the model it is to run on: per-layer budgets must
    /// give one share per layer.
    pub fn check_model(&self, n_layers: usize) -> Result<()> {
        let Self::Kvmerger(k) = self else { return Ok(()) };
        match &k.layer_budgets {
            Some(b) if b.len() != n_layers => {
                let made_for = match &k.layer_budgets_model {
                    Some(model) => format!(" (they were made for {model})"),
                    None => String::new(),
                };
                Err(CompressError::invalid(
                    "layer_budgets",
                    format!(
                        "{} shares for a model of {n_layers} layers{made_for}: give one per \
                         layer, e.g. from `kvmerger analyze --suggest-budget` on this model",
                        b.len()
                    ),
                ))
            }
            _ => Ok(()),
        }
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
                // Where per-layer budgets came from is not part of what runs.
                .filter(|(k, v)| default.get(*k) != Some(*v) && *k != "layer_budgets_model")
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

/// Names the field behind a parse error. serde reports an error inside an internally
/// tagged enum without the field's name, so each field is parsed alone with the method:
/// the first that fails on its own is the one at fault.
fn field_at_fault(obj: &Map<String, Value>, error: serde_json::Error) -> CompressError {
    let method = obj.get("method").cloned().unwrap_or(Value::Null);
    for (key, value) in obj.iter().filter(|(k, _)| *k != "method") {
        let alone =
            Map::from_iter([("method".into(), method.clone()), (key.clone(), value.clone())]);
        if let Err(e) = serde_json::from_value::<CompressionConfig>(Value::Object(alone)) {
            return CompressError::invalid(key, without_prefix(key, &e));
        }
    }
    CompressError::invalid(format!("{} parameters", short(&method)), error.to_string())
}

/// A parse error's message without the `invalid parameter `key`: ` that a check inside the
/// parser (a budget's range) already put in front.
fn without_prefix(key: &str, error: &serde_json::Error) -> String {
    let message = error.to_string();
    let prefix = format!("invalid parameter `{key}`: ");
    message.strip_prefix(&prefix).unwrap_or(&message).to_string()
}

/// Per-layer budget shares rescaled to average `mean`: each layer keeps its share of the
/// profile (proportional, capped at 1), found by bisection on the factor. `kvmerger analyze
/// --suggest-budget` makes a profile this way from merge ratios, and a `--budget` given to
/// a configuration with per-layer budgets rescales them so.
pub fn scale_layer_budgets(profile: &[f64], mean: f64) -> Vec<f64> {
    let n = profile.len().max(1) as f64;
    let at = |s: f64| -> Vec<f64> { profile.iter().map(|r| (r * s).clamp(1e-3, 1.0)).collect() };
    let average = |v: &[f64]| v.iter().sum::<f64>() / n;
    let (mut lo, mut hi) = (0.0, 1e6);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if average(&at(mid)) < mean {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    at(0.5 * (lo + hi))
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
            &kv(&[
                ("budget_mode", "exact"),
                ("threshold", "0.8"),
                ("sigma", "adaptive"),
                ("mass", "scale_values"),
            ]),
        )
        .unwrap();
        let CompressionConfig::Kvmerger(k) = &c else { panic!("{c:?}") };
        assert_eq!(
            (k.threshold, k.sigma, k.mass, k.budget),
            (0.8, Sigma::Adaptive, MassRule::ScaleValues, Budget::Ratio(0.35))
        );
        assert_eq!(
            c.label(),
            "kvmerger(budget_mode=exact;mass=scale_values;sigma=adaptive;threshold=0.8)@35%"
        );
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
            r#"{"method": "kvmerger", "budget": "35%", "budget_mode": "exact", "threshold": 0.8, "mass": "log_count"}"#,
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

    /// `--budget` on a configuration with per-layer budgets (from `analyze --suggest-budget`)
    /// rescales them to average it; the label then says what runs.
    #[test]
    fn a_budget_rescales_per_layer_budgets_to_its_average() {
        let file = CompressionConfig::from_json(
            r#"{"method": "kvmerger", "budget": 0.35, "layer_budgets": [0.2, 0.5, 0.35]}"#,
        )
        .unwrap();
        let c = file.with_overrides(Some(Budget::Ratio(0.2)), &[]).unwrap();
        let CompressionConfig::Kvmerger(k) = &c else { panic!("{c:?}") };
        let layers = k.layer_budgets.clone().unwrap();
        let average = layers.iter().sum::<f64>() / layers.len() as f64;
        assert!((average - 0.2).abs() < 1e-6, "{layers:?}");
        assert!((layers[1] / layers[0] - 2.5).abs() < 1e-6, "the profile keeps its shape");
        assert!(c.label().ends_with("@20%"), "{}", c.label());
        let err = file.with_overrides(Some(Budget::Tokens(512)), &[]).unwrap_err().to_string();
        assert!(err.contains("layer_budgets") && err.contains("share"), "{err}");
        // Per-layer budgets that do not average the budget would run something else than
        // the label says.
        let err =
            CompressionConfig::from_cli("kvmerger", None, &kv(&[("layer_budgets", "[0.2, 0.2]")]))
                .unwrap_err()
                .to_string();
        assert!(err.contains("layer_budgets") && err.contains("average"), "{err}");
    }

    #[test]
    fn per_layer_budgets_must_give_one_share_per_layer_of_the_model() {
        let c = CompressionConfig::from_json(
            r#"{"method": "kvmerger", "budget": 0.2, "layer_budgets": [0.2],
                "layer_budgets_model": "tiny.gguf (1 layers)"}"#,
        )
        .unwrap();
        c.check_model(1).unwrap();
        let err = c.check_model(30).unwrap_err().to_string();
        assert!(err.contains("layer_budgets") && err.contains("30 layers"), "{err}");
        assert!(err.contains("tiny.gguf"), "names the model they were made for: {err}");
        assert_eq!(c.label(), "kvmerger(layer_budgets=[0.2])@20%", "provenance is not a setting");
    }

    #[test]
    fn parameters_the_chosen_mode_does_not_read_are_refused() {
        for (method, params, needle) in [
            ("kvmerger", &[("threshold", "0.8")][..], "budget_mode = merge"),
            ("kvmerger", &[("threshold", "-5")], "budget_mode = merge"),
            ("kvmerger", &[("compare_to", "anchor")], "budget_mode = exact or threshold"),
            ("kvmerger", &[("protect_window", "8")], "protect_by = window"),
            ("kvmerger", &[("sigma_floor", "0.1")], "sigma = adaptive"),
            ("kvmerger", &[("seed", "3")], "pivot = random"),
            ("kvmerger", &[("merge", "false"), ("sigma", "2")], "merge = false"),
            ("cam", &[("recent_ratio", "0.3")], "eviction = h2o"),
            ("cam", &[("eviction", "h2o"), ("sinks", "8")], "eviction = streaming"),
        ] {
            let name = params.last().unwrap().0;
            let err = CompressionConfig::from_cli(method, None, &kv(params)).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains(&format!("`{name}`")) && text.contains(needle),
                "{params:?}: {text}"
            );
        }
        for (method, params) in [
            ("kvmerger", &[("budget_mode", "exact"), ("threshold", "0.8")][..]),
            ("kvmerger", &[("budget_mode", "threshold"), ("compare_to", "anchor")]),
            ("kvmerger", &[("protect_by", "window"), ("protect_window", "8")]),
            ("kvmerger", &[("sigma", "adaptive"), ("sigma_floor", "0.1")]),
            ("kvmerger", &[("pivot", "random"), ("seed", "3")]),
            ("cam", &[("eviction", "h2o"), ("recent_ratio", "0.3")]),
        ] {
            CompressionConfig::from_cli(method, None, &kv(params)).unwrap();
        }
    }

    #[test]
    fn parse_errors_name_the_field_and_what_it_takes() {
        for (params, needle) in [
            (&[("sigma", "abc")][..], "adaptive"),
            (&[("threshold", "abc")], "f32"),
            (&[("budget_mode", "lots")], "merge"),
        ] {
            let err = CompressionConfig::from_cli("kvmerger", None, &kv(params)).unwrap_err();
            let CompressError::InvalidParameter { name, reason } = &err else { panic!("{err}") };
            assert_eq!(name, params[0].0, "{err}");
            assert!(reason.contains(needle), "{err}");
        }
        let err = CompressionConfig::from_json(r#"{"method": "h2o", "budget": 0}"#).unwrap_err();
        assert_eq!(err.to_string(), "invalid parameter `budget`: ratio must be in (0, 1], got 0");
        let err = CompressionConfig::from_json(r#"{"budget": 0.5}"#).unwrap_err().to_string();
        assert!(err.contains("`method`") && err.contains("missing"), "{err}");
        let err = CompressionConfig::from_json("[1]").unwrap_err().to_string();
        assert!(err.contains("object"), "{err}");
    }

    /// The command line refuses `--method full --budget 0.35`; JSON (the server) the same.
    #[test]
    fn the_full_cache_takes_no_budget_anywhere() {
        for json in [r#"{"method": "full"}"#, r#"{"method": "full", "budget": 1}"#] {
            assert_eq!(CompressionConfig::from_json(json).unwrap(), CompressionConfig::Full);
        }
        for (json, field) in [
            (r#"{"method": "full", "budget": 0.5}"#, "budget"),
            (r#"{"method": "full", "budget": "512t"}"#, "budget"),
            (r#"{"method": "full", "sinks": 4}"#, "sinks"),
        ] {
            let err = CompressionConfig::from_json(json).unwrap_err();
            assert!(
                matches!(&err, CompressError::InvalidParameter { name, .. } if name == field),
                "{json}: {err}"
            );
        }
        let err = CompressionConfig::from_cli("full", Some(Budget::Ratio(0.35)), &[]).unwrap_err();
        assert!(err.to_string().contains("no budget"), "{err}");
        CompressionConfig::from_cli("full", Some(Budget::Ratio(1.0)), &[]).unwrap();
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
                "tova",
                "adakv",
                "pyramidkv",
                "merge",
                "expected_attention",
                "kvzip"
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
    #[test]
    fn listed_parameters_are_every_parameter_and_rebuild_the_configuration() {
        for info in METHODS {
            let defaults = CompressionConfig::from_cli(info.name, None, &[]).unwrap();
            let params = defaults.parameters();
            let mut with_method = params.clone();
            with_method.insert("method".into(), Value::String(info.name.into()));
            let rebuilt: CompressionConfig = serde_json::from_value(Value::Object(with_method))
                .unwrap_or_else(|e| panic!("{}: {e}", info.name));
            assert_eq!(rebuilt, defaults);
            // Nothing the serialised form writes is missing from the listing.
            let Ok(Value::Object(written)) = serde_json::to_value(&defaults) else { panic!() };
            assert!(written.keys().all(|k| k == "method" || params.contains_key(k)));
        }
        let kvmerger = CompressionConfig::from_cli("kvmerger", None, &[]).unwrap().parameters();
        for hidden in ["agree_on", "linkage", "shares_of", "protect_score", "count_weighted"] {
            assert!(kvmerger.contains_key(hidden), "{hidden}");
        }
        assert_eq!(kvmerger["linkage"], "centroid");
    }
}
