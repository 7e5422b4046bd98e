//! Mid-stream resume: a stream whose worker fails after the first token continues on
//! another worker, spliced into the same client stream.
//!
//! Past the commit point the client has part of an answer. Instead of ending its stream
//! with an error event, the router asks another worker for the *rest*: the same request,
//! with the text already sent appended as the start of the answer (a chat's final
//! assistant message with `continue_final_message`, as vLLM and sglang take it; a
//! completion's prompt followed by the text), its token limit reduced by the tokens
//! already sent. The continuation's frames are rewritten to look like the first
//! worker's stream (its id, creation time and model; no second role opener; usage
//! counted over the whole answer) and sent on in the same client stream.
//!
//! - [`Track`] follows the stream the client gets: the answer's text so far, frame by
//!   frame, and whether it can be resumed (one choice, plain text: a tool call or
//!   reasoning content cannot be continued this way). Only whole frames reach the client
//!   while a stream is tracked, so a cut never leaves half a frame in front of the
//!   continuation's first one.
//! - [`continuation`] writes the continuation's request body.
//! - [`Splice`] rewrites the continuation's frames.
//!
//! With greedy decoding (`temperature: 0`) the model continues the same text, so the
//! client's whole answer is the one an uninterrupted worker would have given (the text is
//! tokenized anew at the seam: a model whose tokenizer would split it otherwise may
//! diverge from there). A sampled answer is a valid continuation, not the same sample.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use routing_rules::Endpoint;
use serde::Deserialize;
use serde_json::Value;

/// The longest frame a tracked stream holds back to look at: past it, tracking stops
/// (the stream passes on as it is and can no longer be resumed).
const MAX_FRAME: usize = 1 << 20;

/// Cuts a server-sent event stream into whole frames (each ends with an empty line;
/// lines end with LF or CRLF).
#[derive(Default)]
struct Frames {
    /// The start of a frame whose end has not arrived.
    pending: BytesMut,
    /// Bytes of `pending` already scanned (no frame end in them).
    scanned: usize,
}

impl Frames {
    /// Adds `chunk`; returns the bytes that complete whole frames (possibly empty) and
    /// keeps the rest. Zero-copy when nothing is pending and the chunk ends a frame.
    fn push(&mut self, chunk: Bytes) -> Option<Bytes> {
        if self.pending.is_empty() {
            match last_frame_end(&chunk) {
                Some(end) if end == chunk.len() => return Some(chunk),
                Some(end) => {
                    self.pending.extend_from_slice(&chunk[end..]);
                    self.scanned = self.pending.len();
                    return Some(chunk.slice(..end));
                }
                None => {
                    self.pending.extend_from_slice(&chunk);
                    self.scanned = self.pending.len();
                    return None;
                }
            }
        }
        // a frame end may straddle the old and new bytes: rescan the last 3 old ones
        let from = self.scanned.saturating_sub(3);
        self.pending.extend_from_slice(&chunk);
        match last_frame_end(&self.pending[from..]) {
            Some(end) => {
                self.scanned = 0;
                let whole = self.pending.split_to(from + end).freeze();
                Some(whole)
            }
            None => {
                self.scanned = self.pending.len();
                None
            }
        }
    }

    fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// What is held (an unfinished frame), for a stream that ends.
    fn take(&mut self) -> Option<Bytes> {
        self.scanned = 0;
        (!self.pending.is_empty()).then(|| self.pending.split().freeze())
    }
}

/// The end (exclusive) of the last whole frame in `b`: just past an empty line.
fn last_frame_end(b: &[u8]) -> Option<usize> {
    let mut i = b.len();
    while i >= 2 {
        if b[i - 1] == b'\n'
            && (b[i - 2] == b'\n' || (i >= 3 && b[i - 2] == b'\r' && b[i - 3] == b'\n'))
        {
            return Some(i);
        }
        i -= 1;
    }
    None
}

