//! One request's generation seen from the server: the engine's events over an async
//! channel, turned into text pieces, cut at stop sequences.

use std::sync::Arc;

use kvmerger_engine::tokenizer::{StreamDecoder, TextTokenizer};
use kvmerger_engine::{
    AddError, EngineHandle, Event, EventSink, FinishReason, GenerationRequest, SeqId, Usage,
};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::error::ApiError;

enum Message {
    Accepted(SeqId),
    Refused(AddError),
    Event(Event),
}

/// Delivers the engine's events into a tokio channel; closed when the request's task drops
/// the receiver (the client went away), which cancels the sequence.
struct ChannelSink(UnboundedSender<Message>);

impl EventSink for ChannelSink {
    fn accepted(&mut self, id: SeqId) {
        let _ = self.0.send(Message::Accepted(id));
    }
    fn refused(&mut self, error: AddError) {
        let _ = self.0.send(Message::Refused(error));
    }
    fn send(&mut self, event: Event) -> bool {
        self.0.send(Message::Event(event)).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// A request the engine accepted.
pub struct Running {
    id: SeqId,
    engine: EngineHandle,
    rx: UnboundedReceiver<Message>,
}

/// What a request produced next.
pub enum Step {
    /// Text to send (possibly empty while a multi-byte character or a possible stop
    /// sequence is held back).
    Text(String),
    /// The end: the last text, why, and the usage.
    Done { text: String, finish_reason: &'static str, usage: Usage },
}

impl Running {
    /// Queues `request`; resolves once the engine accepted it (or answers why not).
    pub async fn submit(
        engine: &EngineHandle,
        request: GenerationRequest,
    ) -> Result<Self, ApiError> {
        let (tx, mut rx) = unbounded_channel();
        engine.submit(request, Box::new(ChannelSink(tx)))?;
        match rx.recv().await {
            Some(Message::Accepted(id)) => Ok(Self { id, engine: engine.clone(), rx }),
            Some(Message::Refused(e)) => Err(e.into()),
            _ => Err(ApiError::internal("the engine stopped before answering")),
        }
    }

    async fn next_event(&mut self) -> Result<Event, ApiError> {
        match self.rx.recv().await {
            Some(Message::Event(e)) => Ok(e),
            _ => Err(ApiError::internal("the engine stopped during generation")),
        }
    }
}

/// Cuts text at the first stop sequence, holding back a tail that may grow into one.
#[derive(Debug, Clone, Default)]
pub struct StopCutter {
    stops: Vec<String>,
    /// Text not yet released: it may be the start of a stop sequence.
    held: String,
}

impl StopCutter {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops, held: String::new() }
    }

    /// Adds text; returns what can be released now and whether a stop sequence ended it.
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        let held = &self.held;
        let keep = self
            .stops
            .iter()
            .filter_map(|s| {
                (1..s.len()).rev().find(|&n| {
                    s.is_char_boundary(n)
                        && held.len() >= n
                        && held.is_char_boundary(held.len() - n)
                        && held.ends_with(&s[..n])
                })
            })
            .max()
            .unwrap_or(0);
        let out = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        (out, false)
    }

    /// Everything held back (at the end of generation).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Turns tokens into text: whole characters only, stop sequences cut (the engine does not
/// deliver stop tokens).
pub struct TextStream<'t> {
    decoder: StreamDecoder<'t>,
    cutter: StopCutter,
}

impl<'t> TextStream<'t> {
    pub fn new(tokenizer: &'t TextTokenizer, stops: Vec<String>) -> Self {
        Self { decoder: tokenizer.stream_decoder(), cutter: StopCutter::new(stops) }
    }

    /// Adds a token; returns the text releasable now and whether a stop sequence ended it.
    fn push(&mut self, token: u32) -> Result<(String, bool), ApiError> {
        let piece = self.decoder.push(token).map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(self.cutter.push(&piece.unwrap_or_default()))
    }

    /// Drives `running` one event further.
    pub async fn next(&mut self, running: &mut Running) -> Result<Step, ApiError> {
        match running.next_event().await? {
            Event::Token(token) => {
                let (text, stopped) = self.push(token)?;
                if !stopped {
                    return Ok(Step::Text(text));
                }
                // Stop sequence: cancel now, and report the usage of the final event.
                running.engine.cancel(running.id);
                loop {
                    if let Event::Finished { usage, .. } = running.next_event().await? {
                        return Ok(Step::Done { text, finish_reason: "stop", usage });
                    }
                }
            }
            Event::Finished { reason, usage } => {
                let text = self.cutter.flush();
                let finish_reason = match reason {
                    FinishReason::Stop => "stop",
                    FinishReason::Length => "length",
                    FinishReason::Cancelled => "cancelled",
                    FinishReason::InvalidCompression { parameter, reason } => {
                        return Err(ApiError::invalid(
                            format!("kv_compression.{parameter}"),
                            format!(
                                "kv_compression: `{parameter}` does not fit this prompt: {reason}"
                            ),
                        ))
                    }
                    FinishReason::Error(e) => {
                        return Err(ApiError::internal(format!("generation failed: {e}")))
                    }
                };
                Ok(Step::Done { text, finish_reason, usage })
            }
        }
    }
}

/// Runs a request to its end; returns its text, finish reason and usage.
pub async fn complete(
    tokenizer: Arc<TextTokenizer>,
    mut running: Running,
    stops: Vec<String>,
) -> Result<(String, &'static str, Usage), ApiError> {
    let mut stream = TextStream::new(&tokenizer, stops);
    let mut text = String::new();
    loop {
        match stream.next(&mut running).await? {
            Step::Text(t) => text.push_str(&t),
            Step::Done { text: t, finish_reason, usage } => {
                text.push_str(&t);
                return Ok((text, finish_reason, usage));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_sequences_cut_text_and_partial_matches_are_held_back() {
        let mut c = StopCutter::new(vec!["END".into(), "\n\n".into()]);
        assert_eq!(c.push("abc E"), ("abc ".to_string(), false), "`E` may start `END`");
        assert_eq!(c.push("N"), (String::new(), false));
        assert_eq!(c.push("x"), ("ENx".to_string(), false), "`ENx` cannot");
        assert_eq!(c.push(" one\n"), (" one".to_string(), false));
        assert_eq!(c.push("\ntwo"), (String::new(), true));
        let mut c = StopCutter::new(vec!["é!".into()]);
        assert_eq!(c.push("caf"), ("caf".to_string(), false));
        assert_eq!(c.push("é"), (String::new(), false));
        assert_eq!(c.flush(), "é");
        let mut none = StopCutter::new(vec![]);
        assert_eq!(none.push("anything"), ("anything".to_string(), false));
    }
}
