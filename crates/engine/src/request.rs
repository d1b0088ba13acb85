//! The one place a generation request's rules are checked. The CLI and the HTTP server
//! both turn what they were given into a [`GenerationRequest`] (or, for a single-sequence
//! run, through the same checks one by one); an error names the field at fault, and each
//! front end words it for its users (a flag, a JSON parameter). What comes out is trusted
//! by the engine, whose own checks guard invariants, not users' input.

use kvmerger_compress::{
    CompressError, CompressionConfig, CompressionMethod, KvDtype, StatsRequest,
};
use thiserror::Error;

use crate::config::ModelConfig;
use crate::error::EngineError;
use crate::prefill::PrefillCompression;
use crate::sampler::SamplingConfig;

/// The highest temperature accepted (OpenAI's bound).
const MAX_TEMPERATURE: f32 = 2.0;

/// What a request is checked against: the model's vocabulary and layers, and the context a
/// sequence may fill (the model's, or less where the front end caps it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    pub vocab_size: usize,
    pub context_length: usize,
    pub n_layers: usize,
    /// Width of a head, which a block-quantized cache must divide into blocks.
    pub head_dim: usize,
}

impl RequestLimits {
    /// The limits of `config`, its context capped at `context` tokens when given.
    pub fn of(config: &ModelConfig, context: Option<usize>) -> Self {
        let full = config.context_length;
        Self {
            vocab_size: config.vocab_size,
            context_length: context.map_or(full, |c| c.min(full)),
            n_layers: config.n_layers,
            head_dim: config.head_dim,
        }
    }

    /// Whether a request checked against these limits can run on `config`.
    pub fn fit(&self, config: &ModelConfig) -> bool {
        self.vocab_size <= config.vocab_size
            && self.context_length <= config.context_length
            && self.n_layers == config.n_layers
            && self.head_dim == config.head_dim
    }
}

/// A request's field, named as the HTTP API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestField {
    Prompt,
    MaxTokens,
    Temperature,
    TopP,
    RepeatPenalty,
    MaxKv,
    PrefillCompression,
    KvDtype,
}

impl RequestField {
    pub fn name(self) -> &'static str {
        match self {
            Self::Prompt => "prompt",
            Self::MaxTokens => "max_tokens",
            Self::Temperature => "temperature",
            Self::TopP => "top_p",
            Self::RepeatPenalty => "repeat_penalty",
            Self::MaxKv => "max_kv",
            Self::PrefillCompression => "prefill_compression",
            Self::KvDtype => "kv_dtype",
        }
    }
}

impl std::fmt::Display for RequestField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a request was refused.
#[derive(Debug, Error)]
pub enum RequestError {
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: RequestField, reason: String },
    /// The compression configuration (its own error names the parameter).
    #[error(transparent)]
    Compression(#[from] CompressError),
}

impl RequestError {
    pub(crate) fn invalid(field: RequestField, reason: impl Into<String>) -> Self {
        Self::Invalid { field, reason: reason.into() }
    }
}

/// A request rule broken where the engine is handed values directly (a session's bound, a
/// sequence's prefill mode): the request layer's error, with the field it names.
impl From<RequestError> for EngineError {
    fn from(e: RequestError) -> Self {
        match e {
            invalid @ RequestError::Invalid { .. } => EngineError::Request(invalid),
            RequestError::Compression(e) => EngineError::Compress(e),
        }
    }
}

/// Checks the sampler's settings: a finite temperature in `0..=2` (0 is greedy), `top_p`
/// in (0, 1] and a positive repeat penalty.
pub fn check_sampling(s: &SamplingConfig) -> Result<(), RequestError> {
    if !(0.0..=MAX_TEMPERATURE).contains(&s.temperature) {
        return Err(RequestError::invalid(
            RequestField::Temperature,
            format!("must be between 0 and {MAX_TEMPERATURE}, got {}", s.temperature),
        ));
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return Err(RequestError::invalid(
            RequestField::TopP,
            format!("must be in (0, 1], got {}", s.top_p),
        ));
    }
    if !(s.repeat_penalty > 0.0 && s.repeat_penalty.is_finite()) {
        return Err(RequestError::invalid(
            RequestField::RepeatPenalty,
            format!("must be above 0, got {}", s.repeat_penalty),
        ));
    }
    Ok(())
}

/// Checks a prompt given as text, before it is encoded (encoding may add a BOS token, so
/// an empty text would not give an empty token list): text that is empty or only
/// whitespace leaves the model nothing to continue.
pub fn check_prompt_text(text: &str) -> Result<(), RequestError> {
    if text.trim().is_empty() {
        return Err(RequestError::invalid(RequestField::Prompt, "the prompt is empty"));
    }
    Ok(())
}

