//! Text to token ids and back, built from a GGUF file's metadata or a `tokenizer.json`.
//!
//! GGUF files carry their tokenizer as metadata (`tokenizer.ggml.*`). Two tokenizer models
//! are rebuilt from it as a [`tokenizers::Tokenizer`]:
//!
//! - `gpt2`: GPT-2-style byte-level BPE from the vocabulary and merge list. The
//!   pre-tokenizer follows `tokenizer.ggml.pre` the way llama.cpp and the Hugging Face
//!   `tokenizer.json` files of those families do (SmolLM/StarCoder isolate every digit
//!   before the GPT-2 split; Llama-3 and Qwen2 split with their own regular expressions).
//! - `llama`: SentencePiece BPE with byte fallback. The merges are derived from the token
//!   scores, as the Hugging Face GGUF converter does.
//!
//! Control tokens (`<|im_start|>`, `<s>`, ...) are registered as special tokens, so they are
//! recognised in text and encode as single ids.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecodeStream, DecodeStreamError, DecoderWrapper, ModelWrapper, NormalizerWrapper,
    PostProcessorWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

use crate::error::{EngineError, Result};

/// GGUF token types (llama.cpp's `llama_token_type`) that matter here.
pub(crate) const TOKEN_TYPE_NORMAL: i64 = 1;
pub(crate) const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Tokens that end a turn or a document in common model families; each one the vocabulary
/// has is a stop token besides the declared end-of-sequence token.
const END_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|end|>",
    "</s>",
];

/// Llama-3's pre-tokenizer pattern (`tokenizer.ggml.pre = llama-bpe`).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenizer pattern: Llama-3's with single digits.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// SentencePiece's visible space.
const SPM_SPACE: &str = "\u{2581}";

