//! Hugging Face model directories: `config.json`, the weights as `*.safetensors` (one file,
//! or shards listed by `model.safetensors.index.json`), `tokenizer.json`,
//! `tokenizer_config.json` (special tokens, chat template) and `generation_config.json`
//! (the tokens that end a turn).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::MetaError;

/// One token id or several (`eos_token_id` is either, depending on the model).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn ids(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

/// `rope_scaling` of `config.json`. Only Llama 3's frequency scaling is supported; any other
/// kind is refused at load rather than run with the wrong positions.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct RopeScaling {
    pub rope_type: Option<String>,
    /// The older spelling of `rope_type`; configs re-saved by transformers carry both.
    #[serde(rename = "type")]
    pub legacy_type: Option<String>,
    pub factor: Option<f32>,
    pub low_freq_factor: Option<f32>,
    pub high_freq_factor: Option<f32>,
    pub original_max_position_embeddings: Option<usize>,
}

/// Rotary inverse frequencies, one per pair of a head's `head_dim` dimensions.
pub fn rope_inv_freq(base: f32, head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| base.powf(-((2 * i) as f32) / head_dim as f32))
        .collect()
}

impl RopeScaling {
    /// `rope_type`, or the older `type`.
    pub fn kind(&self) -> Option<&str> {
        self.rope_type.as_deref().or(self.legacy_type.as_deref())
    }

    /// Applies Llama 3's frequency scaling to rotary inverse frequencies: long wavelengths
    /// are divided by `factor`, short ones kept, the band between blended. A no-op for
    /// `default` (and for incomplete settings, which [`HfModel::open`] refuses).
    pub fn apply(&self, inv_freq: &mut [f32]) {
        let (Some("llama3"), Some(factor), Some(low), Some(high), Some(original)) = (
            self.kind(),
            self.factor,
            self.low_freq_factor,
            self.high_freq_factor,
            self.original_max_position_embeddings,
        ) else {
            return;
        };
        let original = original as f32;
        let (low_wavelen, high_wavelen) = (original / low, original / high);
        for f in inv_freq {
            let wavelen = 2.0 * std::f32::consts::PI / *f;
            if wavelen > low_wavelen {
                *f /= factor;
            } else if wavelen >= high_wavelen {
                let smooth = (original / wavelen - low) / (high - low);
                *f = (1.0 - smooth) * *f / factor + smooth * *f;
            }
        }
    }
}

/// The fields of `config.json` the worker reads (llama and qwen2 families).
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub num_hidden_layers: usize,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub use_sliding_window: bool,
    pub eos_token_id: Option<TokenIds>,
    /// GPTQ, AWQ, bitsandbytes...: packed weights this loader cannot read.
    pub quantization_config: Option<serde_json::Value>,
}

fn default_rope_theta() -> f64 {
    10_000.0
}

/// A special token in `tokenizer_config.json`: a plain string or an `AddedToken` object.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SpecialToken {
    Text(String),
    Added { content: String },
}

impl SpecialToken {
    fn text(self) -> String {
        match self {
            Self::Text(t) | Self::Added { content: t } => t,
        }
    }
}

/// `chat_template`: one template, or several named ones (the `default` is used).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum ChatTemplates {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Debug, Clone, Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct TokenizerConfig {
    bos_token: Option<SpecialToken>,
    eos_token: Option<SpecialToken>,
    chat_template: Option<ChatTemplates>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct GenerationConfig {
    eos_token_id: Option<TokenIds>,
}

#[derive(Debug, Clone, Deserialize)]
struct ShardIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

/// The architectures the worker runs from safetensors.
pub const HF_ARCHITECTURES: [&str; 2] = ["llama", "qwen2"];

/// A Hugging Face model directory, read and checked (the weights themselves stay on disk).
#[derive(Debug, Clone)]
pub struct HfModel {
    pub dir: PathBuf,
    pub config: HfConfig,
    /// `llama` or `qwen2`.
    pub architecture: String,
    /// The safetensors files holding the weights.
    pub weights: Vec<PathBuf>,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Every token id that ends generation: `config.json`'s and `generation_config.json`'s.
    pub eos_token_ids: Vec<u32>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, MetaError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(MetaError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| MetaError::Config(format!("{}: {e}", path.display())))
}

/// Whether `path` is a Hugging Face model: a directory with a `config.json`, or a
/// `.safetensors` file inside one.
pub fn is_hf_model(path: &Path) -> bool {
    hf_dir(path).join("config.json").is_file()
}

