//! The one parse of an OpenAI request body: model, modalities, texts to count, media,
//! `max_tokens`, `stream`. Nothing here counts tokens or reads headers.

use routing_rules::{Endpoint, Modality, ModalitySet, RequestFeatures};
use std::borrow::Cow;

use crate::error::ProxyError;

/// Per-message overhead of chat templates (role markers, separators), in tokens.
const PER_MESSAGE_TOKENS: u64 = 5;
/// Tokens of the assistant turn's opening.
const REPLY_PRIMER_TOKENS: u64 = 3;

/// What the body said, before counting.
pub struct Parsed {
    pub features: RequestFeatures,
    /// Text whose tokens are counted (message contents, or the prompt).
    pub texts: Vec<String>,
    /// Tokens added regardless of text: template overhead and media.
    pub fixed_tokens: u64,
    pub images: u64,
    pub audios: u64,
    pub requested_max_tokens: Option<u64>,
    /// Whether the body sets `stream_options` (the client chose what a stream reports;
    /// otherwise the router may ask the worker for usage, see `usage::ask_for_usage`).
    pub stream_options: bool,
    /// A lower bound on the prompt's tokens, set by counting (the exact count when exact).
    pub prompt_tokens_lower: u64,
}

/// One parse of `body`, straight into what classification needs: no `serde_json::Value`
/// tree is built. Fields the router does not read (sampling parameters, tools, a
/// message's role, image URLs...) are skipped as they are scanned, so the only memory a
/// request's parse takes is its texts (borrowed from the body where they have no escapes,
/// copied once into [`Parsed::texts`]). The outcome is that of reading the body as a
/// JSON document and looking at the fields (the property test below holds it to that
/// reference); a value the router skips is checked only for JSON syntax.
pub fn parse(endpoint: Endpoint, body: &[u8]) -> Result<Parsed, ProxyError> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_slice(body);
    let doc = typed::Body { endpoint }
        .deserialize(&mut de)
        .and_then(|doc| de.end().map(|()| doc))
        .map_err(|e| ProxyError::BadJson(e.to_string()))?;
    let typed::Doc {
        object,
        model,
        messages,
        texts: listed,
        max_completion_tokens,
        max_tokens,
        stream,
        stream_options,
    } = doc.0;
    if !object {
        return Err(ProxyError::BadRequest(
            "the body must be a JSON object".into(),
            None,
        ));
    }
    let model = model
        .ok_or_else(|| ProxyError::BadRequest("`model` is required".into(), Some("model")))?
        .into_owned();
    let mut modalities = ModalitySet::default();
    let mut texts = Vec::new();
    let mut fixed_tokens = 0u64;
    let mut images = 0u64;
    let mut audios = 0u64;
    match endpoint {
        Endpoint::ChatCompletions => {
            let msgs = messages.ok_or_else(|| {
                ProxyError::BadRequest("`messages` must be an array".into(), Some("messages"))
            })?;
            if msgs.is_empty() {
                return Err(ProxyError::BadRequest(
                    "`messages` must not be empty".into(),
                    Some("messages"),
                ));
            }
            fixed_tokens += REPLY_PRIMER_TOKENS;
            for content in msgs {
                fixed_tokens += PER_MESSAGE_TOKENS;
                match content {
                    typed::Content::Text(t) => {
                        modalities.insert(Modality::Text);
                        texts.push(t.into_owned());
                    }
                    typed::Content::Parts(parts) => {
                        for part in parts {
                            match part {
                                typed::Part::Text(t) => {
                                    modalities.insert(Modality::Text);
                                    texts.push(t.map(Cow::into_owned).unwrap_or_default());
                                }
                                typed::Part::Image => {
                                    modalities.insert(Modality::Image);
                                    images += 1;
                                }
                                typed::Part::Audio => {
                                    modalities.insert(Modality::Audio);
                                    audios += 1;
                                }
                                typed::Part::File => modalities.insert(Modality::Image),
                                typed::Part::Unknown => {
                                    return Err(ProxyError::BadRequest(
                                        "each content part needs a known `type`".into(),
                                        Some("messages"),
                                    ));
                                }
                            }
                        }
                    }
                    typed::Content::None => {}
                    typed::Content::Other => {
                        return Err(ProxyError::BadRequest(
                            "`content` must be a string or an array of parts".into(),
                            Some("messages"),
                        ));
                    }
                }
            }
        }
        Endpoint::Completions | Endpoint::Embeddings => {
            let key = if endpoint == Endpoint::Completions {
                "prompt"
            } else {
                "input"
            };
            modalities.insert(Modality::Text);
            let listed = listed.ok_or_else(|| {
                ProxyError::BadRequest(
                    format!("`{key}` must be a string or an array of strings"),
                    Some(key),
                )
            })?;
            texts.extend(listed.into_iter().map(Cow::into_owned));
        }
    }
    // `max_completion_tokens` wins when present, even when it is not a number (as reading
    // the document's fields does)
    let requested_max_tokens = max_completion_tokens.unwrap_or_else(|| max_tokens.flatten());
    Ok(Parsed {
        features: RequestFeatures {
            endpoint: Some(endpoint),
            model,
            modalities,
            stream: stream.unwrap_or(false),
            ..Default::default()
        },
        texts,
        fixed_tokens,
        images,
        audios,
        requested_max_tokens,
        stream_options,
        prompt_tokens_lower: 0,
    })
}