/// A tokenizer with the model's special-token conventions (BOS, stop tokens, chat template).
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    bos: Option<u32>,
    /// The declared end-of-sequence token.
    eos: Option<u32>,
    /// Every token that ends generation, `eos` first.
    stop: Vec<u32>,
    /// Ids that `encode(.., true)` puts around the text on top of what `inner` adds
    /// (GGUF tokenizers; a `tokenizer.json` adds them in its own post-processor).
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    adds_bos: bool,
    vocab_size: usize,
    chat_template: Option<String>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("stop", &self.stop)
            .field("adds_bos", &self.adds_bos)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl TextTokenizer {
    /// Builds the tokenizer stored in a GGUF file's metadata.
    ///
    /// Fails with [`EngineError::Unsupported`] for tokenizer models other than `gpt2` and
    /// `llama` and for byte-level pre-tokenizers this module does not know, and with
    /// [`EngineError::Tokenizer`] when the metadata is missing or inconsistent.
    pub fn from_gguf_metadata(metadata: &HashMap<String, Value>) -> Result<Self> {
        let md = Metadata(metadata);
        let model = md.str("tokenizer.ggml.model")?.ok_or_else(|| {
            EngineError::Tokenizer(
                "the GGUF file has no tokenizer (tokenizer.ggml.model is missing)".into(),
            )
        })?;
        let tokens = md.strings("tokenizer.ggml.tokens")?.ok_or_else(|| {
            EngineError::Tokenizer("the GGUF file has no vocabulary (tokenizer.ggml.tokens)".into())
        })?;
        let types = match md.ints("tokenizer.ggml.token_type")? {
            Some(types) if types.len() != tokens.len() => {
                return Err(EngineError::Tokenizer(format!(
                    "tokenizer.ggml.token_type has {} entries for {} tokens",
                    types.len(),
                    tokens.len()
                )))
            }
            Some(types) => types,
            None => vec![TOKEN_TYPE_NORMAL; tokens.len()],
        };
        let (mut inner, default_add_bos) = match model {
            "gpt2" => (byte_level_bpe(&md, &tokens)?, false),
            "llama" => (sentencepiece_bpe(&md, &tokens, &types)?, true),
            other => {
                return Err(EngineError::Unsupported(format!(
                    "tokenizer model `{other}` (supported: byte-level BPE `gpt2`, SentencePiece BPE `llama`)"
                )))
            }
        };
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(token, _)| !token.is_empty())
            .filter_map(|(token, &kind)| match kind {
                TOKEN_TYPE_CONTROL => Some(AddedToken::from(*token, true)),
                TOKEN_TYPE_USER_DEFINED => Some(AddedToken::from(*token, false).normalized(false)),
                _ => None,
            })
            .collect();
        inner.add_special_tokens(&added);

        let id = |key: &str| -> Result<Option<u32>> {
            match md.uint(key)? {
                Some(id) if (id as usize) < tokens.len() => Ok(Some(id)),
                Some(id) => Err(EngineError::Tokenizer(format!(
                    "{key} = {id} is outside the vocabulary ({} tokens)",
                    tokens.len()
                ))),
                None => Ok(None),
            }
        };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let eos = id("tokenizer.ggml.eos_token_id")?;
        let declared_stops =
            [eos, id("tokenizer.ggml.eot_token_id")?, id("tokenizer.ggml.eom_token_id")?];
        let add_bos = md.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(default_add_bos);
        let add_eos = md.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let prefix = if add_bos { bos.into_iter().collect() } else { Vec::new() };
        let suffix = if add_eos { eos.into_iter().collect() } else { Vec::new() };
        let chat_template = md.str("tokenizer.chat_template")?.map(str::to_string);
        Self::assemble(
            inner,
            bos,
            eos,
            declared_stops.into_iter().flatten().collect(),
            prefix,
            suffix,
            chat_template,
        )
    }

    /// Loads a Hugging Face `tokenizer.json`. A `tokenizer_config.json` next to it supplies
    /// the BOS/EOS tokens and the chat template (or a `chat_template.jinja` file does).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(EngineError::MissingFile(path.to_path_buf()));
        }
        let inner = Tokenizer::from_file(path)
            .map_err(|e| EngineError::Tokenizer(format!("cannot read {}: {e}", path.display())))?;
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        let config = read_json_if_present(&dir.join("tokenizer_config.json"))?;
        let named = |key: &str| {
            config
                .as_ref()
                .and_then(|c| special_token_name(c.get(key)?))
                .and_then(|t| inner.token_to_id(t))
        };
        let bos = named("bos_token");
        let eos = named("eos_token");
        let mut chat_template =
            config.as_ref().and_then(|c| template_from_config(c.get("chat_template")?));
        if chat_template.is_none() {
            let jinja = dir.join("chat_template.jinja");
            if jinja.is_file() {
                let text = std::fs::read_to_string(&jinja)
                    .map_err(|error| EngineError::Io { path: jinja, error })?;
                chat_template = Some(text);
            }
        }
        Self::assemble(
            inner,
            bos,
            eos,
            eos.into_iter().collect(),
            Vec::new(),
            Vec::new(),
            chat_template,
        )
    }

    /// Completes the derived fields shared by both constructors.
    fn assemble(
        inner: Tokenizer,
        bos: Option<u32>,
        eos: Option<u32>,
        mut stop: Vec<u32>,
        prefix: Vec<u32>,
        suffix: Vec<u32>,
        chat_template: Option<String>,
    ) -> Result<Self> {
        for name in END_TOKENS {
            if let Some(id) = inner.token_to_id(name) {
                stop.push(id);
            }
        }
        let mut seen = std::collections::HashSet::new();
        stop.retain(|id| seen.insert(*id));
        let vocab_size = inner.get_vocab(true).values().max().map_or(0, |&max| max as usize + 1);
        let mut tokenizer = Self {
            inner,
            bos,
            eos,
            stop,
            prefix,
            suffix,
            adds_bos: false,
            vocab_size,
            chat_template,
        };
        tokenizer.adds_bos = bos.is_some() && tokenizer.encode("", true)?.first().copied() == bos;
        Ok(tokenizer)
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) are always
    /// recognised; `add_special` adds what the model puts around a sequence (BOS for most
    /// Llama-family models, nothing for SmolLM2).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let encoding = self.inner.encode_fast(text, add_special).map_err(tokenizer_error)?;
        if !add_special {
            return Ok(encoding.get_ids().to_vec());
        }
        let mut ids = Vec::with_capacity(self.prefix.len() + encoding.len() + self.suffix.len());
        ids.extend_from_slice(&self.prefix);
        ids.extend_from_slice(encoding.get_ids());
        ids.extend_from_slice(&self.suffix);
        Ok(ids)
    }

    /// The text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        for &id in ids {
            self.check_id(id)?;
        }
        self.inner.decode(ids, false).map_err(tokenizer_error)
    }

    /// The text of `ids` without special tokens (`<|im_end|>`, `<s>`): what a reader of the
    /// answer sees, and what scoring compares.
    pub fn decode_plain(&self, ids: &[u32]) -> Result<String> {
        for &id in ids {
            self.check_id(id)?;
        }
        self.inner.decode(ids, true).map_err(tokenizer_error)
    }

    /// The vocabulary entry of `id` as stored (byte-level BPE writes a leading space as
    /// `Ġ`, SentencePiece as `▁`); `None` outside the vocabulary.
    pub fn token_str(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a vocabulary entry or special token, written as stored.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The beginning-of-sequence token, if the model declares one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Whether `encode(.., true)` starts the ids with [`Self::bos_id`].
    pub fn adds_bos(&self) -> bool {
        self.adds_bos
    }

    /// The model's declared end-of-sequence token.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Every token that ends generation: the declared end-of-sequence (and end-of-turn)
    /// tokens first, then `<|im_end|>`, `<|eot_id|>`, `<|endoftext|>` and the like where the
    /// vocabulary has them.
    pub fn eos_ids(&self) -> Vec<u32> {
        self.stop.clone()
    }

    /// One past the largest token id, i.e. the number of logits a model with this
    /// vocabulary produces.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The Jinja chat template shipped with the tokenizer, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// An incremental decoder for streaming generated tokens.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder { tokenizer: self, stream: self.inner.decode_stream(false) }
    }

    fn check_id(&self, id: u32) -> Result<()> {
        if (id as usize) < self.vocab_size {
            Ok(())
        } else {
            Err(EngineError::Tokenizer(format!(
                "token id {id} is outside the vocabulary ({} tokens)",
                self.vocab_size
            )))
        }
    }
}