/// Each frame of `whole` (whole frames only): its `data` (joined as SSE joins multi-line
/// data, or `None` for a frame without data) and its bytes.
fn each_frame(whole: &[u8], mut f: impl FnMut(Option<Cow<'_, [u8]>>, &[u8])) {
    let mut start = 0;
    let mut data: Option<Cow<'_, [u8]>> = None;
    let mut at = 0;
    while at < whole.len() {
        let end = whole[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(whole.len(), |p| at + p);
        let mut line = &whole[at..end];
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        at = end + 1;
        if line.is_empty() {
            f(data.take(), &whole[start..at.min(whole.len())]);
            start = at;
            continue;
        }
        let value = if let Some(v) = line.strip_prefix(b"data:") {
            v.strip_prefix(b" ").unwrap_or(v)
        } else if line == b"data" {
            &[][..]
        } else {
            continue;
        };
        data = Some(match data.take() {
            None => Cow::Borrowed(value),
            Some(prev) => {
                let mut joined = prev.into_owned();
                joined.push(b'\n');
                joined.extend_from_slice(value);
                Cow::Owned(joined)
            }
        });
    }
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(default)]
    created: Option<u64>,
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    choices: Vec<Choice<'a>>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default)]
    index: u64,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    delta: Option<Delta<'a>>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(default)]
    tool_calls: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    function_call: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    reasoning_content: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    reasoning: Option<serde::de::IgnoredAny>,
}

/// What a tracked stream has told the client so far.
#[derive(Default)]
pub struct Track {
    frames: Frames,
    /// The answer's text so far.
    pub text: String,
    /// Frames that carried text.
    pub text_frames: u64,
    /// The first frame's id, creation time and model: the continuation's frames get them.
    pub id: Option<String>,
    pub created: Option<u64>,
    pub model: Option<String>,
    /// A choice ended (`finish_reason`): nothing is left to resume.
    pub finished: bool,
    /// `data: [DONE]` was sent.
    pub done: bool,
    /// Set when the stream cannot be continued as text (a tool call, reasoning content,
    /// several choices, a frame that is not an answer's or too long to hold).
    pub unresumable: Option<&'static str>,
}

impl Track {
    /// Takes the worker's next bytes; returns the whole frames among them (what the client
    /// may get now), having read them.
    pub fn feed(&mut self, chunk: Bytes) -> Option<Bytes> {
        if self.unresumable == Some(TOO_LONG) {
            return Some(chunk);
        }
        let whole = self.frames.push(chunk);
        if self.frames.pending_len() > MAX_FRAME {
            // not a stream of answer frames as any engine sends them: pass it on as it is
            self.unresumable = Some(TOO_LONG);
            let rest = self.frames.take();
            return match (whole, rest) {
                (Some(a), Some(b)) => {
                    let mut joined = BytesMut::with_capacity(a.len() + b.len());
                    joined.extend_from_slice(&a);
                    joined.extend_from_slice(&b);
                    Some(joined.freeze())
                }
                (a, b) => a.or(b),
            };
        }
        let whole = whole?;
        each_frame(&whole, |data, _| {
            if let Some(d) = data {
                self.read(&d);
            }
        });
        (!whole.is_empty()).then_some(whole)
    }

    /// An unfinished last frame, when the stream ends.
    pub fn finish(&mut self) -> Option<Bytes> {
        self.frames.take()
    }

    fn read(&mut self, data: &[u8]) {
        if data == b"[DONE]" {
            self.done = true;
            return;
        }
        let Ok(frame) = serde_json::from_slice::<Frame<'_>>(data) else {
            self.unresumable
                .get_or_insert("a frame that is not an answer's");
            return;
        };
        if self.id.is_none() {
            self.id = frame.id.map(Cow::into_owned);
            self.created = frame.created;
            self.model = frame.model.map(Cow::into_owned);
        }
        for c in frame.choices {
            if c.index != 0 {
                self.unresumable.get_or_insert("several choices");
                continue;
            }
            let text = match c.delta {
                Some(d) => {
                    if d.tool_calls.is_some() || d.function_call.is_some() {
                        self.unresumable.get_or_insert("a tool call");
                    }
                    if d.reasoning_content.is_some() || d.reasoning.is_some() {
                        self.unresumable.get_or_insert("reasoning content");
                    }
                    d.content
                }
                None => c.text,
            };
            if let Some(t) = text.filter(|t| !t.is_empty()) {
                self.text.push_str(&t);
                self.text_frames += 1;
            }
            if c.finish_reason.is_some() {
                self.finished = true;
            }
        }
    }
}