/// The typed reading of a request body. Every visitor accepts any JSON value: a value of
/// the wrong type is recorded as such (and skipped without being built), so the checks and
/// their messages stay in [`parse`], in the order the fields matter, whatever order the
/// client wrote them in. A key given twice counts as its last value.
mod typed {
    use std::borrow::Cow;
    use std::fmt;

    use routing_rules::Endpoint;
    use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess};

    /// Implements the `visit_*` methods for the JSON values a visitor does not take: each
    /// gives `$other`, after skipping a container's contents.
    macro_rules! others {
        ($other:expr, [$($skip:ident),*]) => {
            $(others!(@one $skip, $other);)*
        };
        (@one bool, $other:expr) => {
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> { Ok($other) }
        };
        (@one i64, $other:expr) => {
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> { Ok($other) }
        };
        (@one u64, $other:expr) => {
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> { Ok($other) }
        };
        (@one f64, $other:expr) => {
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> { Ok($other) }
        };
        (@one unit, $other:expr) => {
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> { Ok($other) }
        };
        (@one str, $other:expr) => {
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> { Ok($other) }
        };
        (@one seq, $other:expr) => {
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok($other)
            }
        };
        (@one map, $other:expr) => {
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok($other)
            }
        };
    }

    /// A visitor's `expecting`: never shown, as every visitor takes every value.
    macro_rules! expecting {
        () => {
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
        };
    }

    /// What the body's fields held.
    #[derive(Default)]
    pub struct Doc<'de> {
        /// Whether the body is a JSON object at all.
        pub object: bool,
        /// `model`, when a string.
        pub model: Option<Cow<'de, str>>,
        /// Chat: each message's content, when `messages` is an array.
        pub messages: Option<Vec<Content<'de>>>,
        /// Completions and embeddings: `prompt` / `input` as texts, when a string or an
        /// array (whose strings are kept).
        pub texts: Option<Vec<Cow<'de, str>>>,
        /// Present (outer `Some`), and a non-negative integer (inner `Some`).
        pub max_completion_tokens: Option<Option<u64>>,
        pub max_tokens: Option<Option<u64>>,
        /// `stream`, when a boolean.
        pub stream: Option<bool>,
        /// Whether `stream_options` is present (any value).
        pub stream_options: bool,
    }

    /// Reads the body for one endpoint (which fields hold its texts).
    pub struct Body {
        pub endpoint: Endpoint,
    }

    /// The body as read.
    pub struct Read<'de>(pub Doc<'de>);

    impl<'de> DeserializeSeed<'de> for Body {
        type Value = Read<'de>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Read<'de>, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> de::Visitor<'de> for Body {
        type Value = Read<'de>;
        expecting!();
        others!(Read(Doc::default()), [bool, i64, u64, f64, unit, str, seq]);

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Read<'de>, A::Error> {
            let texts_key = match self.endpoint {
                Endpoint::ChatCompletions => None,
                Endpoint::Completions => Some("prompt"),
                Endpoint::Embeddings => Some("input"),
            };
            let chat = self.endpoint == Endpoint::ChatCompletions;
            let mut doc = Doc {
                object: true,
                ..Doc::default()
            };
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                match &*key {
                    "model" => doc.model = map.next_value::<Str>()?.0,
                    "messages" if chat => doc.messages = map.next_value::<Messages>()?.0,
                    k if Some(k) == texts_key => doc.texts = map.next_value::<Texts>()?.0,
                    "max_completion_tokens" => {
                        doc.max_completion_tokens = Some(map.next_value::<U64>()?.0)
                    }
                    "max_tokens" => doc.max_tokens = Some(map.next_value::<U64>()?.0),
                    "stream" => doc.stream = map.next_value::<Bool>()?.0,
                    "stream_options" => {
                        map.next_value::<IgnoredAny>()?;
                        doc.stream_options = true;
                    }
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(Read(doc))
        }
    }

    /// Implements `Deserialize` for a newtype through its visitor.
    macro_rules! through_visitor {
        ($ty:ident, $visitor:ident) => {
            impl<'de> de::Deserialize<'de> for $ty<'de> {
                fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                    d.deserialize_any($visitor(std::marker::PhantomData))
                }
            }
            struct $visitor<'de>(std::marker::PhantomData<&'de ()>);
        };
    }

    /// A string, or `None` for any other value.
    pub struct Str<'de>(pub Option<Cow<'de, str>>);
    through_visitor!(Str, StrVisitor);
    impl<'de> de::Visitor<'de> for StrVisitor<'de> {
        type Value = Str<'de>;
        expecting!();
        others!(Str(None), [bool, i64, u64, f64, unit, seq, map]);
        fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Str<'de>, E> {
            Ok(Str(Some(Cow::Borrowed(v))))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Str<'de>, E> {
            Ok(Str(Some(Cow::Owned(v.to_string()))))
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<Str<'de>, E> {
            Ok(Str(Some(Cow::Owned(v))))
        }
    }

    /// A non-negative integer, or `None` for any other value.
    pub struct U64<'de>(pub Option<u64>, std::marker::PhantomData<&'de ()>);
    through_visitor!(U64, U64Visitor);
    impl<'de> de::Visitor<'de> for U64Visitor<'de> {
        type Value = U64<'de>;
        expecting!();
        others!(
            U64(None, std::marker::PhantomData),
            [bool, f64, unit, str, seq, map]
        );
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<U64<'de>, E> {
            Ok(U64(Some(v), std::marker::PhantomData))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<U64<'de>, E> {
            Ok(U64(u64::try_from(v).ok(), std::marker::PhantomData))
        }
    }

    /// A boolean, or `None` for any other value.
    pub struct Bool<'de>(pub Option<bool>, std::marker::PhantomData<&'de ()>);
    through_visitor!(Bool, BoolVisitor);
    impl<'de> de::Visitor<'de> for BoolVisitor<'de> {
        type Value = Bool<'de>;
        expecting!();
        others!(
            Bool(None, std::marker::PhantomData),
            [i64, u64, f64, unit, str, seq, map]
        );
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Bool<'de>, E> {
            Ok(Bool(Some(v), std::marker::PhantomData))
        }
    }

    /// `prompt` / `input`: a string, or an array whose strings are kept; `None` for any
    /// other value.
    pub struct Texts<'de>(pub Option<Vec<Cow<'de, str>>>);
    through_visitor!(Texts, TextsVisitor);
    impl<'de> de::Visitor<'de> for TextsVisitor<'de> {
        type Value = Texts<'de>;
        expecting!();
        others!(Texts(None), [bool, i64, u64, f64, unit, map]);
        fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Texts<'de>, E> {
            Ok(Texts(Some(vec![Cow::Borrowed(v)])))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Texts<'de>, E> {
            Ok(Texts(Some(vec![Cow::Owned(v.to_string())])))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Texts<'de>, A::Error> {
            let mut out = Vec::new();
            while let Some(Str(s)) = seq.next_element::<Str>()? {
                out.extend(s);
            }
            Ok(Texts(Some(out)))
        }
    }

    /// `messages`: each message's content when an array, `None` for any other value.
    pub struct Messages<'de>(pub Option<Vec<Content<'de>>>);
    through_visitor!(Messages, MessagesVisitor);
    impl<'de> de::Visitor<'de> for MessagesVisitor<'de> {
        type Value = Messages<'de>;
        expecting!();
        others!(Messages(None), [bool, i64, u64, f64, unit, str, map]);
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Messages<'de>, A::Error> {
            let mut out = Vec::new();
            while let Some(Message(c)) = seq.next_element::<Message>()? {
                out.push(c);
            }
            Ok(Messages(Some(out)))
        }
    }

    /// A message's content.
    pub enum Content<'de> {
        Text(Cow<'de, str>),
        Parts(Vec<Part<'de>>),
        /// Absent or `null` (or the message is not an object).
        None,
        /// Any other value: refused.
        Other,
    }

    /// One message: only its `content` is read.
    pub struct Message<'de>(pub Content<'de>);
    through_visitor!(Message, MessageVisitor);
    impl<'de> de::Visitor<'de> for MessageVisitor<'de> {
        type Value = Message<'de>;
        expecting!();
        others!(
            Message(Content::None),
            [bool, i64, u64, f64, unit, str, seq]
        );
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Message<'de>, A::Error> {
            let mut content = Content::None;
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                if key == "content" {
                    content = map.next_value::<ContentValue>()?.0;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(Message(content))
        }
    }

    struct ContentValue<'de>(Content<'de>);
    through_visitor!(ContentValue, ContentVisitor);
    impl<'de> de::Visitor<'de> for ContentVisitor<'de> {
        type Value = ContentValue<'de>;
        expecting!();
        others!(ContentValue(Content::Other), [bool, i64, u64, f64, map]);
        fn visit_unit<E: de::Error>(self) -> Result<ContentValue<'de>, E> {
            Ok(ContentValue(Content::None))
        }
        fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<ContentValue<'de>, E> {
            Ok(ContentValue(Content::Text(Cow::Borrowed(v))))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<ContentValue<'de>, E> {
            Ok(ContentValue(Content::Text(Cow::Owned(v.to_string()))))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ContentValue<'de>, A::Error> {
            let mut parts = Vec::new();
            while let Some(p) = seq.next_element::<PartValue>()? {
                parts.push(p.0);
            }
            Ok(ContentValue(Content::Parts(parts)))
        }
    }

    /// A content part, by its `type`.
    pub enum Part<'de> {
        /// `text`, with its `text` when a string.
        Text(Option<Cow<'de, str>>),
        Image,
        Audio,
        File,
        /// Not an object, or no known `type`: refused.
        Unknown,
    }

    struct PartValue<'de>(Part<'de>);
    through_visitor!(PartValue, PartVisitor);
    impl<'de> de::Visitor<'de> for PartVisitor<'de> {
        type Value = PartValue<'de>;
        expecting!();
        others!(
            PartValue(Part::Unknown),
            [bool, i64, u64, f64, unit, str, seq]
        );
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PartValue<'de>, A::Error> {
            let mut kind: Option<Cow<'de, str>> = None;
            let mut text: Option<Cow<'de, str>> = None;
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                match &*key {
                    "type" => kind = map.next_value::<Str>()?.0,
                    "text" => text = map.next_value::<Str>()?.0,
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(PartValue(match kind.as_deref() {
                Some("text") => Part::Text(text),
                Some("image_url" | "image") => Part::Image,
                Some("input_audio" | "audio") => Part::Audio,
                Some("file") => Part::File,
                _ => Part::Unknown,
            }))
        }
    }
}