fn hf_dir(path: &Path) -> &Path {
    if path.extension().is_some_and(|e| e == "safetensors") {
        // a bare file name's parent is ""
        match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        }
    } else {
        path
    }
}

impl HfModel {
    /// Reads the model directory at `path` (or the directory of a `.safetensors` file).
    pub fn open(path: &Path) -> Result<Self, MetaError> {
        let dir = hf_dir(path).to_path_buf();
        let config_path = dir.join("config.json");
        let config: HfConfig = read_json(&config_path)?.ok_or_else(|| MetaError::Io {
            path: config_path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no config.json"),
        })?;
        let architecture = config
            .model_type
            .clone()
            .or_else(|| {
                config.architectures.first().map(|a| {
                    a.trim_end_matches("ForCausalLM")
                        .trim_end_matches("Model")
                        .to_lowercase()
                })
            })
            .unwrap_or_default();
        let mut problems = Vec::new();
        if !HF_ARCHITECTURES.contains(&architecture.as_str()) {
            problems.push(format!(
                "architecture `{architecture}` is not supported (supported: {})",
                HF_ARCHITECTURES.join(", ")
            ));
        }
        if let Some(act) = &config.hidden_act
            && act != "silu"
        {
            problems.push(format!("hidden_act `{act}` is not supported (silu)"));
        }
        if let Some(q) = &config.quantization_config {
            let method = q
                .get("quant_method")
                .and_then(|m| m.as_str())
                .unwrap_or("unknown");
            problems.push(format!(
                "quantized checkpoint (`{method}`) is not supported: use its GGUF or the unquantized weights"
            ));
        }
        if config.use_sliding_window {
            problems.push("use_sliding_window: sliding-window attention is not supported".into());
        }
        if let Some(s) = &config.rope_scaling {
            match s.kind() {
                None | Some("default") => {}
                Some("llama3") => {
                    if s.factor.is_none()
                        || s.low_freq_factor.is_none()
                        || s.high_freq_factor.is_none()
                        || s.original_max_position_embeddings.is_none()
                    {
                        problems.push(
                            "rope_scaling llama3 needs factor, low_freq_factor, high_freq_factor \
                             and original_max_position_embeddings"
                                .into(),
                        );
                    }
                }
                Some(other) => problems.push(format!(
                    "rope_scaling `{other}` is not supported (default, llama3)"
                )),
            }
        }
        let weights = weight_files(&dir)?;
        if weights.is_empty() {
            problems.push(format!("no .safetensors weights in {}", dir.display()));
        }
        if !problems.is_empty() {
            return Err(MetaError::Config(format!(
                "{}: {}",
                config_path.display(),
                problems.join("; ")
            )));
        }
        let tok_cfg: TokenizerConfig =
            read_json(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        let gen_cfg: GenerationConfig =
            read_json(&dir.join("generation_config.json"))?.unwrap_or_default();
        // transformers ≥ 4.43 saves the template beside the config, as chat_template.jinja.
        let jinja = dir.join("chat_template.jinja");
        let chat_template = match std::fs::read_to_string(&jinja) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tok_cfg.chat_template.and_then(|t| match t {
                    ChatTemplates::One(t) => Some(t),
                    ChatTemplates::Named(list) => {
                        let default = list.iter().position(|t| t.name == "default");
                        list.into_iter()
                            .nth(default.unwrap_or(0))
                            .map(|t| t.template)
                    }
                })
            }
            Err(source) => {
                return Err(MetaError::Io {
                    path: jinja,
                    source,
                });
            }
        };
        let mut eos = BTreeSet::new();
        for ids in [&config.eos_token_id, &gen_cfg.eos_token_id]
            .into_iter()
            .flatten()
        {
            eos.extend(ids.ids());
        }
        Ok(Self {
            dir,
            architecture,
            weights,
            chat_template,
            bos_token: tok_cfg.bos_token.map(SpecialToken::text),
            eos_token: tok_cfg.eos_token.map(SpecialToken::text),
            eos_token_ids: eos.into_iter().collect(),
            config,
        })
    }

    /// The directory's `tokenizer.json`.
    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join("tokenizer.json")
    }
}

