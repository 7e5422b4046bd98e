//! Weight matrices and their products: GGUF weights kept quantized (as 8-bit blocks on CPU
//! where candle has no fast kernel), safetensors weights dense or as 8-bit blocks, and
//! projections of one input stacked into one matrix ([`Stacked`]).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};

use crate::q8::{self, Q8Matrix};

/// Products over at least this many rows dequantize the weights and use f32 GEMM.
pub(super) const DEQUANTIZE_ROWS: usize = 16;

/// Weight types multiplied as [`Q8Matrix`] blocks on CPU: Q8_0 itself, and the types
/// without a vectorised CPU dot product in candle (SmolLM2's GGUF is Q4_1). The k-quants
/// keep candle's kernels and their smaller size.
const CPU_Q8_TYPES: [GgmlDType; 5] = [
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
];

/// How a weight matrix is multiplied.
pub(super) enum Weights {
    /// candle's product: dense matrices, every matrix on GPUs, and the quantized types
    /// candle multiplies well on CPU (the k-quants). `quantized` keeps quantized weights
    /// for dequantizing before many-row products on CPU.
    Candle {
        direct: QMatMul,
        quantized: Option<Arc<QTensor>>,
    },
    /// CPU 8-bit blocks, every decode row in one pass ([`Q8Matrix`]).
    Q8(Q8Matrix),
}

/// A weight matrix, kept quantized (GGUF, or safetensors asked to be) or dense, with an
/// optional bias.
pub(super) struct Linear {
    pub(super) weights: Weights,
    pub(super) bias: Option<Tensor>,
}

/// Whether CPU decode products use [`Q8Matrix`]; `SWITCHYARD_Q8=0` keeps candle's
/// product instead (for side-by-side timing).
fn q8_enabled() -> bool {
    std::env::var("SWITCHYARD_Q8").map_or(true, |v| v != "0")
}

/// candle's product over `weight` as stored.
fn candle_weights(weight: QTensor) -> Result<Weights> {
    let dense = matches!(
        weight.dtype(),
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
    );
    let weight = Arc::new(weight);
    Ok(Weights::Candle {
        direct: QMatMul::from_arc(Arc::clone(&weight))?,
        quantized: (!dense).then_some(weight),
    })
}

impl Linear {
    /// On CPU, weights of the [`CPU_Q8_TYPES`] become [`Q8Matrix`] blocks (every 4- and
    /// 5-bit level is kept to within half an 8-bit step). `cargo bench -p benches --bench
    /// decode` compares the products.
    pub(super) fn new(weight: QTensor, device: &Device) -> Result<Self> {
        Self::quantized(weight, None, device)
    }

    /// The output matrix when it is the embedding matrix: `weight` as stored, and
    /// `dequantized`, the f32 copy the embedding lookup keeps.
    pub(super) fn tied(weight: QTensor, dequantized: &Tensor, device: &Device) -> Result<Self> {
        Self::quantized(weight, Some(dequantized), device)
    }

    /// `weight` as stored; `f32_copy`, when the caller already has one, saves dequantizing
    /// it again.
    fn quantized(weight: QTensor, f32_copy: Option<&Tensor>, device: &Device) -> Result<Self> {
        let cols = weight.shape().dims().last().copied().unwrap_or(0);
        let blocks = device.is_cpu() && cols.is_multiple_of(q8::BLOCK);
        let as_f32 = || match f32_copy {
            Some(t) => Ok(t.clone()),
            None => weight.dequantize(device),
        };
        let weights = if blocks && q8_enabled() && CPU_Q8_TYPES.contains(&weight.dtype()) {
            Weights::Q8(Q8Matrix::from_tensor(&as_f32()?)?)
        } else if blocks
            && [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1].contains(&weight.dtype())
        {
            // candle has no SIMD dot product for these; its Q8_0 product is faster
            candle_weights(QTensor::quantize(&as_f32()?, GgmlDType::Q8_0)?)?
        } else {
            candle_weights(weight)?
        };
        Ok(Self {
            weights,
            bias: None,
        })
    }

    /// A dense f32 matrix (out, in).
    pub(super) fn dense(weight: Tensor) -> Self {
        Self {
            weights: Weights::Candle {
                direct: QMatMul::Tensor(weight),
                quantized: None,
            },
            bias: None,
        }
    }

