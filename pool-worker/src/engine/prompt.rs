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
}

impl LoadedModel {
    /// The prompt's tokens. A template that cannot render the messages is the client's
    /// error (400); so is a prompt that leaves no room in the context window for a token
    /// (400 `context_length_exceeded`).
    pub fn tokenize(&self, prompt: Prompt) -> Result<Vec<u32>, WorkerError> {
        let text = match prompt {
            Prompt::Chat(messages) => self
                .template
                .render(&messages)
                .map_err(|e| WorkerError::bad(e.to_string(), Some("messages")))?,
            Prompt::Text(text) => text,
        };
        let tokens = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| WorkerError::Engine(e.to_string()))?
            .get_ids()
            .to_vec();
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
        Ok(tokens)
    }
}