/// Checks a prompt: at least one token, every id inside the vocabulary, and room left in
/// the context for a token after it.
pub fn check_prompt(prompt: &[u32], limits: &RequestLimits) -> Result<(), RequestError> {
    let invalid = |reason: String| RequestError::invalid(RequestField::Prompt, reason);
    if prompt.is_empty() {
        return Err(invalid("the prompt is empty".into()));
    }
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= limits.vocab_size) {
        return Err(invalid(format!(
            "token id {bad} is outside the vocabulary ({})",
            limits.vocab_size
        )));
    }
    let context = limits.context_length;
    if prompt.len() >= context {
        return Err(invalid(format!(
            "the prompt has {} tokens and the context is {context}: no room is left to \
             generate a token",
            prompt.len()
        )));
    }
    Ok(())
}

/// The tokens to generate after a `prompt_len`-token prompt: `asked` if it is at least 1
/// and fits the context, else an error; without one, `default` or what the context leaves
/// if less. The prompt must have passed [`check_prompt`].
pub fn resolve_max_tokens(
    asked: Option<usize>,
    default: usize,
    prompt_len: usize,
    limits: &RequestLimits,
) -> Result<usize, RequestError> {
    let context = limits.context_length;
    let room = context.saturating_sub(prompt_len);
    match asked {
        None => Ok(default.min(room).max(1)),
        Some(0) => Err(RequestError::invalid(RequestField::MaxTokens, "must be at least 1")),
        Some(n) if n > room => Err(RequestError::invalid(
            RequestField::MaxTokens,
            format!(
                "{n} after a {prompt_len}-token prompt exceeds the context of {context}: at \
                 most {room} fit"
            ),
        )),
        Some(n) => Ok(n),
    }
}

/// Checks a compression configuration against the model's layers and builds it once.
fn check_compression(
    compression: &CompressionConfig,
    limits: &RequestLimits,
) -> Result<Box<dyn CompressionMethod>, RequestError> {
    compression.check_model(limits.n_layers)?;
    Ok(compression.build()?)
}

/// Checks a bound on the entries a head may hold while decoding: at least one entry.
pub fn check_max_kv(max_kv: Option<usize>) -> Result<(), RequestError> {
    match max_kv {
        Some(0) => Err(RequestError::invalid(RequestField::MaxKv, "must be at least 1")),
        _ => Ok(()),
    }
}

/// Checks that a cache stored as `kv_dtype` fits the model's heads: a block-quantized
/// dtype needs heads a whole number of its blocks wide.
pub fn check_kv_dtype(
    kv_dtype: Option<KvDtype>,
    limits: &RequestLimits,
) -> Result<(), RequestError> {
    match kv_dtype.map(|d| d.check_head_dim(limits.head_dim)) {
        Some(Err(e)) => Err(RequestError::invalid(RequestField::KvDtype, e.to_string())),
        _ => Ok(()),
    }
}

/// [`check_max_kv`], and that `method` keeps the bound by a rule of its own for the entries
/// decoding adds.
pub(crate) fn check_decode_bound(
    max_kv: Option<usize>,
    method: &dyn CompressionMethod,
) -> Result<(), RequestError> {
    check_max_kv(max_kv)?;
    match (max_kv, method.decode_bound_refusal()) {
        (Some(_), Some(reason)) => Err(RequestError::invalid(RequestField::MaxKv, reason)),
        _ => Ok(()),
    }
}

/// Checks that `method` can compress a part of the prompt to its final budget and go on,
/// in chunks of `chunk` tokens, recording `stats`: its result must be bounded by its
/// budget (not KVMerger's `threshold` mode), it must have no reason of its own against it
/// (AdaKV's shared layer budgets), it must read no statistic of the whole prompt (CaM's
/// attention at eviction time), and its observation window must fit twice in a chunk (the
/// chunk before each compression holds the window whose attention it reads). The engine
/// checks it where it knows the chunk: when it builds the sequence.
pub(crate) fn check_incremental_prefill(
    method: &dyn CompressionMethod,
    stats: &StatsRequest,
    chunk: usize,
) -> Result<(), RequestError> {
    incremental_refusal(method, stats, chunk).map_or(Ok(()), |reason| {
        Err(RequestError::invalid(RequestField::PrefillCompression, reason))
    })
}