    /// Output width.
    pub(super) fn rows(&self) -> usize {
        match &self.weights {
            Weights::Q8(m) => m.rows(),
            Weights::Candle { direct, .. } => match direct {
                QMatMul::QTensor(t) => t.shape().dims().first().copied().unwrap_or(0),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => {
                    t.dims().first().copied().unwrap_or(0)
                }
            },
        }
    }

    /// The matrix, when it is held dense.
    fn dense_matrix(&self) -> Option<&Tensor> {
        match &self.weights {
            Weights::Candle {
                direct: QMatMul::Tensor(t),
                quantized: None,
            } => Some(t),
            _ => None,
        }
    }

    fn device(&self) -> Device {
        match &self.weights {
            Weights::Q8(_) => Device::Cpu,
            Weights::Candle { direct, .. } => match direct {
                QMatMul::QTensor(t) => t.device(),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.device().clone(),
            },
        }
    }

    pub(super) fn with_bias(mut self, bias: Option<Tensor>) -> Self {
        self.bias = bias;
        self
    }

    /// `x`: (rows, in) → (rows, out). Many rows (prefill) on CPU: quantized weights are
    /// dequantized for this product and the blocked f32 GEMM does it.
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let many = x.dim(0)? >= DEQUANTIZE_ROWS;
        let y = match &self.weights {
            Weights::Q8(w) if many => x.matmul(&w.dequantize(x.device())?.t()?)?,
            Weights::Q8(w) => w.matmul(&x.contiguous()?)?,
            Weights::Candle {
                quantized: Some(w), ..
            } if many && x.device().is_cpu() => x.matmul(&w.dequantize(x.device())?.t()?)?,
            Weights::Candle { direct, .. } => direct.forward(x)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Projections of one input (query/key/value; gate/up), stacked into one matrix when their
/// weights allow it (8-bit blocks, or dense): one product instead of three or two — one
/// parallel region per decode step instead of several, and the prefill's activations
/// packed once for the GEMM.
pub(super) enum Stacked {
    /// One matrix; the output's columns split into the parts' widths.
    One { w: Linear, widths: Vec<usize> },
    /// Weights that do not stack (candle's quantized types): one product each.
    Each(Vec<Linear>),
}

impl Stacked {
    pub(super) fn new(parts: Vec<Linear>) -> Result<Self> {
        let q8 = parts.iter().all(|p| matches!(p.weights, Weights::Q8(_)));
        let dense = parts.iter().all(|p| p.dense_matrix().is_some());
        if !q8 && !dense {
            return Ok(Self::Each(parts));
        }
        let widths: Vec<usize> = parts.iter().map(Linear::rows).collect();
        let bias = match parts.iter().any(|p| p.bias.is_some()) {
            false => None,
            true => {
                let biases = parts
                    .iter()
                    .zip(&widths)
                    .map(|(p, &n)| match &p.bias {
                        Some(b) => Ok(b.clone()),
                        None => Tensor::zeros(n, DType::F32, &p.device()),
                    })
                    .collect::<Result<Vec<_>>>()?;
                Some(Tensor::cat(&biases, 0)?)
            }
        };
        let weights = if q8 {
            let blocks = parts
                .into_iter()
                .filter_map(|p| match p.weights {
                    Weights::Q8(m) => Some(m),
                    Weights::Candle { .. } => None,
                })
                .collect();
            Weights::Q8(Q8Matrix::stack(blocks)?)
        } else {
            let ws: Vec<&Tensor> = parts.iter().filter_map(Linear::dense_matrix).collect();
            Linear::dense(Tensor::cat(&ws, 0)?).weights
        };
        Ok(Self::One {
            w: Linear { weights, bias },
            widths,
        })
    }

    /// `x` (rows, in) → one (rows, width) output per part.
    pub(super) fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Self::Each(parts) => parts.iter().map(|p| p.forward(x)).collect(),
            Self::One { w, widths } => {
                let y = w.forward(x)?;
                let mut at = 0;
                widths
                    .iter()
                    .map(|&n| {
                        at += n;
                        y.narrow(1, at - n, n)
                    })
                    .collect()
            }
        }
    }
}