/// Turns a stream of token ids into text pieces as soon as they are complete: a character
/// whose UTF-8 bytes span several tokens comes out once its last byte has arrived, and
/// word boundaries (SentencePiece's leading space) come out as a whole decode would give.
pub struct StreamDecoder<'a> {
    tokenizer: &'a TextTokenizer,
    stream: DecodeStream<
        'a,
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >,
}

impl StreamDecoder<'_> {
    /// Adds one id; returns the text it completes, or `None` while a character is still
    /// incomplete.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.tokenizer.check_id(id)?;
        match self.stream.step(id) {
            // Byte-fallback decoding can rewrite text already sent: a valid byte followed by
            // a stray continuation byte decodes as two replacement characters. What was sent
            // stays sent; the stream starts again at this token (the stray bytes, which no
            // decode turns into text, are dropped).
            Err(e) if e.downcast_ref::<DecodeStreamError>().is_some() => {
                self.stream = self.tokenizer.inner.decode_stream(false);
                self.stream.step(id).map_err(tokenizer_error)
            }
            other => other.map_err(tokenizer_error),
        }
    }
}

fn tokenizer_error(e: tokenizers::Error) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

/// Typed access to GGUF metadata values, with errors naming the key.
struct Metadata<'a>(&'a HashMap<String, Value>);

