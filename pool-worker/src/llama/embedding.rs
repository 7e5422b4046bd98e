//! The token embedding table: f32 rows, or on CPU the rows as GGUF stores them (4 to 8 bits
//! a value), dequantized when looked up. SmolLM2-135M's table is 49,152 × 576: 113 MB as
//! f32, 18 MB as its file's Q4_1 — most of what separated the worker's resident memory
//! from llama.cpp's. A lookup dequantizes only the rows of the step's tokens, to the same
//! values the whole table's dequantization gives.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Result, Tensor};

pub(super) enum Embeddings {
    /// (vocab, hidden) f32.
    Dense(Tensor),
    /// Rows of `row_bytes` bytes of `dtype` blocks, one after another.
    Quantized {
        data: Vec<u8>,
        dtype: GgmlDType,
        hidden: usize,
        row_bytes: usize,
        vocab: usize,
    },
}

impl Embeddings {
    /// A GGUF table: kept as stored on CPU when its rows are whole blocks of a quantized
    /// type; dequantized to f32 otherwise (and on GPUs, which look rows up in device memory).
    pub(super) fn from_gguf(table: &QTensor, device: &Device) -> Result<Self> {
        let (vocab, hidden) = table.shape().dims2()?;
        let dtype = table.dtype();
        let quantized = !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        if !device.is_cpu() || !quantized || !hidden.is_multiple_of(dtype.block_size()) {
            return Ok(Self::Dense(table.dequantize(device)?));
        }
        let data = table.data()?.into_owned();
        let row_bytes = hidden / dtype.block_size() * dtype.type_size();
        if data.len() != vocab * row_bytes {
            candle_core::bail!(
                "embedding table of {} bytes for {vocab} rows of {row_bytes}",
                data.len()
            );
        }
        Ok(Self::Quantized {
            data,
            dtype,
            hidden,
            row_bytes,
            vocab,
        })
    }

    /// The rows of `ids`: (ids, hidden) f32.
    pub(super) fn lookup(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Self::Dense(table) => table.index_select(&Tensor::new(ids, device)?, 0),
            Self::Quantized {
                data,
                dtype,
                hidden,
                row_bytes,
                vocab,
            } => {
                let mut rows = Vec::with_capacity(ids.len() * row_bytes);
                for &id in ids {
                    let id = id as usize;
                    if id >= *vocab {
                        candle_core::bail!("token id {id} is outside the vocabulary of {vocab}");
                    }
                    rows.extend_from_slice(&data[id * row_bytes..(id + 1) * row_bytes]);
                }
                let storage = QStorage::from_data(Cow::Owned(rows), &Device::Cpu, *dtype)?;
                QTensor::new(storage, (ids.len(), *hidden))?.dequantize(device)
            }
        }
    }

    /// Bytes the table holds.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Quantized { data, .. } => data.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every quantized type the loader meets: the rows looked up equal the same rows of the
    /// whole table dequantized, bit for bit, at a fraction of its memory.
    #[test]
    fn quantized_rows_equal_the_dequantized_table() {
        let (vocab, hidden) = (40, 256);
        let values: Vec<f32> = (0..vocab * hidden)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3)
            .collect();
        let dense = Tensor::from_vec(values, (vocab, hidden), &Device::Cpu).unwrap();
        let ids = [0u32, 39, 7, 7, 12];
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let table = QTensor::quantize(&dense, dtype).unwrap();
            let e = Embeddings::from_gguf(&table, &Device::Cpu).unwrap();
            assert!(matches!(e, Embeddings::Quantized { .. }), "{dtype:?}");
            assert!(
                e.bytes() * 3 < vocab * hidden * 4,
                "{dtype:?}: {} bytes",
                e.bytes()
            );
            let want = table
                .dequantize(&Device::Cpu)
                .unwrap()
                .index_select(&Tensor::new(&ids[..], &Device::Cpu).unwrap(), 0)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let got = e
                .lookup(&ids, &Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            assert_eq!(got, want, "{dtype:?}");
            let err = e.lookup(&[40], &Device::Cpu).err().map(|e| e.to_string());
            assert!(err.unwrap_or_default().contains("outside the vocabulary"));
        }
        // f32 tables stay as they are
        let f32_table = QTensor::quantize(&dense, GgmlDType::F32).unwrap();
        assert!(matches!(
            Embeddings::from_gguf(&f32_table, &Device::Cpu).unwrap(),
            Embeddings::Dense(_)
        ));
    }
}
