//! Chat prompts: the model's own Jinja chat template, executed with minijinja.
//!
//! The template comes from GGUF `tokenizer.chat_template` or `tokenizer_config.json`
//! (see [`TextTokenizer::chat_template`]) and is rendered the way Hugging Face does:
//! `trim_blocks` and `lstrip_blocks` on, `messages`, `add_generation_prompt`, `bos_token`
//! and `eos_token` in the context, `raise_exception` available, and Python string and
//! dict methods (`.strip()`, `.startswith()`, `.items()`, ...) through minijinja-contrib's
//! pycompat layer. Only a model without a template falls back to ChatML, and only when its
//! vocabulary has `<|im_start|>`.
//!
//! The BOS token a template writes at the very start is removed when encoding with
//! `add_special = true` adds it again (see [`TextTokenizer::adds_bos`]), so a rendered
//! prompt carries BOS exactly once.

use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use kvmerger_engine::tokenizer::TextTokenizer;

use crate::error::{ModelsError, Result};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (templates decide which roles they accept).
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// The fallback for models that ship no template but whose vocabulary is ChatML's.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A compiled chat template with the special tokens it refers to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    /// Strip a leading BOS from the rendering because encoding adds it.
    strip_bos: bool,
    /// Whether the model's own template is used (not the ChatML fallback).
    from_model: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("from_model", &self.from_model)
            .finish()
    }
}

impl ChatTemplate {
    /// The template of `tokenizer` (see [`ChatTemplate::new`]).
    pub fn for_tokenizer(tokenizer: &TextTokenizer) -> Result<Self> {
        Self::new(tokenizer.chat_template(), tokenizer)
    }

    /// What this template writes after a user message to open the assistant's turn (KVzip
    /// feeds its reconstruction instructions as a user turn and the context after this).
    pub fn assistant_opening(&self) -> Result<String> {
        let marker = "\u{1}user-message-end\u{1}";
        let rendered = self.render(&[ChatMessage::user(marker)], true)?;
        Ok(rendered.split_once(marker).map_or("\n".to_string(), |(_, s)| s.to_string()))
    }

    /// Compiles the Jinja template `source`. Without one, falls back to ChatML when the
    /// vocabulary has `<|im_start|>`, and is a [`ModelsError::ChatTemplate`] otherwise, as is
    /// a template minijinja cannot parse (naming the error).
    pub fn new(source: Option<&str>, tokenizer: &TextTokenizer) -> Result<Self> {
        let from_model = source.is_some();
        let source = match source {
            Some(s) => s.to_string(),
            None if tokenizer.token_id("<|im_start|>").is_some() => CHATML.to_string(),
            None => {
                return Err(ModelsError::ChatTemplate(
                    "chat prompts for this model: it has no chat template and its vocabulary \
                     has no <|im_start|>"
                        .into(),
                ))
            }
        };
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> std::result::Result<String, _> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned("chat", source)
            .map_err(|e| ModelsError::ChatTemplate(format!("the model's chat template: {e:#}")))?;
        let token_text = |id: Option<u32>, fallback: &str| {
            id.and_then(|id| tokenizer.token_str(id)).unwrap_or_else(|| fallback.to_string())
        };
        Ok(Self {
            env,
            bos: token_text(tokenizer.bos_id(), "<s>"),
            eos: token_text(tokenizer.eos_id(), "</s>"),
            strip_bos: tokenizer.adds_bos(),
            from_model,
        })
    }

    /// Whether the model's own template is used (not the ChatML fallback).
    pub fn is_from_model(&self) -> bool {
        self.from_model
    }

    /// The prompt text of `messages`; with `add_generation_prompt` it ends where the
    /// assistant's reply begins. Errors carry the template's own message (for instance a
    /// template that requires alternating user and assistant roles).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template("chat").map_err(template_error)?;
        let text = template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos,
                eos_token => &self.eos,
            })
            .map_err(template_error)?;
        Ok(match text.strip_prefix(self.bos.as_str()) {
            Some(rest) if self.strip_bos && !self.bos.is_empty() => rest.to_string(),
            _ => text,
        })
    }
}

fn template_error(e: minijinja::Error) -> ModelsError {
    ModelsError::Messages(match e.detail() {
        Some(d) => d.to_string(),
        None => e.to_string(),
    })
}

/// Renders `messages` with the chat template of `tokenizer` (the model's own, or ChatML
/// where it has none). The prompt to pass to [`TextTokenizer::encode`] with
/// `add_special = true`.
pub fn render_chat(
    tokenizer: &TextTokenizer,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> Result<String> {
    ChatTemplate::for_tokenizer(tokenizer)?.render(messages, add_generation_prompt)
}

#[cfg(test)]
mod tests {
    use kvmerger_engine::testing::tiny_sentencepiece;

    use super::*;

    const LLAMA2: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";
    const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    #[test]
    fn llama2_template_runs_with_python_methods_and_one_bos_from_encoding() {
        let tok = tiny_sentencepiece();
        let t = ChatTemplate::new(Some(LLAMA2), &tok).unwrap();
        assert!(t.is_from_model());
        let messages = [
            ChatMessage::system("Be brief."),
            ChatMessage::user(" Hi "),
            ChatMessage::assistant("Hello."),
            ChatMessage::user("Bye"),
        ];
        // The first BOS is left to encoding, which adds it for this tokenizer; `.strip()`
        // trims only the ends of the combined first message.
        assert_eq!(
            t.render(&messages, true).unwrap(),
            "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi [/INST] Hello. </s><s>[INST] Bye [/INST]"
        );
    }

    #[test]
    fn template_exceptions_are_request_errors() {
        let tok = tiny_sentencepiece();
        let t = ChatTemplate::new(Some(LLAMA2), &tok).unwrap();
        let err = t.render(&[ChatMessage::assistant("first")], true).unwrap_err();
        assert!(
            matches!(&err, ModelsError::Messages(reason) if reason.contains("alternate")),
            "{err}"
        );
    }

    #[test]
    fn llama3_template_trims_contents_and_opens_the_assistant_turn() {
        let tok = tiny_sentencepiece();
        let t = ChatTemplate::new(Some(LLAMA3), &tok).unwrap();
        assert_eq!(
            t.render(&[ChatMessage::user(" Hi\n")], true).unwrap(),
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn a_broken_template_is_an_error_and_no_template_needs_chatml_tokens() {
        let tok = tiny_sentencepiece();
        let err = ChatTemplate::new(Some("{% for m in messages %}"), &tok).unwrap_err();
        assert!(matches!(err, ModelsError::ChatTemplate(_)), "{err}");
        assert!(ChatTemplate::new(None, &tok).is_err());
    }
}