impl<'a> Metadata<'a> {
    fn wrong_type(key: &str, expected: &str, value: &Value) -> EngineError {
        EngineError::Tokenizer(format!(
            "GGUF metadata {key} should be {expected}, found {:?}",
            value.value_type()
        ))
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(Self::wrong_type(key, "a string", v)),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(Self::wrong_type(key, "a boolean", v)),
        }
    }

    fn uint(&self, key: &str) -> Result<Option<u32>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(v) => integer(v)
                .and_then(|i| u32::try_from(i).ok())
                .map(Some)
                .ok_or_else(|| Self::wrong_type(key, "a token id", v)),
        }
    }

    fn array(&self, key: &str) -> Result<Option<&'a [Value]>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(v) => Err(Self::wrong_type(key, "an array", v)),
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<&'a str>>> {
        let Some(items) = self.array(key)? else { return Ok(None) };
        items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(Self::wrong_type(key, "an array of strings", v)),
            })
            .collect::<Result<_>>()
            .map(Some)
    }

    fn ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(items) = self.array(key)? else { return Ok(None) };
        items
            .iter()
            .map(|v| integer(v).ok_or_else(|| Self::wrong_type(key, "an array of integers", v)))
            .collect::<Result<_>>()
            .map(Some)
    }

    fn floats(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let Some(items) = self.array(key)? else { return Ok(None) };
        items
            .iter()
            .map(|v| match v {
                Value::F32(x) => Ok(*x),
                Value::F64(x) => Ok(*x as f32),
                v => Err(Self::wrong_type(key, "an array of floats", v)),
            })
            .collect::<Result<_>>()
            .map(Some)
    }
}

fn integer(value: &Value) -> Option<i64> {
    match *value {
        Value::U8(x) => Some(x.into()),
        Value::I8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::I16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::I32(x) => Some(x.into()),
        Value::U64(x) => i64::try_from(x).ok(),
        Value::I64(x) => Some(x),
        _ => None,
    }
}

/// Token string to id; a string listed twice keeps its first id.
fn vocab_of(tokens: &[&str]) -> Vocab {
    let mut vocab = Vocab::default();
    for (id, token) in tokens.iter().enumerate() {
        vocab.entry((*token).to_string()).or_insert(id as u32);
    }
    vocab
}

/// GPT-2-style byte-level BPE (`tokenizer.ggml.model = gpt2`).
fn byte_level_bpe(md: &Metadata, tokens: &[&str]) -> Result<Tokenizer> {
    let merges = md
        .strings("tokenizer.ggml.merges")?
        .ok_or_else(|| {
            EngineError::Tokenizer("a gpt2 tokenizer needs tokenizer.ggml.merges".into())
        })?
        .into_iter()
        .map(|merge| {
            merge.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| {
                EngineError::Tokenizer(format!("malformed merge `{merge}` (expected two tokens)"))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_of(tokens), merges)
        .build()
        .map_err(tokenizer_error)?;
    let pre = md.str("tokenizer.ggml.pre")?.unwrap_or("default");
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(byte_level_pre_tokenizer(pre)?));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// The pre-tokenizer of a byte-level BPE family, named as llama.cpp names it.
fn byte_level_pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let gpt2 = ByteLevel::default().add_prefix_space(false).use_regex(true);
    let split_then_bytes = |pattern: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(pattern.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(tokenizer_error)?;
        let bytes = ByteLevel::default().add_prefix_space(false).use_regex(false);
        Ok(PreTokenizerSequence::new(vec![split.into(), bytes.into()]).into())
    };
    match pre {
        "default" | "gpt2" | "gpt-2" => Ok(gpt2.into()),
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            Ok(PreTokenizerSequence::new(vec![Digits::new(true).into(), gpt2.into()]).into())
        }
        "llama-bpe" | "llama3" | "dbrx" | "smaug-bpe" => split_then_bytes(LLAMA3_PATTERN),
        "qwen2" => split_then_bytes(QWEN2_PATTERN),
        other => Err(EngineError::Unsupported(format!(
            "byte-level BPE pre-tokenizer `{other}` (tokenizer.ggml.pre)"
        ))),
    }
}

