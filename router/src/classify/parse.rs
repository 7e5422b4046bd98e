//! The one parse of an OpenAI request body: model, modalities, texts to count, media,
//! `max_tokens`, `stream`. Nothing here counts tokens or reads headers.

use routing_rules::{Endpoint, Modality, ModalitySet, RequestFeatures};
use serde_json::Value;

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
    /// A lower bound on the prompt's tokens, set by counting (the exact count when exact).
    pub prompt_tokens_lower: u64,
}

/// Tenant id derived from the API key: `key-` and the first 64 bits of its SHA-256, never
/// the key. Stable across builds and toolchains (a rule naming a tenant keeps matching),
/// and not forgeable: finding another key with the same id takes ~2^64 hashes.
pub fn tenant_of(authorization: Option<&str>) -> Option<String> {
    use sha2::Digest;
    use std::fmt::Write;
    let key = authorization?.strip_prefix("Bearer ")?.trim();
    if key.is_empty() {
        return None;
    }
    let digest = sha2::Sha256::digest(key.as_bytes());
    let mut id = String::with_capacity(20);
    id.push_str("key-");
    for b in &digest[..8] {
        let _ = write!(id, "{b:02x}");
    }
    Some(id)
}

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
                    ProxyError::BadRequest("`messages` must be an array".into(), Some("messages"))
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
                                        p.get_mut("text").and_then(take_str).unwrap_or_default(),
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
        prompt_tokens_lower: 0,
    })
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
                        "[a-z]{1,6}",
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

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