const TOO_LONG: &str = "a frame too long to hold";

/// What to do for a stream broken mid-answer.
#[derive(Debug, PartialEq)]
pub enum Plan {
    /// Ask another worker for the rest with this body.
    Continue(Vec<u8>),
    /// The token limit was reached with what was sent: end the stream as the worker
    /// would have (a `length` finish).
    LimitReached,
}

/// The continuation of `body` (the request as sent to the worker) after `text`, `carried`
/// tokens long: the rest of the answer. `Err` says why the request cannot be continued.
pub fn continuation(
    body: &[u8],
    endpoint: Endpoint,
    text: &str,
    carried: u64,
) -> Result<Plan, &'static str> {
    let mut v: Value = serde_json::from_slice(body).map_err(|_| "the body is not JSON")?;
    let o = v.as_object_mut().ok_or("the body is not an object")?;
    let many = |k: &str| o.get(k).and_then(Value::as_u64).is_some_and(|n| n > 1);
    if many("n") || many("best_of") {
        return Err("several choices");
    }
    if o.get("echo").and_then(Value::as_bool) == Some(true) {
        return Err("echo");
    }
    for key in ["max_tokens", "max_completion_tokens"] {
        if let Some(n) = o.get(key).and_then(Value::as_u64) {
            let left = n.saturating_sub(carried);
            if left == 0 {
                return Ok(Plan::LimitReached);
            }
            o.insert(key.into(), left.into());
        }
    }
    match endpoint {
        Endpoint::ChatCompletions => {
            let continuing = o.get("continue_final_message").and_then(Value::as_bool) == Some(true);
            let msgs = o
                .get_mut("messages")
                .and_then(Value::as_array_mut)
                .ok_or("no messages")?;
            // a client continuing its own assistant message: the text goes on after it
            let last_assistant = msgs.last_mut().filter(|m| {
                continuing && m.get("role").and_then(Value::as_str) == Some("assistant")
            });
            match last_assistant.and_then(|m| m.get_mut("content")) {
                Some(Value::String(s)) => s.push_str(text),
                Some(_) => return Err("an assistant message whose content is not text"),
                None => msgs.push(serde_json::json!({"role": "assistant", "content": text})),
            }
            o.insert("continue_final_message".into(), true.into());
            o.insert("add_generation_prompt".into(), false.into());
        }
        Endpoint::Completions => match o.get_mut("prompt") {
            Some(Value::String(p)) => p.push_str(text),
            _ => return Err("a prompt that is not one string"),
        },
        Endpoint::Embeddings => return Err("not a generation"),
    }
    serde_json::to_vec(&v)
        .map(Plan::Continue)
        .map_err(|_| "the body cannot be written")
}

/// The frames that end a stream whose token limit was reached with what was sent.
pub fn limit_frames(track: &Track, endpoint: Endpoint) -> Bytes {
    let choice = match endpoint {
        Endpoint::ChatCompletions => {
            serde_json::json!({"index": 0, "delta": {}, "finish_reason": "length"})
        }
        _ => serde_json::json!({"index": 0, "text": "", "finish_reason": "length"}),
    };
    let object = match endpoint {
        Endpoint::ChatCompletions => "chat.completion.chunk",
        _ => "text_completion",
    };
    let frame = serde_json::json!({
        "id": track.id,
        "object": object,
        "created": track.created,
        "model": track.model,
        "choices": [choice],
    });
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(frame.to_string().as_bytes());
    out.extend_from_slice(b"\n\ndata: [DONE]\n\n");
    Bytes::from(out)
}

/// Rewrites a continuation's frames into the first worker's stream.
pub struct Splice {
    frames: Frames,
    id: Option<String>,
    created: Option<u64>,
    model: Option<String>,
    /// Tokens of the answer the continuation had in its prompt.
    carried: u64,
}