/// SentencePiece BPE with byte fallback (`tokenizer.ggml.model = llama`).
fn sentencepiece_bpe(md: &Metadata, tokens: &[&str], types: &[i64]) -> Result<Tokenizer> {
    let scores = md.floats("tokenizer.ggml.scores")?.ok_or_else(|| {
        EngineError::Tokenizer(
            "a llama (SentencePiece) tokenizer needs tokenizer.ggml.scores".into(),
        )
    })?;
    if scores.len() != tokens.len() {
        return Err(EngineError::Tokenizer(format!(
            "tokenizer.ggml.scores has {} entries for {} tokens",
            scores.len(),
            tokens.len()
        )));
    }
    let merges = sentencepiece_merges(tokens, types, &scores);
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab_of(tokens), merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = md.uint("tokenizer.ggml.unknown_token_id")? {
        let token = tokens.get(unk as usize).ok_or_else(|| {
            EngineError::Tokenizer(format!("unknown_token_id {unk} is outside the vocabulary"))
        })?;
        builder = builder.unk_token((*token).to_string());
    }
    let bpe = builder.build().map_err(tokenizer_error)?;
    let space_prefix = md.bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);

    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if space_prefix {
        normalizers.push(Prepend::new(SPM_SPACE.to_string()).into());
    }
    normalizers.push(Replace::new(" ", SPM_SPACE).map_err(tokenizer_error)?.into());
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new(SPM_SPACE, " ").map_err(tokenizer_error)?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_normalizer(Some(NormalizerSequence::new(normalizers)));
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// BPE merges that reproduce SentencePiece's score-driven merging: every split of a normal
/// token into two normal tokens, ranked by the merged token's score (higher first), ties
/// in vocabulary order (the Hugging Face converter's `generate_merges`).
fn sentencepiece_merges(tokens: &[&str], types: &[i64], scores: &[f32]) -> Vec<(String, String)> {
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (id, (token, &kind)) in tokens.iter().zip(types).enumerate() {
        if kind == TOKEN_TYPE_NORMAL {
            index.entry(*token).or_insert(id);
        }
    }
    let mut ranked: Vec<(f32, usize, usize)> = Vec::new();
    for (id, (token, &kind)) in tokens.iter().zip(types).enumerate() {
        if kind != TOKEN_TYPE_NORMAL {
            continue;
        }
        let mut splits: Vec<(usize, usize)> = token
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| Some((*index.get(&token[..at])?, *index.get(&token[at..])?)))
            .collect();
        splits.sort_unstable();
        ranked.extend(splits.into_iter().map(|(left, right)| (scores[id], left, right)));
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    ranked
        .into_iter()
        .map(|(_, left, right)| (tokens[left].to_string(), tokens[right].to_string()))
        .collect()
}

fn read_json_if_present(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|error| EngineError::Io { path: path.to_path_buf(), error })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| EngineError::Tokenizer(format!("cannot parse {}: {e}", path.display())))
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn special_token_name(value: &serde_json::Value) -> Option<&str> {
    value.as_str().or_else(|| value.get("content")?.as_str())
}

