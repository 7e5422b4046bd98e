//! Loading a model: its files (GGUF, or a Hugging Face directory of safetensors) into a
//! tokenizer, a chat template, end-of-sequence tokens and limits ([`LoadedModel`]), and
//! the weights for the scheduler ([`Llama`]). Also the device and quantization options.

use std::path::Path;

use candle_core::Device;
use candle_core::quantized::gguf_file;
use model_meta::{ChatTemplate, GgufInfo, HfModel, Tokenizer};

use crate::error::WorkerError;
use crate::llama::Llama;

/// A loaded model: tokenizer, template and limits. The weights live in the actor thread.
pub struct LoadedModel {
    pub name: String,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub eos: Vec<u32>,
    pub max_context: usize,
    /// Input modalities accepted: "text", and for the simulated backend "image", "audio".
    pub modalities: Vec<String>,
    /// Tokens come from the simulated-hardware backend, not the model.
    pub simulated: bool,
}

/// Parses a device name: `cpu`, `cuda` or `cuda:N` (CUDA needs the `cuda` cargo feature).
pub fn parse_device(spec: &str) -> Result<Device, WorkerError> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let n = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map_err(|_| WorkerError::Model(format!("bad cuda ordinal in `{s}`")))?,
                None => 0,
            };
            Device::new_cuda(n).map_err(|e| {
                WorkerError::Model(format!(
                    "CUDA device {n}: {e} (the worker must be built with --features cuda)"
                ))
            })
        }
        other => Err(WorkerError::Model(format!(
            "unknown device `{other}` (cpu, cuda, cuda:N)"
        ))),
    }
}

/// What a model's files give the engine, whichever format they are in.
pub(super) struct ModelParts {
    tokenizer: Tokenizer,
    chat_template: Option<String>,
    bos_token: String,
    eos_token: String,
    /// Token ids that end generation, from the model's metadata.
    eos: Vec<u32>,
    context_length: usize,
    /// `None` when no weights were asked for (the simulated backend).
    weights: Option<Llama>,
}

/// Reads a GGUF file or a Hugging Face model directory (`config.json` + safetensors; a
/// `.safetensors` path names its directory). `tokenizer_json` overrides the model's own
/// tokenizer. Weights are loaded onto `device` when one is given; `quantize` applies to a
/// Hugging Face checkpoint (a GGUF file's weights are already quantized as stored).
pub(super) fn read_model(
    path: &Path,
    tokenizer_json: Option<&Path>,
    device: Option<&Device>,
    quantize: Quantize,
) -> Result<ModelParts, WorkerError> {
    let load_err = |e: candle_core::Error| WorkerError::Model(format!("{}: {e}", path.display()));
    let meta_err = |e: model_meta::MetaError| WorkerError::Model(e.to_string());
    let json = |p: &Path| {
        model_meta::load_tokenizer(&model_meta::TokenizerSource::Json(p.to_path_buf()))
            .map_err(meta_err)
    };
    if model_meta::is_hf_model(path) {
        let hf = HfModel::open(path).map_err(meta_err)?;
        let tokenizer = json(tokenizer_json.unwrap_or(&hf.tokenizer_path()))?;
        let weights = device
            .map(|d| Llama::from_safetensors(&hf, d, quantize == Quantize::Q8_0).map_err(load_err))
            .transpose()?;
        return Ok(ModelParts {
            tokenizer,
            bos_token: hf.bos_token.clone().unwrap_or_default(),
            eos_token: hf.eos_token.clone().unwrap_or_default(),
            eos: hf.eos_token_ids.clone(),
            context_length: hf.config.max_position_embeddings,
            chat_template: hf.chat_template,
            weights,
        });
    }
    if quantize != Quantize::None {
        return Err(WorkerError::Model(format!(
            "{}: --quantize is for Hugging Face checkpoints; a GGUF file's weights are used as stored",
            path.display()
        )));
    }
    let mut file = std::fs::File::open(path)
        .map_err(|e| WorkerError::Model(format!("{}: {e}", path.display())))?;
    let content = gguf_file::Content::read(&mut file).map_err(load_err)?;
    let info = GgufInfo::from_content(&content).map_err(meta_err)?;
    let tokenizer = match tokenizer_json {
        Some(p) => json(p)?,
        None => model_meta::tokenizer_from_gguf(&content).map_err(meta_err)?,
    };
    let token_text = |id: Option<u32>| {
        id.and_then(|i| tokenizer.id_to_token(i))
            .unwrap_or_default()
    };
    let (bos_token, eos_token) = (token_text(info.bos_token_id), token_text(info.eos_token_id));
    let weights = device
        .map(|d| Llama::from_gguf(&content, &mut file, d).map_err(load_err))
        .transpose()?;
    Ok(ModelParts {
        tokenizer,
        chat_template: info.chat_template,
        bos_token,
        eos_token,
        eos: info.eos_token_id.into_iter().collect(),
        context_length: info.context_length,
        weights,
    })
}

/// How a Hugging Face checkpoint's weights are held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Quantize {
    /// As f32 (GGUF weights always stay as stored).
    #[default]
    None,
    /// CPU only: the projection and output matrices as 8-bit blocks (GGUF's Q8_0 with f32
    /// scales): a quarter of their f32 memory, and the batched 8-bit decode product.
    Q8_0,
}

impl std::str::FromStr for Quantize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "q8_0" => Ok(Self::Q8_0),
            other => Err(format!("unknown quantization `{other}` (none, q8_0)")),
        }
    }
}

/// Reads the model at `path` and builds what requests need from it; the weights (loaded
/// onto `device`, none without one: the simulated backend) go to the scheduler.
pub(super) fn open_model(
    path: &Path,
    tokenizer_json: Option<&Path>,
    name: String,
    device: Option<&Device>,
    quantize: Quantize,
) -> Result<(LoadedModel, Option<Llama>), WorkerError> {
    let simulated = device.is_none();
    let parts = read_model(path, tokenizer_json, device, quantize)?;
    let tokenizer = parts.tokenizer;
    let template = ChatTemplate::new(
        parts.chat_template.as_deref(),
        parts.bos_token,
        parts.eos_token.clone(),
    )
    .map_err(|e| WorkerError::Model(e.to_string()))?;
    let mut eos = parts.eos;
    for t in [
        parts.eos_token.as_str(),
        "<|im_end|>",
        "<|endoftext|>",
        "<|eot_id|>",
        "</s>",
    ] {
        if let Some(id) = tokenizer.token_to_id(t)
            && !eos.contains(&id)
        {
            eos.push(id);
        }
    }
    let weights = parts.weights;
    let info_context = parts.context_length;
    let model = LoadedModel {
        name,
        tokenizer,
        template,
        eos,
        max_context: weights
            .as_ref()
            .map_or(info_context, |w| w.cfg.context_length),
        modalities: if simulated {
            vec!["text".into(), "image".into(), "audio".into()]
        } else {
            vec!["text".into()]
        },
        simulated,
    };
    Ok((model, weights))
}
