//! What the router learned about a request: the input to [`crate::CompiledRules::route`].

use crate::spec::{Endpoint, Modality};

/// A set of input modalities, as a bit set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ModalitySet(u8);

impl ModalitySet {
    pub const TEXT: Self = Self(1);
    pub const IMAGE: Self = Self(2);
    pub const AUDIO: Self = Self(4);

    pub fn insert(&mut self, m: Modality) {
        self.0 |= Self::bit(m);
    }
    pub fn contains(self, m: Modality) -> bool {
        self.0 & Self::bit(m) != 0
    }
    pub fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn from_bits(bits: u8) -> Self {
        Self(bits & 7)
    }
    pub fn bits(self) -> u8 {
        self.0
    }
    fn bit(m: Modality) -> u8 {
        match m {
            Modality::Text => 1,
            Modality::Image => 2,
            Modality::Audio => 4,
        }
    }
    /// Names, for logs and `explain`.
    pub fn names(self) -> Vec<&'static str> {
        [
            (Modality::Text, "text"),
            (Modality::Image, "image"),
            (Modality::Audio, "audio"),
        ]
        .into_iter()
        .filter(|(m, _)| self.contains(*m))
        .map(|(_, n)| n)
        .collect()
    }
}

impl FromIterator<Modality> for ModalitySet {
    fn from_iter<I: IntoIterator<Item = Modality>>(iter: I) -> Self {
        let mut s = Self::default();
        for m in iter {
            s.insert(m);
        }
        s
    }
}

/// Everything a rule can test about one request.
#[derive(Debug, Clone, Default)]
pub struct RequestFeatures {
    pub endpoint: Option<Endpoint>,
    pub model: String,
    /// Tenant id derived from the API key (never the key itself).
    pub tenant: Option<String>,
    pub modalities: ModalitySet,
    /// Prompt tokens (exact, or a value that gives the same decision as the exact one).
    pub prompt_tokens: u64,
    /// `max_tokens` as requested, or the model's default.
    pub max_tokens: u64,
    pub stream: bool,
    /// Request headers the rules test (lower-case names), see `CompiledRules::header_names`.
    pub headers: Vec<(String, String)>,
}

impl RequestFeatures {
    /// Prompt tokens plus the tokens the request may generate.
    pub fn context_tokens(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.max_tokens)
    }
}