/// The weight files: the shards named by `model.safetensors.index.json`, else every
/// `.safetensors` file in the directory.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, MetaError> {
    if let Some(index) = read_json::<ShardIndex>(&dir.join("model.safetensors.index.json"))? {
        let names: BTreeSet<&String> = index.weight_map.values().collect();
        return Ok(names.into_iter().map(|n| dir.join(n)).collect());
    }
    let entries = std::fs::read_dir(dir).map_err(|source| MetaError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    const LLAMA: &str = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama",
        "hidden_size":64,"intermediate_size":128,"num_attention_heads":4,"num_key_value_heads":2,
        "num_hidden_layers":2,"rms_norm_eps":1e-5,"max_position_embeddings":512,"vocab_size":300,
        "hidden_act":"silu","eos_token_id":2}"#;

    #[test]
    fn a_model_directory_gives_its_template_special_tokens_and_every_eos() {
        let dir = dir_with(&[
            ("config.json", LLAMA),
            ("model.safetensors", ""),
            (
                "tokenizer_config.json",
                r#"{"bos_token":{"content":"<s>","lstrip":false},"eos_token":"</s>",
                    "chat_template":[{"name":"tool_use","template":"T"},{"name":"default","template":"D"}]}"#,
            ),
            ("generation_config.json", r#"{"eos_token_id":[2,7]}"#),
        ]);
        let m = HfModel::open(dir.path()).unwrap();
        assert_eq!(m.architecture, "llama");
        assert_eq!(m.chat_template.as_deref(), Some("D"));
        assert_eq!(m.bos_token.as_deref(), Some("<s>"));
        assert_eq!(m.eos_token.as_deref(), Some("</s>"));
        assert_eq!(m.eos_token_ids, vec![2, 7]);
        assert_eq!(m.weights, vec![dir.path().join("model.safetensors")]);
        // a .safetensors path names its directory
        let again = HfModel::open(&dir.path().join("model.safetensors")).unwrap();
        assert_eq!(again.dir, dir.path());
        assert!(is_hf_model(dir.path()));
    }

    #[test]
    fn shards_come_from_the_index_and_the_jinja_file_wins() {
        let dir = dir_with(&[
            ("config.json", LLAMA),
            (
                "model.safetensors.index.json",
                r#"{"metadata":{},"weight_map":{"a":"m-00002.safetensors","b":"m-00001.safetensors","c":"m-00001.safetensors"}}"#,
            ),
            ("tokenizer_config.json", r#"{"chat_template":"old"}"#),
            ("chat_template.jinja", "new"),
        ]);
        let m = HfModel::open(dir.path()).unwrap();
        assert_eq!(
            m.weights,
            vec![
                dir.path().join("m-00001.safetensors"),
                dir.path().join("m-00002.safetensors")
            ]
        );
        assert_eq!(m.chat_template.as_deref(), Some("new"));
    }

    /// Configs re-saved by transformers carry the scaling kind under both keys.
    #[test]
    fn rope_scaling_may_name_its_kind_twice() {
        let config = LLAMA.replace(
            r#""hidden_act":"silu""#,
            r#""hidden_act":"silu","rope_scaling":{"type":"llama3","rope_type":"llama3","factor":8.0,
                "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":64}"#,
        );
        let dir = dir_with(&[("config.json", &config), ("model.safetensors", "")]);
        let m = HfModel::open(dir.path()).unwrap();
        let scaling = m.config.rope_scaling.unwrap();
        assert_eq!(scaling.kind(), Some("llama3"));
        // the longest wavelengths are divided by the factor, the shortest kept
        let mut freqs = [1.0, 1e-4];
        scaling.apply(&mut freqs);
        assert_eq!(freqs, [1.0, 1e-4 / 8.0]);
    }

    #[test]
    fn unsupported_configs_list_every_problem() {
        let config = LLAMA
            .replace(r#""model_type":"llama""#, r#""model_type":"gemma""#)
            .replace(r#""hidden_act":"silu""#, r#""hidden_act":"gelu","use_sliding_window":true,"rope_scaling":{"type":"yarn","factor":4.0},"quantization_config":{"quant_method":"awq"}"#);
        let dir = dir_with(&[("config.json", &config)]);
        let err = HfModel::open(dir.path()).unwrap_err().to_string();
        for part in [
            "architecture `gemma`",
            "hidden_act `gelu`",
            "sliding-window",
            "rope_scaling `yarn`",
            "(`awq`) is not supported",
            "no .safetensors weights",
        ] {
            assert!(err.contains(part), "{part} missing from: {err}");
        }
        let dir = dir_with(&[("config.json", "{\"hidden_size\": 64")]);
        let err = HfModel::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("config.json"), "{err}");
    }
}