/// Why [`check_incremental_prefill`] refuses, if it does.
fn incremental_refusal(
    method: &dyn CompressionMethod,
    stats: &StatsRequest,
    chunk: usize,
) -> Option<String> {
    let name = method.name();
    if !method.bounded_by_budget() {
        return Some(format!(
            "{name} in threshold mode keeps what its threshold keeps, not a budget: it \
             cannot compress part of a prompt to a budget and go on; use a budget mode or \
             compress once"
        ));
    }
    if let Some(reason) = method.incremental_refusal() {
        return Some(reason);
    }
    if stats.reconstruction.is_some() {
        return Some(format!(
            "{name} scores every entry by the model's reconstruction of the whole prompt, \
             which needs the whole prompt in the cache: compress once"
        ));
    }
    if !stats.evictions.is_empty() {
        return Some(format!(
            "{name} reads attention over the whole prompt when it evicts: it cannot \
             compress during prefill; compress once"
        ));
    }
    let window = stats.windows.iter().max().unwrap_or(1);
    (chunk < 2 * window).then(|| {
        format!(
            "{name}'s observation window of {window} tokens must fit twice in a prefill \
             chunk of {chunk} tokens: use a chunk of at least {}",
            2 * window
        )
    })
}

/// What a front end asks for, before it is checked.
#[derive(Debug, Clone)]
pub struct RequestOptions {
    /// Tokens to generate; `None` takes `default_max_tokens` (or what the context leaves).
    pub max_tokens: Option<usize>,
    pub default_max_tokens: usize,
    pub sampling: SamplingConfig,
    pub compression: CompressionConfig,
    /// Tokens that end generation (the model's end-of-sequence tokens); they are not
    /// delivered as generated text.
    pub stop_tokens: Vec<u32>,
    /// Entries a head may hold while decoding (`None`: no bound beyond the method's own):
    /// the method keeps it by its own rule, or the request is refused naming `max_kv`
    /// ([`check_max_kv`]).
    pub max_kv: Option<usize>,
    /// When the prompt is compressed (`None`: as the engine is configured).
    pub prefill_compression: Option<PrefillCompression>,
    /// How the sequence's cache stores keys and values (`None`: as the engine is
    /// configured); checked against the model's head width ([`check_kv_dtype`]).
    pub kv_dtype: Option<KvDtype>,
}

/// A request checked against a model's limits; the engine trusts it. Built only by
/// [`GenerationRequest::new`].
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    pub(crate) prompt: Vec<u32>,
    /// At least 1; the prompt and these tokens fit the context.
    pub(crate) max_tokens: usize,
    pub(crate) sampling: SamplingConfig,
    pub(crate) compression: CompressionConfig,
    pub(crate) stop_tokens: Vec<u32>,
    pub(crate) max_kv: Option<usize>,
    pub(crate) prefill_compression: Option<PrefillCompression>,
    pub(crate) kv_dtype: Option<KvDtype>,
    /// What it was checked against.
    pub(crate) limits: RequestLimits,
}

impl GenerationRequest {
    /// Checks every rule of a request (see the module's `check_*` functions); errors name
    /// the field.
    pub fn new(
        prompt: Vec<u32>,
        options: RequestOptions,
        limits: &RequestLimits,
    ) -> Result<Self, RequestError> {
        check_prompt(&prompt, limits)?;
        let max_tokens = resolve_max_tokens(
            options.max_tokens,
            options.default_max_tokens,
            prompt.len(),
            limits,
        )?;
        check_sampling(&options.sampling)?;
        let method = check_compression(&options.compression, limits)?;
        check_decode_bound(options.max_kv, &*method)?;
        check_kv_dtype(options.kv_dtype, limits)?;
        Ok(Self {
            prompt,
            max_tokens,
            sampling: options.sampling,
            compression: options.compression,
            stop_tokens: options.stop_tokens,
            max_kv: options.max_kv,
            prefill_compression: options.prefill_compression,
            kv_dtype: options.kv_dtype,
            limits: *limits,
        })
    }

    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    pub fn sampling(&self) -> &SamplingConfig {
        &self.sampling
    }

    pub fn compression(&self) -> &CompressionConfig {
        &self.compression
    }

    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop_tokens
    }
}

#[cfg(test)]
mod tests {
    use kvmerger_compress::Budget;

    use super::*;
    use crate::testing::tiny_config;

    fn limits() -> RequestLimits {
        // 64 tokens of vocabulary, 2 layers, a context of 256.
        RequestLimits::of(&tiny_config(), None)
    }

    fn options() -> RequestOptions {
        RequestOptions {
            max_tokens: Some(4),
            default_max_tokens: 16,
            sampling: SamplingConfig::default(),
            compression: CompressionConfig::Full,
            stop_tokens: vec![2],
            max_kv: None,
            prefill_compression: None,
            kv_dtype: None,
        }
    }

