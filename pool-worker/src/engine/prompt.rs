//! Prompts: what a request asks the model to continue — chat messages rendered with the
//! model's chat template, or a plain text prompt — as the tokens a [`Job`](super::Job)
//! carries. The HTTP layer parses and validates the JSON into a [`Prompt`]; the model work
//! (template, tokenizer, context window) is here.

use model_meta::ChatMessage;

use super::LoadedModel;
use crate::error::WorkerError;

/// A request's prompt, before the model's template and tokenizer.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// `/v1/chat/completions`: rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// `/v1/completions` (and warm-up): taken as it is.
    Text(String),
    /// `/v1/chat/completions` with `continue_final_message`: the messages before the final
    /// assistant message, rendered with the template up to the assistant turn's opening,
    /// and that message's text, which the model continues (a router resuming a stream
    /// another worker broke, or a client prefilling the answer's start).
    Continue(Vec<ChatMessage>, String),
}

impl LoadedModel {
    /// The prompt's tokens. A template that cannot render the messages is the client's
    /// error (400); so is a prompt that leaves no room in the context window for a token
    /// (400 `context_length_exceeded`).
    pub fn tokenize(&self, prompt: Prompt) -> Result<Vec<u32>, WorkerError> {
        self.tokenize_parts(prompt).map(|(tokens, _)| tokens)
    }

    /// The prompt's tokens, and how many of them at its end are a continued answer's
    /// ([`Prompt::Continue`]; 0 for other prompts).
    pub fn tokenize_parts(&self, prompt: Prompt) -> Result<(Vec<u32>, usize), WorkerError> {
        let encode = |text: String| -> Result<Vec<u32>, WorkerError> {
            Ok(self
                .tokenizer
                .encode(text, false)
                .map_err(|e| WorkerError::Engine(e.to_string()))?
                .get_ids()
                .to_vec())
        };
        let render = |messages: &[ChatMessage]| {
            self.template
                .render(messages)
                .map_err(|e| WorkerError::bad(e.to_string(), Some("messages")))
        };
        let (tokens, answer) = match prompt {
            Prompt::Chat(messages) => (encode(render(&messages)?)?, 0),
            Prompt::Text(text) => (encode(text)?, 0),
            // The answer's start is tokenized on its own, after the prompt's tokens, as
            // the model produced it after them: the template is not asked to render a
            // half-finished turn (many close every message they render).
            Prompt::Continue(messages, answer) => {
                let mut tokens = encode(render(&messages)?)?;
                let answer = encode(answer)?;
                let n = answer.len();
                tokens.extend(answer);
                (tokens, n)
            }
        };
        if tokens.len() >= self.max_context {
            return Err(WorkerError::BadRequest {
                message: format!(
                    "the prompt is {} tokens; this model's context window is {}",
                    tokens.len(),
                    self.max_context
                ),
                param: Some("messages"),
                code: "context_length_exceeded",
            });
        }
        Ok((tokens, answer))
    }
}
