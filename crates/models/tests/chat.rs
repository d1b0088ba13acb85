//! The default model's own chat template (from its GGUF metadata), rendered as Hugging Face
//! renders it.

use kvmerger_engine::tokenizer::TextTokenizer;
use kvmerger_models::{render_chat, ChatMessage, ChatTemplate};

fn default_tokenizer() -> TextTokenizer {
    let path = kvmerger_models::ensure_default_model()
        .expect("the default model is needed (`kvmerger fetch`)");
    let (content, _) =
        kvmerger_engine::read_gguf_header(&path).expect("reading the default model's header");
    TextTokenizer::from_gguf_metadata(&content.metadata).expect("building the tokenizer")
}

#[test]
fn chatml_rendering_matches_the_smollm2_template() {
    let tok = &default_tokenizer();
    let template = ChatTemplate::for_tokenizer(tok).unwrap();
    assert!(template.is_from_model(), "SmolLM2 ships its template in the GGUF metadata");
    let default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
    assert_eq!(
        template.render(&[ChatMessage::user("What is 2+2?")], true).unwrap(),
        format!(
            "<|im_start|>system\n{default_system}<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        )
    );
    assert_eq!(
        render_chat(
            tok,
            &[ChatMessage::system("Answer in French."), ChatMessage::user("Hi")],
            false
        )
        .unwrap(),
        "<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
    let prompt = template.render(&[ChatMessage::user("Hi")], true).unwrap();
    let ids = tok.encode(&prompt, true).unwrap();
    let start = tok.token_id("<|im_start|>").unwrap();
    assert_eq!(ids.iter().filter(|&&id| id == start).count(), 3);
}