/// The endpoint a path names, for `rules explain` and `POST /admin/explain`.
pub fn endpoint_of(path: &str) -> Option<Endpoint> {
    match path {
        "/v1/chat/completions" => Some(Endpoint::ChatCompletions),
        "/v1/completions" => Some(Endpoint::Completions),
        "/v1/embeddings" => Some(Endpoint::Embeddings),
        _ => None,
    }
}

/// The reference the typed parse is held to: the body read as a `serde_json::Value`
/// document and its fields looked at (the router's parse before it was typed).
#[cfg(test)]
mod reference {
    use routing_rules::{Endpoint, Modality, ModalitySet, RequestFeatures};
    use serde_json::Value;

    use super::{PER_MESSAGE_TOKENS, Parsed, REPLY_PRIMER_TOKENS};
    use crate::error::ProxyError;

    /// Takes the string out of `v`, leaving `Null`: texts move from the parsed document into
    /// [`Parsed::texts`] instead of being copied (a prompt is held once, not twice).
    fn take_str(v: &mut Value) -> Option<String> {
        match v.take() {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// One parse of `body`. Message texts are moved out of the parsed document, not copied:
    /// while a request is classified the router holds its body's bytes and one copy of its
    /// texts (before, two), and the texts go once the count is done. The body budget counts
    /// the body's bytes, which bound the texts' size.
    pub fn parse(endpoint: Endpoint, body: &[u8]) -> Result<Parsed, ProxyError> {
        let mut v: Value =
            serde_json::from_slice(body).map_err(|e| ProxyError::BadJson(e.to_string()))?;
        let obj = v
            .as_object_mut()
            .ok_or_else(|| ProxyError::BadRequest("the body must be a JSON object".into(), None))?;
        let model = obj
            .get_mut("model")
            .and_then(take_str)
            .ok_or_else(|| ProxyError::BadRequest("`model` is required".into(), Some("model")))?;
        let mut modalities = ModalitySet::default();
        let mut texts = Vec::new();
        let mut fixed_tokens = 0u64;
        let mut images = 0u64;
        let mut audios = 0u64;
        match endpoint {
            Endpoint::ChatCompletions => {
                let msgs = obj
                    .get_mut("messages")
                    .and_then(Value::as_array_mut)
                    .ok_or_else(|| {
                        ProxyError::BadRequest(
                            "`messages` must be an array".into(),
                            Some("messages"),
                        )
                    })?;
                if msgs.is_empty() {
                    return Err(ProxyError::BadRequest(
                        "`messages` must not be empty".into(),
                        Some("messages"),
                    ));
                }
                fixed_tokens += REPLY_PRIMER_TOKENS;
                for m in msgs {
                    fixed_tokens += PER_MESSAGE_TOKENS;
                    match m.get_mut("content") {
                        Some(s @ Value::String(_)) => {
                            modalities.insert(Modality::Text);
                            texts.extend(take_str(s));
                        }
                        Some(Value::Array(parts)) => {
                            for p in parts {
                                match p.get("type").and_then(Value::as_str) {
                                    Some("text") => {
                                        modalities.insert(Modality::Text);
                                        texts.push(
                                            p.get_mut("text")
                                                .and_then(take_str)
                                                .unwrap_or_default(),
                                        );
                                    }
                                    Some("image_url") | Some("image") => {
                                        modalities.insert(Modality::Image);
                                        images += 1;
                                    }
                                    Some("input_audio") | Some("audio") => {
                                        modalities.insert(Modality::Audio);
                                        audios += 1;
                                    }
                                    Some("file") => modalities.insert(Modality::Image),
                                    _ => {
                                        return Err(ProxyError::BadRequest(
                                            "each content part needs a known `type`".into(),
                                            Some("messages"),
                                        ));
                                    }
                                }
                            }
                        }
                        None | Some(Value::Null) => {}
                        Some(_) => {
                            return Err(ProxyError::BadRequest(
                                "`content` must be a string or an array of parts".into(),
                                Some("messages"),
                            ));
                        }
                    }
                }
            }
            Endpoint::Completions | Endpoint::Embeddings => {
                let key = if endpoint == Endpoint::Completions {
                    "prompt"
                } else {
                    "input"
                };
                modalities.insert(Modality::Text);
                match obj.get_mut(key) {
                    Some(s @ Value::String(_)) => texts.extend(take_str(s)),
                    Some(Value::Array(a)) => texts.extend(a.iter_mut().filter_map(take_str)),
                    _ => {
                        return Err(ProxyError::BadRequest(
                            format!("`{key}` must be a string or an array of strings"),
                            Some(key),
                        ));
                    }
                }
            }
        }
        let requested_max_tokens = obj
            .get("max_completion_tokens")
            .or_else(|| obj.get("max_tokens"))
            .and_then(Value::as_u64);
        let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let stream_options = obj.contains_key("stream_options");
        Ok(Parsed {
            features: RequestFeatures {
                endpoint: Some(endpoint),
                model,
                modalities,
                stream,
                ..Default::default()
            },
            texts,
            fixed_tokens,
            images,
            audios,
            requested_max_tokens,
            stream_options,
            prompt_tokens_lower: 0,
        })
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;
    use routing_rules::Endpoint;

    use super::parse;

    /// JSON values of any shape, a few levels deep.
    fn json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            "[a-z_]{0,12}".prop_map(serde_json::Value::from),
            Just(serde_json::Value::from("text")),
            Just(serde_json::Value::from("image_url")),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("model".to_string()),
                        Just("messages".to_string()),
                        Just("content".to_string()),
                        Just("type".to_string()),
                        Just("text".to_string()),
                        Just("prompt".to_string()),
                        Just("input".to_string()),
                        Just("max_tokens".to_string()),
                        Just("stream".to_string()),
                        Just("stream_options".to_string()),
                        "[a-z]{1,6}",
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    type Summary = (
        String,
        Vec<&'static str>,
        bool,
        Vec<String>,
        u64,
        u64,
        u64,
        Option<u64>,
        bool,
    );

    /// What a parse says, comparable: the fields classification reads, or the error's
    /// status and message.
    fn summary(
        r: Result<super::Parsed, crate::error::ProxyError>,
    ) -> Result<Summary, (u16, String)> {
        r.map(|p| {
            (
                p.features.model,
                p.features.modalities.names(),
                p.features.stream,
                p.texts,
                p.fixed_tokens,
                p.images,
                p.audios,
                p.requested_max_tokens,
                p.stream_options,
            )
        })
        .map_err(|e| (e.status(), e.to_string()))
    }

    /// Bodies that matter: escapes, duplicate keys, wrong types in every field, parts.
    #[test]
    fn typed_parse_matches_the_document_reading_on_known_bodies() {
        let bodies = [
            r#"{"model":"m","messages":[{"role":"user","content":"a \"quoted\" \u00e9 text\n"}]}"#,
            r#"{"model":"a","model":"b","messages":[{"content":"x"}],"messages":[{"content":"y"},{"content":null}]}"#,
            r#"{"model":"m","messages":[{"content":[{"type":"text","text":"t"},{"type":"image_url","image_url":{"url":"u"}},{"type":"input_audio"},{"type":"file"},{"type":"text"}]}]}"#,
            r#"{"model":"m","messages":[{"content":[{"type":"bogus"}]}]}"#,
            r#"{"model":"m","messages":[{"content":[3]}]}"#,
            r#"{"model":"m","messages":[{"content":7}]}"#,
            r#"{"model":"m","messages":[1,"x",null,[],{"content":"ok"}]}"#,
            r#"{"model":"m","messages":[]}"#,
            r#"{"model":"m","messages":{}}"#,
            r#"{"model":3,"messages":[{"content":[{"type":"bogus"}]}]}"#,
            r#"{"messages":[{"content":"x"}]}"#,
            r#"{"model":"m","messages":[{"content":"x"}],"max_completion_tokens":null,"max_tokens":5}"#,
            r#"{"model":"m","messages":[{"content":"x"}],"max_tokens":5,"stream":true}"#,
            r#"{"model":"m","messages":[{"content":"x"}],"max_tokens":-5,"stream":"yes"}"#,
            r#"{"model":"m","messages":[{"content":"x"}],"max_tokens":5.0,"tools":[{"a":[1,2,{"b":null}]}]}"#,
            r#"{"model":"m","prompt":["a",1,"b",null],"input":"i"}"#,
            r#"{"model":"m","prompt":"p","input":["a",{"x":1}]}"#,
            r#"{"model":"m","prompt":{"a":1},"input":7}"#,
            r#"[{"model":"m"}]"#,
            r#""model""#,
            r#"{"model":"m","messages":[{"content":"x"}]} trailing"#,
            r#"{"model":"m","messages":[{"content":"x"}"#,
            "",
        ];
        for body in bodies {
            for ep in [
                Endpoint::ChatCompletions,
                Endpoint::Completions,
                Endpoint::Embeddings,
            ] {
                assert_eq!(
                    summary(parse(ep, body.as_bytes())),
                    summary(super::reference::parse(ep, body.as_bytes())),
                    "{ep:?} {body}"
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any JSON document: the typed parse says what reading the document says.
        #[test]
        fn typed_parse_matches_the_document_reading(v in json()) {
            let body = serde_json::to_vec(&v).unwrap();
            for ep in [Endpoint::ChatCompletions, Endpoint::Completions, Endpoint::Embeddings] {
                prop_assert_eq!(summary(parse(ep, &body)), summary(super::reference::parse(ep, &body)));
            }
        }

        /// Any bytes: a parse or a clean error, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            for ep in [Endpoint::ChatCompletions, Endpoint::Completions, Endpoint::Embeddings] {
                let _ = parse(ep, &body);
            }
        }

        /// Any JSON shape: a parse whose texts came from the body, or a 400.
        #[test]
        fn arbitrary_json_parses_or_is_refused_as_the_clients_fault(v in json()) {
            let body = serde_json::to_vec(&v).unwrap();
            for ep in [Endpoint::ChatCompletions, Endpoint::Completions, Endpoint::Embeddings] {
                match parse(ep, &body) {
                    Ok(p) => {
                        let text_bytes: usize = p.texts.iter().map(String::len).sum();
                        prop_assert!(text_bytes <= body.len());
                        prop_assert_eq!(Some(p.features.model.as_str()), v["model"].as_str());
                    }
                    Err(e) => prop_assert_eq!(e.status(), 400),
                }
            }
        }
    }
}