/// `chat_template` in `tokenizer_config.json`: a string, or a list of named templates of
/// which the one named `default` (else the first) is taken.
fn template_from_config(value: &serde_json::Value) -> Option<String> {
    if let Some(text) = value.as_str() {
        return Some(text.to_string());
    }
    let list = value.as_array()?;
    let named =
        |item: &&serde_json::Value| item.get("name").and_then(|n| n.as_str()) == Some("default");
    let chosen = list.iter().find(named).or_else(|| list.first())?;
    chosen.get("template")?.as_str().map(str::to_string)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    use crate::testing::tiny_sentencepiece;

    fn strings(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
    }

    #[test]
    fn sentencepiece_merges_whole_words_and_falls_back_to_bytes() {
        let tok = tiny_sentencepiece();
        let hello = tok.token_id("▁hello").unwrap();
        let world = tok.token_id("▁world").unwrap();
        assert_eq!(tok.encode("hello world", true).unwrap(), vec![1, hello, world]);
        assert!(tok.adds_bos());
        // "é" is not in the vocabulary: its two UTF-8 bytes become byte tokens.
        let ids = tok.encode("hé", false).unwrap();
        let bytes = [tok.token_id("<0xC3>").unwrap(), tok.token_id("<0xA9>").unwrap()];
        assert_eq!(ids, vec![tok.token_id("▁h").unwrap(), bytes[0], bytes[1]]);
        assert_eq!(tok.decode(&ids).unwrap(), "hé");
        assert_eq!(
            tok.decode(&tok.encode("hello world hello", false).unwrap()).unwrap(),
            "hello world hello"
        );
        // Control tokens in text are single ids; the declared end token stops generation.
        assert_eq!(tok.encode("</s>", false).unwrap(), vec![2]);
        assert_eq!(tok.eos_ids(), vec![2]);
    }

    #[test]
    fn stream_decoder_waits_for_complete_characters() {
        let tok = tiny_sentencepiece();
        let ids = tok.encode("hé world", false).unwrap();
        let mut stream = tok.stream_decoder();
        let pieces: Vec<Option<String>> = ids.iter().map(|&id| stream.push(id).unwrap()).collect();
        assert_eq!(pieces, vec![Some("h".into()), None, Some("é".into()), Some(" world".into())]);
        assert!(stream.push(tok.vocab_size() as u32).is_err());
    }

    #[test]
    fn stray_bytes_never_break_the_stream() {
        use rand::{Rng, SeedableRng};
        let tok = tiny_sentencepiece();
        // <0x41> ("A") then a lone continuation byte <0x80>: decoded together they become two
        // replacement characters, rewriting the "A" already sent. The stream goes on.
        let (a, stray, e) = (3 + 0x41, 3 + 0x80, tok.token_id("e").unwrap());
        let mut stream = tok.stream_decoder();
        let pieces: Vec<Option<String>> =
            [a, stray, e].iter().map(|&id| stream.push(id).unwrap()).collect();
        assert_eq!(pieces[0].as_deref(), Some("A"));
        assert!(pieces[2].as_deref().is_some_and(|p| p.ends_with('e')), "{pieces:?}");
        // Whatever a model samples, streaming it never fails, and where no byte is stray the
        // pieces add up to the whole decode.
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let vocab = tok.vocab_size() as u32;
        for _ in 0..2000 {
            let ids: Vec<u32> = (0..12).map(|_| rng.random_range(3..vocab)).collect();
            let mut stream = tok.stream_decoder();
            let mut text = String::new();
            for &id in &ids {
                text.extend(stream.push(id).unwrap());
            }
            let whole = tok.decode(&ids).unwrap();
            if !whole.contains('\u{FFFD}') {
                assert!(whole.starts_with(&text), "{ids:?}: {text:?} vs {whole:?}");
            }
        }
    }

    #[test]
    fn unknown_tokenizer_models_and_pre_tokenizers_are_named() {
        let md: HashMap<String, Value> = [
            ("tokenizer.ggml.model".to_string(), Value::String("bert".into())),
            ("tokenizer.ggml.tokens".to_string(), strings(&["a"])),
        ]
        .into_iter()
        .collect();
        let err = TextTokenizer::from_gguf_metadata(&md).unwrap_err();
        assert!(matches!(&err, EngineError::Unsupported(m) if m.contains("`bert`")), "{err}");
        let err = byte_level_pre_tokenizer("no-such-family").unwrap_err();
        assert!(
            matches!(&err, EngineError::Unsupported(m) if m.contains("no-such-family")),
            "{err}"
        );
    }

    fn splits(pre: &str, text: &str) -> Vec<String> {
        let mut s = PreTokenizedString::from(text);
        byte_level_pre_tokenizer(pre).unwrap().pre_tokenize(&mut s).unwrap();
        s.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(piece, _, _)| piece.to_string())
            .collect()
    }

    #[test]
    fn pre_tokenizers_split_digits_per_family() {
        assert_eq!(splits("gpt2", "ab 12345"), vec!["ab", "Ġ12345"]);
        assert_eq!(splits("smollm", "ab 12345"), vec!["ab", "Ġ", "1", "2", "3", "4", "5"]);
        assert_eq!(splits("llama-bpe", "ab 12345"), vec!["ab", "Ġ", "123", "45"]);
        assert_eq!(splits("qwen2", "ab 123"), vec!["ab", "Ġ", "1", "2", "3"]);
    }
}
