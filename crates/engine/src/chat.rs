//! Chat prompts: the model's Jinja chat template, recognised by family and rendered in Rust.
//!
//! No Jinja engine is involved: [`ChatTemplate::detect`] recognises ChatML, Llama-3 and
//! Llama-2/Mistral (`[INST]`) templates by their markers and renders them the way those
//! templates do for plain text conversations (no tools).
//!
//! The BOS token a template writes at the very start is left to
//! [`TextTokenizer::encode`] with `add_special = true` when that adds BOS, so a rendered
//! prompt is encoded exactly once with it; otherwise the rendering writes it itself.

use crate::error::{EngineError, Result};
use crate::tokenizer::TextTokenizer;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (ChatML and Llama-3 accept any role name).
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

/// The template families that can be rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatFormat {
    /// `<|im_start|>role\ncontent<|im_end|>\n` (SmolLM2, Qwen, ...).
    ChatMl,
    /// `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>`.
    Llama3,
    /// `<s>[INST] <<SYS>>\nsystem\n<</SYS>>\n\nuser [/INST] assistant </s>`, BOS before every user turn.
    Llama2,
    /// `<s>[INST] user [/INST]assistant</s>`; a system message is put before the first user message.
    Mistral,
}

/// A chat template recognised from its Jinja source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    format: ChatFormat,
    /// ChatML: the system message the template adds when the conversation has none.
    default_system: Option<String>,
    /// The BOS text the rendering writes at the start itself (when encoding does not add it).
    leading_bos: Option<String>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// The template of `tokenizer` (see [`ChatTemplate::detect`]).
    pub fn for_tokenizer(tokenizer: &TextTokenizer) -> Result<Self> {
        Self::detect(tokenizer.chat_template(), tokenizer)
    }

    /// Recognises the family of the Jinja template `source` (from GGUF
    /// `tokenizer.chat_template` or `tokenizer_config.json`). A missing or unrecognised
    /// template falls back to ChatML when the vocabulary has `<|im_start|>`, and is an
    /// [`EngineError::Unsupported`] otherwise.
    pub fn detect(source: Option<&str>, tokenizer: &TextTokenizer) -> Result<Self> {
        let text = source.unwrap_or("");
        let format = if text.contains("<|im_start|>") {
            ChatFormat::ChatMl
        } else if text.contains("<|start_header_id|>") {
            ChatFormat::Llama3
        } else if text.contains("[INST]") {
            if text.contains("<<SYS>>") {
                ChatFormat::Llama2
            } else {
                ChatFormat::Mistral
            }
        } else if tokenizer.token_id("<|im_start|>").is_some() {
            ChatFormat::ChatMl
        } else {
            let what = if source.is_some() {
                "its chat template is not ChatML, Llama-3 or [INST]"
            } else {
                "it has no chat template"
            };
            return Err(EngineError::Unsupported(format!(
                "chat prompts for this model: {what} and its vocabulary has no <|im_start|>"
            )));
        };
        let token_text = |id: Option<u32>, fallback: &str| {
            id.and_then(|id| tokenizer.token_str(id)).unwrap_or_else(|| fallback.to_string())
        };
        let bos = token_text(tokenizer.bos_id(), "<s>");
        let eos = token_text(tokenizer.eos_id(), "</s>");
        let starts_with_bos = match format {
            ChatFormat::ChatMl => false,
            _ => text.contains("bos_token"),
        };
        let leading_bos = (starts_with_bos && !tokenizer.adds_bos()).then(|| bos.clone());
        let default_system = match format {
            ChatFormat::ChatMl => default_chatml_system(text),
            _ => None,
        };
        Ok(Self { format, default_system, leading_bos, bos, eos })
    }

    pub fn format(&self) -> ChatFormat {
        self.format
    }

    /// The system message the template adds to conversations that start without one.
    pub fn default_system_prompt(&self) -> Option<&str> {
        self.default_system.as_deref()
    }

    /// The prompt text of `messages`; with `add_generation_prompt` it ends where the
    /// assistant's reply begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> String {
        let mut out = self.leading_bos.clone().unwrap_or_default();
        match self.format {
            ChatFormat::ChatMl => {
                let turn = |out: &mut String, role: &str, content: &str| {
                    out.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
                };
                if let (Some(system), Some(first)) = (&self.default_system, messages.first()) {
                    if first.role != "system" {
                        turn(&mut out, "system", system);
                    }
                }
                for m in messages {
                    turn(&mut out, &m.role, &m.content);
                }
                if add_generation_prompt {
                    out.push_str("<|im_start|>assistant\n");
                }
            }
            ChatFormat::Llama3 => {
                for m in messages {
                    out.push_str(&format!(
                        "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>",
                        m.role,
                        m.content.trim()
                    ));
                }
                if add_generation_prompt {
                    out.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
                }
            }
            ChatFormat::Llama2 | ChatFormat::Mistral => self.render_inst(&mut out, messages),
        }
        out
    }

    /// `[INST]` formats: the reply follows `[/INST]`, so there is no generation prompt.
    /// Roles other than user and assistant after the first message are skipped, as the
    /// Llama-2 template does.
    fn render_inst(&self, out: &mut String, messages: &[ChatMessage]) {
        let (system, rest) = match messages.split_first() {
            Some((first, rest)) if first.role == "system" => (Some(first.content.as_str()), rest),
            _ => (None, messages),
        };
        let llama2 = self.format == ChatFormat::Llama2;
        let mut first_user = true;
        for m in rest {
            match m.role.as_str() {
                "user" => {
                    let content = match (system, first_user, llama2) {
                        (Some(s), true, true) => format!("<<SYS>>\n{s}\n<</SYS>>\n\n{}", m.content),
                        (Some(s), true, false) => format!("{s}\n\n{}", m.content),
                        _ => m.content.clone(),
                    };
                    // Llama-2 writes BOS before every user turn; the first one is the leading BOS.
                    if llama2 && !first_user {
                        out.push_str(&self.bos);
                    }
                    let content = if llama2 { content.trim() } else { content.as_str() };
                    out.push_str(&format!("[INST] {content} [/INST]"));
                    first_user = false;
                }
                "assistant" if llama2 => {
                    out.push_str(&format!(" {} {}", m.content.trim(), self.eos))
                }
                "assistant" => out.push_str(&format!("{}{}", m.content, self.eos)),
                _ => {}
            }
        }
    }
}