    fn refused(prompt: Vec<u32>, options: RequestOptions) -> RequestField {
        match GenerationRequest::new(prompt, options, &limits()) {
            Err(RequestError::Invalid { field, reason }) => {
                assert!(!reason.is_empty());
                field
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn each_rule_refuses_once_naming_its_field() {
        use RequestField::*;
        assert_eq!(refused(vec![], options()), Prompt);
        for text in ["", " \n\t"] {
            assert!(matches!(
                check_prompt_text(text),
                Err(RequestError::Invalid { field: Prompt, .. })
            ));
        }
        assert!(check_prompt_text(" a ").is_ok());
        assert_eq!(refused(vec![1, 64], options()), Prompt, "outside the vocabulary");
        assert_eq!(refused(vec![1; 256], options()), Prompt, "no room after it");
        assert_eq!(
            refused(vec![1], RequestOptions { max_tokens: Some(0), ..options() }),
            MaxTokens
        );
        let too_many = RequestOptions { max_tokens: Some(57), ..options() };
        assert_eq!(refused(vec![1; 200], too_many), MaxTokens);
        let sampling = |s: SamplingConfig| RequestOptions { sampling: s, ..options() };
        let base = SamplingConfig::default();
        for t in [-0.1, 2.5, f32::NAN, f32::INFINITY] {
            let bad = sampling(SamplingConfig { temperature: t, ..base });
            assert_eq!(refused(vec![1], bad), Temperature, "{t}");
        }
        for p in [0.0, 1.5, f32::NAN] {
            assert_eq!(refused(vec![1], sampling(SamplingConfig { top_p: p, ..base })), TopP);
        }
        let penalty = sampling(SamplingConfig { repeat_penalty: 0.0, ..base });
        assert_eq!(refused(vec![1], penalty), RepeatPenalty);
    }

    #[test]
    fn a_compression_the_model_cannot_take_is_refused_naming_its_parameter() {
        // Per-layer budgets for three layers on a model of two.
        let json = r#"{"method": "kvmerger", "budget": 0.5, "layer_budgets": [0.4, 0.5, 0.6]}"#;
        let compression = CompressionConfig::from_json(json).unwrap();
        let asked = RequestOptions { compression, ..options() };
        match GenerationRequest::new(vec![1], asked, &limits()) {
            Err(RequestError::Compression(CompressError::InvalidParameter { name, .. })) => {
                assert_eq!(name, "layer_budgets")
            }
            other => panic!("expected a compression refusal, got {other:?}"),
        }
    }

    #[test]
    fn accepted_requests_keep_what_was_asked_and_fill_the_default() {
        let r = GenerationRequest::new(vec![1, 2, 3], options(), &limits()).unwrap();
        assert_eq!((r.prompt(), r.max_tokens(), r.stop_tokens()), (&[1, 2, 3][..], 4, &[2][..]));
        let default = RequestOptions { max_tokens: None, ..options() };
        assert_eq!(
            GenerationRequest::new(vec![1], default.clone(), &limits()).unwrap().max_tokens(),
            16
        );
        // The default shrinks to what the context leaves; the bounds are inclusive.
        assert_eq!(
            GenerationRequest::new(vec![1; 250], default, &limits()).unwrap().max_tokens(),
            6
        );
        let last = RequestOptions { max_tokens: Some(56), ..options() };
        assert!(GenerationRequest::new(vec![1; 200], last, &limits()).is_ok());
        let edges = SamplingConfig { temperature: 2.0, top_p: 1.0, ..SamplingConfig::default() };
        assert!(check_sampling(&edges).is_ok());
    }

    #[test]
    fn a_capped_context_is_the_limit() {
        let capped = RequestLimits::of(&tiny_config(), Some(100));
        assert_eq!(capped.context_length, 100);
        assert!(capped.fit(&tiny_config()));
        assert_eq!(RequestLimits::of(&tiny_config(), Some(1000)).context_length, 256);
        let err = GenerationRequest::new(vec![1; 100], options(), &capped).unwrap_err();
        assert!(matches!(err, RequestError::Invalid { field: RequestField::Prompt, .. }));
    }

    #[test]
    fn bounds_a_method_cannot_keep_are_refused_naming_the_field() {
        // A bound while decoding: at least one entry, and only for a method that has a rule
        // for the entries decoding adds.
        let budget = |method: &str| (method != "full").then_some(Budget::Ratio(0.5));
        let bounded = |method: &str, n: usize| RequestOptions {
            compression: CompressionConfig::from_cli(method, budget(method), &[]).unwrap(),
            max_kv: Some(n),
            ..options()
        };
        assert_eq!(refused(vec![1; 10], bounded("h2o", 0)), RequestField::MaxKv);
        assert_eq!(refused(vec![1; 10], bounded("full", 8)), RequestField::MaxKv);
        assert_eq!(refused(vec![1; 10], bounded("snapkv", 8)), RequestField::MaxKv);
        for method in ["h2o", "tova", "streaming_llm", "cam", "knorm", "keydiff", "kvmerger"] {
            assert!(GenerationRequest::new(vec![1; 10], bounded(method, 8), &limits()).is_ok());
        }
    }
}