impl Splice {
    pub fn new(track: &Track, carried: u64) -> Self {
        Self {
            frames: Frames::default(),
            id: track.id.clone(),
            created: track.created,
            model: track.model.clone(),
            carried,
        }
    }

    /// The continuation's next bytes, as the client gets them (`None`: nothing yet).
    pub fn filter(&mut self, chunk: Bytes) -> Option<Bytes> {
        let whole = self.frames.push(chunk)?;
        let mut out = BytesMut::with_capacity(whole.len() + 64);
        each_frame(&whole, |data, raw| match data {
            Some(d) if &*d != b"[DONE]" => {
                if let Some(frame) = self.rewrite(&d) {
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(&frame);
                    out.extend_from_slice(b"\n\n");
                }
            }
            _ => out.extend_from_slice(raw),
        });
        (!out.is_empty()).then(|| out.freeze())
    }

    /// What is held when the continuation ends (an unfinished frame, passed on as it is).
    pub fn finish(&mut self) -> Option<Bytes> {
        self.frames.take()
    }

    /// One frame's data rewritten; `None` drops it (the continuation's role opener).
    fn rewrite(&self, data: &[u8]) -> Option<Vec<u8>> {
        let Ok(mut v) = serde_json::from_slice::<Value>(data) else {
            return Some(data.to_vec());
        };
        let Some(o) = v.as_object_mut() else {
            return Some(data.to_vec());
        };
        if let (Some(id), Some(Value::String(_))) = (&self.id, o.get("id")) {
            o.insert("id".into(), id.clone().into());
        }
        if let (Some(c), Some(_)) = (self.created, o.get("created")) {
            o.insert("created".into(), c.into());
        }
        if let (Some(m), Some(Value::String(_))) = (&self.model, o.get("model")) {
            o.insert("model".into(), m.clone().into());
        }
        if let Some(Value::Object(u)) = o.get_mut("usage") {
            let get = |u: &serde_json::Map<String, Value>, k: &str| {
                u.get(k).and_then(Value::as_u64).unwrap_or(0)
            };
            let prompt = get(u, "prompt_tokens").saturating_sub(self.carried);
            let completion = get(u, "completion_tokens") + self.carried;
            u.insert("prompt_tokens".into(), prompt.into());
            u.insert("completion_tokens".into(), completion.into());
        }
        let has_usage = o.get("usage").is_some_and(|u| !u.is_null());
        if let Some(Value::Array(choices)) = o.get_mut("choices") {
            let before = choices.len();
            choices.retain_mut(|c| {
                let Some(delta) = c.get_mut("delta").and_then(Value::as_object_mut) else {
                    return true;
                };
                delta.remove("role");
                let empty_text = delta
                    .get("content")
                    .is_none_or(|t| t.is_null() || t.as_str() == Some(""));
                let has_more = delta.keys().any(|k| k != "content");
                let finish = c.get("finish_reason").is_some_and(|f| !f.is_null());
                !(empty_text && !has_more && !finish)
            });
            if before > 0 && choices.is_empty() && !has_usage {
                return None;
            }
        }
        serde_json::to_vec(&v).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_frame(content: &str) -> String {
        format!(
            "data: {}\n\n",
            serde_json::json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
                "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]})
        )
    }

    #[test]
    fn only_whole_frames_pass_and_their_text_is_read() {
        let mut t = Track::default();
        let stream = format!(
            "data: {}\n\n{}{}",
            serde_json::json!({"id": "chatcmpl-1", "created": 7, "model": "m",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
            chat_frame("Hel"),
            chat_frame("lo \"w\"")
        );
        let mut out = Vec::new();
        // fed in every split: the client gets the same whole frames
        for cut in [1, 7, 40, 101, stream.len() - 1] {
            let mut t2 = Track::default();
            let mut got = Vec::new();
            for part in [&stream[..cut], &stream[cut..]] {
                if let Some(b) = t2.feed(Bytes::copy_from_slice(part.as_bytes())) {
                    got.extend_from_slice(&b);
                    assert!(got.ends_with(b"\n\n"), "a frame was cut at {cut}");
                }
            }
            assert_eq!(got, stream.as_bytes());
            assert_eq!(t2.text, "Hello \"w\"");
        }
        out.extend_from_slice(&t.feed(Bytes::from(stream.clone())).unwrap());
        assert_eq!(t.text, "Hello \"w\"");
        assert_eq!(t.text_frames, 2);
        assert_eq!(t.id.as_deref(), Some("chatcmpl-1"));
        assert_eq!(t.created, Some(7));
        assert!(!t.finished && t.unresumable.is_none());
        // a half frame is held back, and dropped if the stream breaks there
        assert_eq!(
            t.feed(Bytes::from_static(
                b"data: {\"choices\":[{\"index\":0,\"del"
            )),
            None
        );
        assert_eq!(t.text, "Hello \"w\"");
        let _ = t.finish(); // the worker failed: what it had not finished is dropped
        let next = Bytes::from(chat_frame(" next"));
        assert_eq!(t.feed(next.clone()), Some(next), "the next frame alone");
        assert_eq!(t.text, "Hello \"w\" next");
    }

    #[test]
    fn crlf_frames_completions_and_the_end_are_read() {
        let mut t = Track::default();
        t.feed(Bytes::from_static(
            b"data: {\"id\":\"cmpl-9\",\"choices\":[{\"index\":0,\"text\":\"a b\",\"finish_reason\":null}]}\r\n\r\n",
        ));
        assert_eq!(t.text, "a b");
        t.feed(Bytes::from_static(
            b"data: {\"choices\":[{\"index\":0,\"text\":\"\",\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n",
        ));
        assert!(t.finished && t.done);
    }

    #[test]
    fn tool_calls_and_several_choices_cannot_be_resumed() {
        let mut t = Track::default();
        t.feed(Bytes::from_static(
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0}]}}]}\n\n",
        ));
        assert_eq!(t.unresumable, Some("a tool call"));
        let mut t = Track::default();
        t.feed(Bytes::from_static(
            b"data: {\"choices\":[{\"index\":1,\"delta\":{\"content\":\"x\"}}]}\n\n",
        ));
        assert_eq!(t.unresumable, Some("several choices"));
        let mut t = Track::default();
        t.feed(Bytes::from_static(
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\",\"tool_calls\":null}}]}\n\n",
        ));
        assert_eq!(t.unresumable, None, "a null tool_calls is no tool call");
    }

    #[test]
    fn a_frame_too_long_stops_tracking_and_passes_through() {
        let mut t = Track::default();
        let big = Bytes::from(vec![b'x'; MAX_FRAME + 10]);
        let out = t.feed(big.clone()).unwrap();
        assert_eq!(out, big);
        assert_eq!(t.unresumable, Some(TOO_LONG));
        assert_eq!(t.feed(Bytes::from_static(b"y")).unwrap(), &b"y"[..]);
    }

    #[test]
    fn a_chat_continues_as_its_final_assistant_message() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":10,"stream":true,"temperature":0}"#;
        let Plan::Continue(c) = continuation(body, Endpoint::ChatCompletions, "Hello", 3).unwrap()
        else {
            panic!("expected a continuation")
        };
        let v: Value = serde_json::from_slice(&c).unwrap();
        assert_eq!(v["max_tokens"], 7);
        assert_eq!(
            v["messages"][1],
            serde_json::json!({"role":"assistant","content":"Hello"})
        );
        assert_eq!(v["continue_final_message"], true);
        assert_eq!(v["add_generation_prompt"], false);
        assert_eq!(v["temperature"], 0);
        // resumed again: from the request as sent, with all the text the client has
        let Plan::Continue(c2) =
            continuation(body, Endpoint::ChatCompletions, "Hello there", 4).unwrap()
        else {
            panic!()
        };
        let v: Value = serde_json::from_slice(&c2).unwrap();
        assert_eq!(v["messages"].as_array().unwrap().len(), 2);
        assert_eq!(v["messages"][1]["content"], "Hello there");
        assert_eq!(v["max_tokens"], 6);
        // a client continuing its own assistant message: the text goes on after it
        let own = br#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"Dear"}],"continue_final_message":true,"add_generation_prompt":false}"#;
        let Plan::Continue(c3) = continuation(own, Endpoint::ChatCompletions, " Sir", 1).unwrap()
        else {
            panic!()
        };
        let v: Value = serde_json::from_slice(&c3).unwrap();
        assert_eq!(v["messages"].as_array().unwrap().len(), 2);
        assert_eq!(v["messages"][1]["content"], "Dear Sir");
        assert_eq!(
            continuation(body, Endpoint::ChatCompletions, "Hello", 10),
            Ok(Plan::LimitReached)
        );
    }

    #[test]
    fn a_completion_continues_its_prompt_and_odd_requests_are_refused() {
        let body = br#"{"model":"m","prompt":"Once","max_completion_tokens":5}"#;
        let Plan::Continue(c) = continuation(body, Endpoint::Completions, " upon", 1).unwrap()
        else {
            panic!()
        };
        let v: Value = serde_json::from_slice(&c).unwrap();
        assert_eq!(v["prompt"], "Once upon");
        assert_eq!(v["max_completion_tokens"], 4);
        let refused = |b: &[u8], e| continuation(b, e, "x", 1).unwrap_err();
        assert_eq!(
            refused(br#"{"prompt":["a","b"]}"#, Endpoint::Completions),
            "a prompt that is not one string"
        );
        assert_eq!(
            refused(br#"{"prompt":"a","n":2}"#, Endpoint::Completions),
            "several choices"
        );
        assert_eq!(
            refused(br#"{"prompt":"a","echo":true}"#, Endpoint::Completions),
            "echo"
        );
        assert_eq!(
            refused(b"[1]", Endpoint::Completions),
            "the body is not an object"
        );
    }

    #[test]
    fn the_continuation_is_spliced_into_the_first_stream() {
        let mut t = Track::default();
        t.feed(Bytes::from(chat_frame("Hello")));
        let mut s = Splice::new(&t, 2);
        let cont = format!(
            "data: {}\n\ndata: {}\n\ndata: {}\n\n: keep-alive\n\ndata: {}\n\ndata: [DONE]\n\n",
            serde_json::json!({"id": "chatcmpl-2", "created": 9, "model": "m",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}),
            serde_json::json!({"id": "chatcmpl-2", "created": 9, "model": "m",
                "choices": [{"index": 0, "delta": {"content": " world"}, "finish_reason": null}]}),
            serde_json::json!({"id": "chatcmpl-2", "created": 9, "model": "m",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
            serde_json::json!({"id": "chatcmpl-2", "created": 9, "model": "m", "choices": [],
                "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}),
        );
        // split anywhere, the client gets the same frames
        let mut got = Vec::new();
        let (a, b) = cont.split_at(57);
        for part in [a, b] {
            if let Some(x) = s.filter(Bytes::copy_from_slice(part.as_bytes())) {
                got.extend_from_slice(&x);
            }
        }
        let mut t2 = Track::default();
        t2.feed(Bytes::from(got.clone()));
        assert_eq!(t2.text, " world", "the role opener is dropped");
        assert_eq!(t2.id.as_deref(), Some("chatcmpl-1"));
        assert_eq!(t2.created, Some(7));
        assert!(t2.finished && t2.done);
        let got = String::from_utf8(got).unwrap();
        assert!(
            !got.contains("chatcmpl-2") && !got.contains("\"role\""),
            "{got}"
        );
        assert!(got.contains(": keep-alive\n\n"), "comments pass: {got}");
        assert!(
            got.contains(r#""completion_tokens":5"#) && got.contains(r#""prompt_tokens":10"#),
            "usage counts the whole answer: {got}"
        );
    }

    #[test]
    fn the_limit_frames_end_the_stream() {
        let mut t = Track::default();
        t.feed(Bytes::from(chat_frame("Hi")));
        let end = limit_frames(&t, Endpoint::ChatCompletions);
        let mut t2 = Track::default();
        t2.feed(end);
        assert!(t2.finished && t2.done);
        assert_eq!(t2.id.as_deref(), Some("chatcmpl-1"));
    }
}