/// The literal system message of a ChatML template written as
/// `'<|im_start|>system\n...<|im_end|>'`, if the template has one (SmolLM2 and Qwen add it
/// when the conversation starts without a system message).
fn default_chatml_system(template: &str) -> Option<String> {
    const START: &str = "<|im_start|>system";
    let mut rest = template;
    while let Some(at) = rest.find(START) {
        rest = &rest[at + START.len()..];
        let body = rest.strip_prefix('\n').or_else(|| rest.strip_prefix("\\n"));
        if let Some(body) = body {
            if let Some(end) = body.find("<|im_end|>") {
                let literal = &body[..end];
                // A literal, not an expression such as `' + messages[0]['content'] + '`.
                if !literal.contains(['\'', '"', '{', '}']) {
                    return Some(literal.replace("\\n", "\n"));
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tests::tiny_sentencepiece;

    const LLAMA2: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";
    const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";
    const QWEN: &str = "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}";

    #[test]
    fn llama2_turns_carry_system_block_and_bos() {
        let tok = tiny_sentencepiece();
        let t = ChatTemplate::detect(Some(LLAMA2), &tok).unwrap();
        assert_eq!(t.format(), ChatFormat::Llama2);
        let messages = [
            ChatMessage::system("Be brief."),
            ChatMessage::user(" Hi "),
            ChatMessage::assistant("Hello."),
            ChatMessage::user("Bye"),
        ];
        // The first BOS comes from encoding, since this tokenizer adds BOS; as in the
        // template, only the ends of the combined first message are stripped.
        assert_eq!(
            t.render(&messages, true),
            "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi [/INST] Hello. </s><s>[INST] Bye [/INST]"
        );
    }

    #[test]
    fn llama3_trims_contents_and_opens_the_assistant_turn() {
        let tok = tiny_sentencepiece();
        let t = ChatTemplate::detect(Some(LLAMA3), &tok).unwrap();
        assert_eq!(t.format(), ChatFormat::Llama3);
        assert_eq!(
            t.render(&[ChatMessage::user(" Hi\n")], true),
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn chatml_default_system_prompt_is_read_from_escaped_literals() {
        assert_eq!(
            default_chatml_system(QWEN).as_deref(),
            Some("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
        );
        assert_eq!(
            default_chatml_system(
                "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'}}"
            ),
            None
        );
    }

    #[test]
    fn unknown_template_without_chatml_tokens_is_an_error() {
        let tok = tiny_sentencepiece();
        let err = ChatTemplate::detect(Some("{{ messages }}"), &tok).unwrap_err();
        assert!(matches!(err, EngineError::Unsupported(_)), "{err}");
        assert!(ChatTemplate::detect(None, &tok).is_err());
    }
}
