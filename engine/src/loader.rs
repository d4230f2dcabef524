//! Reading a Hugging Face Hymba checkpoint: `config.json`, one
//! `model.safetensors` or sharded files with `model.safetensors.index.json`.
//!
//! Every tensor's presence, dtype and shape is checked against the config
//! before anything touches the GPU. Natively the files are memory-mapped; on
//! wasm (no filesystem) they come in as byte buffers.
//!
//! A checkpoint written by `hymba quantize` ([`Checkpoint::save_quantized`]) holds the large
//! matrices already in the engine's q8 / q4 block layout (U8 tensors), described by the JSON in
//! the safetensors metadata key [`QUANT_METADATA_KEY`]; see docs/quantization.md.

use crate::config::HymbaConfig;
use crate::error::{Error, Result};
use crate::kernels::{Matrix, WeightDtype, QBLOCK};
use half::{bf16, f16};
use std::collections::{BTreeMap, HashMap};

/// Element type of a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    BF16,
    F16,
    F32,
    /// Pre-quantized 8-bit blocks (the engine's q8 layout), from `hymba quantize`.
    Q8,
    /// Pre-quantized 4-bit blocks (the engine's q4 layout), from `hymba quantize`.
    Q4,
}

/// The safetensors `__metadata__` key whose value (JSON, [`QuantMetadata`]) describes the
/// pre-quantized tensors of a file written by [`Checkpoint::save_quantized`].
pub const QUANT_METADATA_KEY: &str = "hymba.quantization";
/// `format` of [`QuantMetadata`].
pub const QUANT_FORMAT: &str = "hymba-block-quant";
/// The [`QuantMetadata`] version this engine writes and reads.
pub const QUANT_FORMAT_VERSION: u32 = 1;

/// The JSON under [`QUANT_METADATA_KEY`]: how to read the U8 tensors of a pre-quantized file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QuantMetadata {
    /// Always [`QUANT_FORMAT`].
    pub format: String,
    /// [`QUANT_FORMAT_VERSION`].
    pub version: u32,
    /// "q8" or "q4": the dtype of every quantized tensor of the checkpoint.
    pub dtype: String,
    /// Weights per block along a row (32).
    pub block_size: usize,
    /// Type of the per-block scales ("f16").
    pub scale_dtype: String,
    /// One line on the layout, for people reading the header.
    #[serde(default)]
    pub layout: String,
    /// How the scales were chosen (informational).
    #[serde(default)]
    pub quantizer: String,
    /// Per quantized tensor (by name): its dtype and logical shape.
    pub tensors: BTreeMap<String, QuantTensorInfo>,
}

/// One quantized tensor of [`QuantMetadata`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QuantTensorInfo {
    /// "q8" or "q4".
    pub dtype: String,
    /// Logical shape [rows, cols] of the full-precision matrix.
    pub shape: Vec<usize>,
    /// Row length padded to whole blocks (`ceil(cols / 32) * 32`).
    pub padded_cols: usize,
    /// Bytes of the quants (the first part of the tensor); the f16 scales follow.
    pub quant_bytes: usize,
    /// Bytes of the whole tensor (quants, then scales padded to 4 bytes).
    pub bytes: usize,
}

/// Whether the engine stores `name` in the weight dtype (f32 / f16 / q8 / q4): the embedding
/// (and untied LM head), in_proj, out_proj and the MLP matrices. Everything else stays f32.
pub fn is_weight_matrix(name: &str) -> bool {
    name == "model.embed_tokens.weight"
        || name == "lm_head.weight"
        || (name.starts_with("model.layers.")
            && [
                ".mamba.in_proj.weight",
                ".mamba.out_proj.weight",
                ".moe.experts.0.gate_proj.weight",
                ".moe.experts.0.up_proj.weight",
                ".moe.experts.0.down_proj.weight",
            ]
            .iter()
            .any(|s| name.ends_with(s)))
}

enum Storage {
    #[cfg(not(target_arch = "wasm32"))]
    Mmap(memmap2::Mmap),
    Bytes(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            #[cfg(not(target_arch = "wasm32"))]
            Storage::Mmap(m) => m,
            Storage::Bytes(b) => b,
        }
    }
}

#[derive(Debug, Clone)]
struct TensorEntry {
    file: usize,
    dtype: StoredDtype,
    /// The logical shape (for quantized tensors: of the full-precision matrix).
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A checkpoint whose tensors have been located and validated.
pub struct Checkpoint {
    pub config: HymbaConfig,
    files: Vec<(String, Storage)>,
    tensors: HashMap<String, TensorEntry>,
    /// q8 / q4 when the large matrices are stored pre-quantized.
    quantized: Option<WeightDtype>,
}

/// The tensor names and shapes a config requires (spec §2).
pub fn expected_tensors(c: &HymbaConfig) -> Vec<(String, Vec<usize>)> {
    let d = c.hidden;
    let di = c.d_inner;
    let mut v = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![c.vocab_size, d],
    )];
    if c.n_meta > 0 {
        v.push(("model.memory_tokens".into(), vec![c.n_meta, d]));
    }
    v.push(("model.final_layernorm.weight".into(), vec![d]));
    for i in 0..c.n_layers {
        let p = format!("model.layers.{i}.");
        let mut add = |s: &str, shape: Vec<usize>| v.push((format!("{p}{s}"), shape));
        add("input_layernorm.weight", vec![d]);
        add("mamba.in_proj.weight", vec![c.in_proj_rows(i), d]);
        add("mamba.conv1d.weight", vec![di, 1, c.d_conv]);
        if c.conv_bias {
            add("mamba.conv1d.bias", vec![di]);
        }
        add("mamba.x_proj.0.weight", vec![c.x_proj_rows(), di]);
        add("mamba.dt_proj.0.weight", vec![di, c.dt_rank]);
        add("mamba.dt_proj.0.bias", vec![di]);
        add("mamba.A_log.0", vec![di, c.d_state]);
        add("mamba.D.0", vec![di]);
        if c.inner_norms {
            add("mamba.dt_layernorm.weight", vec![c.dt_rank]);
            add("mamba.B_layernorm.weight", vec![c.d_state]);
            add("mamba.C_layernorm.weight", vec![c.d_state]);
        }
        add("mamba.pre_avg_layernorm1.weight", vec![di]);
        add("mamba.pre_avg_layernorm2.weight", vec![di]);
        add("mamba.out_proj.weight", vec![d, di]);
        add("pre_moe_layernorm.weight", vec![d]);
        add("moe.experts.0.gate_proj.weight", vec![c.intermediate, d]);
        add("moe.experts.0.up_proj.weight", vec![c.intermediate, d]);
        add("moe.experts.0.down_proj.weight", vec![d, c.intermediate]);
    }
    if !c.raw.tie_word_embeddings {
        v.push(("lm_head.weight".into(), vec![c.vocab_size, d]));
    }
    v
}

impl Checkpoint {
    /// Open a model directory (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open_dir(dir: &std::path::Path) -> Result<Checkpoint> {
        let dir_s = dir.display().to_string();
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                dir: dir_s,
                what: "such directory".into(),
            });
        }
        let cfg_path = dir.join("config.json");
        if !cfg_path.is_file() {
            return Err(Error::MissingFile {
                dir: dir_s,
                what: "config.json".into(),
            });
        }
        let cfg_text = read_to_string(&cfg_path)?;
        let config = HymbaConfig::from_json_str(&cfg_text, &cfg_path.display().to_string())?;
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let mut names: Vec<String> = Vec::new();
        if single.is_file() {
            names.push("model.safetensors".into());
        } else if index.is_file() {
            let text = read_to_string(&index)?;
            names = shard_names(&text, &index.display().to_string())?;
        } else {
            return Err(Error::MissingFile {
                dir: dir_s,
                what: "model.safetensors (nor model.safetensors.index.json)".into(),
            });
        }
        let mut files = Vec::new();
        for n in names {
            let p = dir.join(&n);
            let f = std::fs::File::open(&p).map_err(|e| Error::Io {
                path: p.display().to_string(),
                source: e,
            })?;
            // SAFETY: the file is opened read-only and we only read from the map;
            // a concurrent truncation by another process is outside our control.
            let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::Io {
                path: p.display().to_string(),
                source: e,
            })?;
            files.push((p.display().to_string(), Storage::Mmap(map)));
        }
        Self::from_storage(config, files)
    }

    /// Build from in-memory files: `config.json` text and (name, bytes) safetensors files.
    pub fn from_bytes(config_json: &str, files: Vec<(String, Vec<u8>)>) -> Result<Checkpoint> {
        let config = HymbaConfig::from_json_str(config_json, "config.json")?;
        let files = files
            .into_iter()
            .map(|(n, b)| (n, Storage::Bytes(b)))
            .collect();
        Self::from_storage(config, files)
    }

    fn from_storage(config: HymbaConfig, files: Vec<(String, Storage)>) -> Result<Checkpoint> {
        let mut tensors = HashMap::new();
        let mut quantized: Option<(WeightDtype, String)> = None;
        for (fi, (name, st)) in files.iter().enumerate() {
            let bytes = st.bytes();
            let parsed =
                safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors {
                    file: name.clone(),
                    msg: e.to_string(),
                })?;
            let (_, header) =
                safetensors::SafeTensors::read_metadata(bytes).map_err(|e| Error::Safetensors {
                    file: name.clone(),
                    msg: e.to_string(),
                })?;
            let qmeta = match header
                .metadata()
                .as_ref()
                .and_then(|m| m.get(QUANT_METADATA_KEY))
            {
                Some(json) => Some(parse_quant_metadata(json, name)?),
                None => None,
            };
            if let Some((qd, _)) = &qmeta {
                match &quantized {
                    Some((d, other)) if d != qd => {
                        return Err(Error::Quantized {
                            file: name.clone(),
                            what: format!("metadata {QUANT_METADATA_KEY}"),
                            msg: format!(
                                "the file is quantized to {} but {other} to {}; all files of a checkpoint must use one dtype",
                                qd.name(),
                                d.name()
                            ),
                        })
                    }
                    _ => quantized = Some((*qd, name.clone())),
                }
            }
            let base = bytes.as_ptr() as usize;
            let mut seen_quant = 0usize;
            for (tname, view) in parsed.tensors() {
                let data = view.data();
                let start = data.as_ptr() as usize - base;
                let qinfo = qmeta.as_ref().and_then(|(_, m)| m.tensors.get(&tname));
                let (dtype, shape) = if let Some(qi) = qinfo {
                    seen_quant += 1;
                    let qd = qmeta.as_ref().unwrap().0;
                    check_quant_tensor(&tname, name, qd, qi, view.dtype(), view.shape())?;
                    let dt = if qd == WeightDtype::Q8 {
                        StoredDtype::Q8
                    } else {
                        StoredDtype::Q4
                    };
                    (dt, qi.shape.clone())
                } else {
                    let dtype = match view.dtype() {
                        safetensors::Dtype::BF16 => StoredDtype::BF16,
                        safetensors::Dtype::F16 => StoredDtype::F16,
                        safetensors::Dtype::F32 => StoredDtype::F32,
                        other => {
                            if expected_name(&config, &tname) {
                                return Err(Error::Dtype {
                                    name: tname,
                                    found: format!("{other:?}"),
                                });
                            }
                            continue;
                        }
                    };
                    (dtype, view.shape().to_vec())
                };
                tensors.insert(
                    tname,
                    TensorEntry {
                        file: fi,
                        dtype,
                        shape,
                        start,
                        end: start + data.len(),
                    },
                );
            }
            if let Some((_, m)) = &qmeta {
                if seen_quant != m.tensors.len() {
                    let missing = m
                        .tensors
                        .keys()
                        .find(|t| parsed.tensor(t).is_err())
                        .cloned()
                        .unwrap_or_default();
                    return Err(Error::Quantized {
                        file: name.clone(),
                        what: format!("tensor {missing}"),
                        msg: format!("listed in the {QUANT_METADATA_KEY} metadata but not stored in the file"),
                    });
                }
            }
        }
        let ck = Checkpoint {
            config,
            files,
            tensors,
            quantized: quantized.map(|q| q.0),
        };
        ck.validate()?;
        Ok(ck)
    }

    fn validate(&self) -> Result<()> {
        let files = self
            .files
            .iter()
            .map(|f| f.0.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        for (name, shape) in expected_tensors(&self.config) {
            let t = self
                .tensors
                .get(&name)
                .ok_or_else(|| Error::MissingTensor {
                    name: name.clone(),
                    files: files.clone(),
                })?;
            if t.shape != shape {
                return Err(Error::Shape {
                    name,
                    found: t.shape.clone(),
                    expected: shape,
                });
            }
            // A pre-quantized checkpoint has every large matrix in its dtype and nothing else.
            let tq = match t.dtype {
                StoredDtype::Q8 => Some(WeightDtype::Q8),
                StoredDtype::Q4 => Some(WeightDtype::Q4),
                _ => None,
            };
            let want = self.quantized.filter(|_| is_weight_matrix(&name));
            if tq != want {
                return Err(Error::Quantized {
                    file: self.files[t.file].0.clone(),
                    what: format!("tensor {name}"),
                    msg: match (tq, want) {
                        (Some(d), None) if is_weight_matrix(&name) => format!("stored as {} but the other matrices are not quantized", d.name()),
                        (Some(d), None) => format!("stored as {} but the engine keeps this tensor in f32; only embeddings, in_proj, out_proj and the MLP matrices may be quantized", d.name()),
                        (None, Some(d)) => format!("stored as {:?} while the checkpoint's other large matrices are {}; quantize all of them", t.dtype, d.name()),
                        (Some(a), Some(b)) => format!("stored as {} but the checkpoint is {}", a.name(), b.name()),
                        (None, None) => unreachable!(),
                    },
                });
            }
        }
        Ok(())
    }

    /// q8 / q4 when the checkpoint's large matrices are stored pre-quantized (`hymba quantize`).
    pub fn quantization(&self) -> Option<WeightDtype> {
        self.quantized
    }

    /// The packed words of a pre-quantized tensor (little-endian bytes in the layout of
    /// [`crate::kernels::quantize`]), or None when `name` is stored in full precision.
    pub fn quantized_bytes(&self, name: &str) -> Result<Option<(WeightDtype, &[u8])>> {
        let (t, b) = self.raw(name)?;
        Ok(match t.dtype {
            StoredDtype::Q8 => Some((WeightDtype::Q8, b)),
            StoredDtype::Q4 => Some((WeightDtype::Q4, b)),
            _ => None,
        })
    }

    /// Names of all tensors, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(|s| s.as_str()).collect();
        v.sort();
        v
    }

    /// Bytes of one tensor as stored.
    pub fn stored_bytes_of(&self, name: &str) -> u64 {
        self.tensors
            .get(name)
            .map(|t| (t.end - t.start) as u64)
            .unwrap_or(0)
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn dtype(&self, name: &str) -> Option<StoredDtype> {
        self.tensors.get(name).map(|t| t.dtype)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// Total bytes of the tensors as stored.
    pub fn stored_bytes(&self) -> u64 {
        self.tensors
            .values()
            .map(|t| (t.end - t.start) as u64)
            .sum()
    }

    fn raw(&self, name: &str) -> Result<(&TensorEntry, &[u8])> {
        let t = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            files: self
                .files
                .iter()
                .map(|f| f.0.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
        Ok((t, &self.files[t.file].1.bytes()[t.start..t.end]))
    }

    /// A tensor widened to f32 (exact for bf16/f16).
    pub fn f32(&self, name: &str) -> Result<Vec<f32>> {
        let (t, b) = self.raw(name)?;
        Ok(match t.dtype {
            StoredDtype::Q8 | StoredDtype::Q4 => {
                let dt = if t.dtype == StoredDtype::Q8 {
                    WeightDtype::Q8
                } else {
                    WeightDtype::Q4
                };
                let words: Vec<u32> = b
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                crate::kernels::dequantize(&words, t.shape[0], t.shape[1], dt)
            }
            _ => widen(t.dtype, b),
        })
    }
}

/// Parses and checks the [`QUANT_METADATA_KEY`] JSON of `file`.
fn parse_quant_metadata(json: &str, file: &str) -> Result<(WeightDtype, QuantMetadata)> {
    let bad = |msg: String| Error::Quantized {
        file: file.to_string(),
        what: format!("metadata {QUANT_METADATA_KEY}"),
        msg,
    };
    let m: QuantMetadata = serde_json::from_str(json)
        .map_err(|e| bad(format!("invalid {QUANT_METADATA_KEY} metadata: {e}")))?;
    if m.format != QUANT_FORMAT {
        return Err(bad(format!(
            "unknown quantization format {:?} (this engine reads {QUANT_FORMAT:?})",
            m.format
        )));
    }
    if m.version != QUANT_FORMAT_VERSION {
        return Err(bad(format!(
            "{QUANT_FORMAT} version {} is not supported (this engine reads version {QUANT_FORMAT_VERSION}); use a matching engine or quantize again",
            m.version
        )));
    }
    let dt = WeightDtype::from_name(&m.dtype)
        .filter(|d| d.is_quantized())
        .ok_or_else(|| {
            bad(format!(
                "unknown quantized dtype {:?} (expected q8 or q4)",
                m.dtype
            ))
        })?;
    if m.block_size != QBLOCK || m.scale_dtype != "f16" {
        return Err(bad(format!(
            "blocks of {} weights with {} scales; this engine reads blocks of {QBLOCK} with f16 scales",
            m.block_size, m.scale_dtype
        )));
    }
    Ok((dt, m))
}

/// Checks one pre-quantized tensor against its metadata entry.
fn check_quant_tensor(
    name: &str,
    file: &str,
    dt: WeightDtype,
    qi: &QuantTensorInfo,
    stored: safetensors::Dtype,
    stored_shape: &[usize],
) -> Result<()> {
    let bad = |msg: String| Error::Quantized {
        file: file.to_string(),
        what: format!("tensor {name}"),
        msg,
    };
    if !is_weight_matrix(name) {
        return Err(bad(
            "the engine keeps this tensor in f32; only embeddings, in_proj, out_proj and the MLP matrices may be quantized".into(),
        ));
    }
    if qi.dtype != dt.name() {
        return Err(bad(format!(
            "dtype {:?} differs from the file's {}",
            qi.dtype,
            dt.name()
        )));
    }
    if qi.shape.len() != 2 {
        return Err(bad(format!(
            "logical shape {:?} is not 2-D [rows, cols]",
            qi.shape
        )));
    }
    let (rows, cols) = (qi.shape[0], qi.shape[1]);
    let want = Matrix::bytes_for(rows, cols, dt) as usize;
    let qbytes = Matrix::quant_words(rows, cols, dt) * 4;
    let kp = Matrix::padded_cols_for(cols, dt);
    if stored != safetensors::Dtype::U8 || stored_shape != [want] {
        return Err(bad(format!(
            "stored as {stored:?} {stored_shape:?}; a {} [{rows}, {cols}] matrix is U8 [{want}] (the file may be truncated or edited; quantize again)",
            dt.name()
        )));
    }
    if qi.bytes != want || qi.quant_bytes != qbytes || qi.padded_cols != kp {
        return Err(bad(format!(
            "metadata says {} bytes ({} of quants, padded_cols {}); a {} [{rows}, {cols}] matrix has {want} ({qbytes} of quants, padded_cols {kp})",
            qi.bytes,
            qi.quant_bytes,
            qi.padded_cols,
            dt.name()
        )));
    }
    Ok(())
}

/// The [`QuantTensorInfo`] of a [rows, cols] matrix stored as `dt`.
pub fn quant_tensor_info(rows: usize, cols: usize, dt: WeightDtype) -> QuantTensorInfo {
    QuantTensorInfo {
        dtype: dt.name().to_string(),
        shape: vec![rows, cols],
        padded_cols: Matrix::padded_cols_for(cols, dt),
        quant_bytes: Matrix::quant_words(rows, cols, dt) * 4,
        bytes: Matrix::bytes_for(rows, cols, dt) as usize,
    }
}

/// Stored bytes widened to f32 (exact for bf16/f16).
fn widen(dtype: StoredDtype, b: &[u8]) -> Vec<f32> {
    match dtype {
        StoredDtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        StoredDtype::BF16 => b
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        StoredDtype::F16 => b
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        // Packed q8 / q4 words are not floats: `Checkpoint::f32` dequantizes them, and the
        // streaming parser hands over float tensors only.
        StoredDtype::Q8 | StoredDtype::Q4 => {
            debug_assert!(false, "widen() called on packed quantized bytes");
            Vec::new()
        }
    }
}

pub fn expected_name(c: &HymbaConfig, name: &str) -> bool {
    expected_tensors(c).iter().any(|(n, _)| n == name)
}

#[cfg(not(target_arch = "wasm32"))]
fn read_to_string(p: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(p).map_err(|e| Error::Io {
        path: p.display().to_string(),
        source: e,
    })
}

/// The distinct shard file names listed in a `model.safetensors.index.json`.
pub fn shard_names(index_json: &str, path: &str) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(index_json).map_err(|e| Error::Config {
        path: path.to_string(),
        msg: e.to_string(),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Config {
            path: path.to_string(),
            msg: "no \"weight_map\" object".into(),
        })?;
    let mut names: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Deterministic pseudo-random numbers for synthetic checkpoints.
struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

impl Checkpoint {
    /// A checkpoint with seeded random weights for `config_json` (bf16, Hymba-like scales:
    /// norms 1, A_log = log(1..N), D = 1, small projections), built in memory without a file.
    /// Used for full-size benchmarks and shape checks of configs whose weights are not at hand.
    pub fn random(config_json: &str, seed: u64) -> Result<Checkpoint> {
        let config = HymbaConfig::from_json_str(config_json, "config.json")?;
        let mut rng = SplitMix(seed);
        let mut bytes: Vec<u8> = Vec::new();
        let mut tensors = HashMap::new();
        for (name, shape) in expected_tensors(&config) {
            let n: usize = shape.iter().product();
            let fan_in = *shape.last().unwrap() as f32;
            let start = bytes.len();
            bytes.reserve(n * 2);
            // What kind of tensor this is decides its distribution (checked once, not per element).
            let kind = if name.contains("layernorm") || name.ends_with("norm.weight") {
                0
            } else if name.contains("A_log") {
                1
            } else if name.ends_with("mamba.D.0") {
                2
            } else if name.contains("dt_proj") && name.ends_with("bias") {
                3
            } else if name.contains("memory_tokens") || name.contains("embed_tokens") {
                4
            } else {
                5
            };
            let scale = (3.0 / fan_in).sqrt();
            for i in 0..n {
                let v = match kind {
                    0 => 1.0 + 0.1 * rng.f(),
                    1 => ((i % config.d_state) as f32 + 1.0).ln(),
                    2 => 1.0,
                    3 => -4.6 + 0.5 * rng.f(),
                    4 => 0.5 * rng.f(),
                    _ => rng.f() * scale,
                };
                bytes.extend_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes());
            }
            tensors.insert(
                name,
                TensorEntry {
                    file: 0,
                    dtype: StoredDtype::BF16,
                    shape,
                    start,
                    end: bytes.len(),
                },
            );
        }
        Ok(Checkpoint {
            config,
            files: vec![("<random>".into(), Storage::Bytes(bytes))],
            tensors,
            quantized: None,
        })
    }

    /// Writes the checkpoint as a Hugging Face folder: `model.safetensors` (bf16) and `config.json`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn save_hf(&self, dir: &std::path::Path) -> Result<()> {
        let io = |p: &std::path::Path, e: std::io::Error| Error::Io {
            path: p.display().to_string(),
            source: e,
        };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for n in names {
            let v = self.f32(n)?;
            let b: Vec<u8> = v
                .iter()
                .flat_map(|x| bf16::from_f32(*x).to_bits().to_le_bytes())
                .collect();
            data.push((n.clone(), self.tensors[n].shape.clone(), b));
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = data
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), b)
                        .expect("consistent tensor"),
                )
            })
            .collect();
        let p = dir.join("model.safetensors");
        safetensors::serialize_to_file(views, None, &p).map_err(|e| Error::Safetensors {
            file: p.display().to_string(),
            msg: e.to_string(),
        })?;
        let mut cfg =
            serde_json::to_value(&self.config.raw_json).unwrap_or(serde_json::Value::Null);
        if let Some(o) = cfg.as_object_mut() {
            o.insert("torch_dtype".into(), "bfloat16".into());
        }
        let cp = dir.join("config.json");
        std::fs::write(&cp, serde_json::to_string_pretty(&cfg).unwrap()).map_err(|e| io(&cp, e))
    }

    /// Writes the tensors as one `model.safetensors` at `path` with the large matrices
    /// ([`is_weight_matrix`]) quantized to `dtype` (q8 / q4) in the engine's block layout, as
    /// U8 tensors described by the [`QUANT_METADATA_KEY`] metadata, and every other tensor in its
    /// stored dtype. Tensors are quantized one at a time while the file is written, so memory
    /// holds one tensor's f32 copy at a time, not the model's. Returns the bytes written.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn save_quantized(&self, path: &std::path::Path, dtype: WeightDtype) -> Result<u64> {
        use safetensors::Dtype;
        use std::borrow::Cow;
        let file = path.display().to_string();
        if !dtype.is_quantized() {
            return Err(Error::Invalid(format!(
                "{file}: cannot quantize to {}; choose q8 or q4",
                dtype.name()
            )));
        }
        if let Some(q) = self.quantized {
            if q != dtype {
                return Err(Error::DtypeConflict {
                    stored: q.name().into(),
                    requested: dtype.name().into(),
                });
            }
        }
        /// A tensor of the output file; quantized ones are computed when the writer asks.
        struct Out<'a> {
            ck: &'a Checkpoint,
            name: &'a str,
            dtype: Dtype,
            shape: Vec<usize>,
            len: usize,
            quantize: Option<WeightDtype>,
        }
        impl safetensors::View for Out<'_> {
            fn dtype(&self) -> Dtype {
                self.dtype
            }
            fn shape(&self) -> &[usize] {
                &self.shape
            }
            fn data(&self) -> Cow<'_, [u8]> {
                let (_, raw) = self.ck.raw(self.name).expect("tensor listed above");
                match self.quantize {
                    Some(dt) => {
                        let t = &self.ck.tensors[self.name];
                        let (rows, cols) = (t.shape[0], t.shape[1]);
                        let v = self.ck.f32(self.name).expect("tensor listed above");
                        let words = crate::kernels::quantize(&v, rows, cols, dt);
                        Cow::Owned(bytemuck::cast_slice(&words).to_vec())
                    }
                    None => Cow::Borrowed(raw),
                }
            }
            fn data_len(&self) -> usize {
                self.len
            }
        }
        let mut meta = QuantMetadata {
            format: QUANT_FORMAT.into(),
            version: QUANT_FORMAT_VERSION,
            dtype: dtype.name().into(),
            block_size: QBLOCK,
            scale_dtype: "f16".into(),
            layout: QUANT_LAYOUT.into(),
            quantizer: match dtype {
                WeightDtype::Q8 => "q8: scale = max|w| / 127 per block".into(),
                _ => "q4: per-block search for the f16 scale with the least squared error (max-magnitude weight at -8..-6.5 or 6.5..7.5 steps, least-squares refit)".into(),
            },
            tensors: BTreeMap::new(),
        };
        let mut outs = Vec::new();
        for name in self.tensor_names() {
            let t = &self.tensors[name];
            let (dt, shape, len, quantize) = if is_weight_matrix(name) && t.shape.len() == 2 {
                let (rows, cols) = (t.shape[0], t.shape[1]);
                let info = quant_tensor_info(rows, cols, dtype);
                let len = info.bytes;
                meta.tensors.insert(name.to_string(), info);
                // Already in this dtype (quantizing a pre-quantized checkpoint): copy the words.
                let q = (self.quantized.is_none()).then_some(dtype);
                (Dtype::U8, vec![len], len, q)
            } else {
                let dt = match t.dtype {
                    StoredDtype::BF16 => Dtype::BF16,
                    StoredDtype::F16 => Dtype::F16,
                    StoredDtype::F32 => Dtype::F32,
                    StoredDtype::Q8 | StoredDtype::Q4 => Dtype::U8,
                };
                (dt, t.shape.clone(), t.end - t.start, None)
            };
            outs.push((
                name.to_string(),
                Out {
                    ck: self,
                    name,
                    dtype: dt,
                    shape,
                    len,
                    quantize,
                },
            ));
        }
        let mut md = HashMap::new();
        md.insert("format".to_string(), "pt".to_string());
        md.insert(
            QUANT_METADATA_KEY.to_string(),
            serde_json::to_string(&meta).map_err(|e| Error::Invalid(e.to_string()))?,
        );
        safetensors::serialize_to_file(outs, Some(md), path).map_err(|e| Error::Safetensors {
            file: file.clone(),
            msg: e.to_string(),
        })?;
        std::fs::metadata(path)
            .map(|m| m.len())
            .map_err(|e| Error::Io {
                path: file,
                source: e,
            })
    }
}

/// The `layout` line of [`QuantMetadata`].
pub const QUANT_LAYOUT: &str = "per tensor, little-endian u32 words: rows padded with zeros to padded_cols = ceil(cols/32)*32; quants row-major first (q8: 4 int8 per word, element 4i+j in byte j; q4: 8 nibbles per word, element 8i+j in bits 4j..4j+3 holding q+8), then one f16 scale per 32-weight block (block 2i in the low half of a word), padded to a whole word; weight = q * scale";
/// One tensor of a [`TensorStream`], complete.
pub struct StreamedTensor {
    pub name: String,
    pub dtype: StoredDtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl StreamedTensor {
    /// The storage of packed q8 / q4 words (a pre-quantized file), None for float tensors.
    pub fn quantized(&self) -> Option<WeightDtype> {
        match self.dtype {
            StoredDtype::Q8 => Some(WeightDtype::Q8),
            StoredDtype::Q4 => Some(WeightDtype::Q4),
            _ => None,
        }
    }

    /// The tensor widened to f32 (exact for bf16/f16).
    pub fn to_f32(&self) -> Vec<f32> {
        widen(self.dtype, &self.bytes)
    }
}

/// Parses a safetensors file from its bytes as they arrive (a download or a file read in
/// chunks) and hands over each tensor of `wanted` as soon as its last byte is in, so a
/// caller that uploads and drops it holds about one tensor, not the file. The header is
/// parsed first and checked (dtype of every wanted tensor, offsets within the file) before
/// any tensor is handed over; tensors not wanted are skipped without being kept.
pub struct TensorStream {
    file: String,
    /// Header bytes until the header is parsed, then the bytes of the tensor being filled.
    buf: Vec<u8>,
    header_len: Option<usize>,
    parsed: bool,
    /// (name, dtype, shape, start, end) of wanted tensors, by start offset (from the data start).
    tensors: Vec<(String, StoredDtype, Vec<usize>, usize, usize)>,
    /// Data bytes the header declares.
    data_len: usize,
    /// Data bytes consumed so far.
    pos: usize,
    next: usize,
}

impl TensorStream {
    pub fn new(file: &str) -> TensorStream {
        TensorStream {
            file: file.to_string(),
            buf: Vec::new(),
            header_len: None,
            parsed: false,
            tensors: Vec::new(),
            data_len: 0,
            pos: 0,
            next: 0,
        }
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        Error::Safetensors {
            file: self.file.clone(),
            msg: msg.into(),
        }
    }

    /// The file's name.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// Bytes held: the header until it is parsed, then the part of the tensor being filled.
    pub fn buffered_bytes(&self) -> u64 {
        self.buf.len() as u64
    }

    /// (name, dtype, shape) of the wanted tensors, once the header has been parsed.
    pub fn header(&self) -> Option<Vec<(String, StoredDtype, Vec<usize>)>> {
        self.parsed.then(|| {
            self.tensors
                .iter()
                .map(|t| (t.0.clone(), t.1, t.2.clone()))
                .collect()
        })
    }

    /// Bytes of the wanted tensors as stored (known once the header is parsed).
    pub fn wanted_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| (t.4 - t.3) as u64).sum()
    }

    fn parse_header(&mut self, wanted: &dyn Fn(&str, &[usize]) -> Result<bool>) -> Result<()> {
        let n = self.header_len.unwrap_or(0);
        let text = std::str::from_utf8(&self.buf[8..8 + n])
            .map_err(|e| self.err(format!("header is not UTF-8: {e}")))?;
        let meta: safetensors::tensor::Metadata =
            serde_json::from_str(text).map_err(|e| self.err(format!("invalid header: {e}")))?;
        // A pre-quantized file (`hymba quantize`): its U8 tensors are packed q8 / q4 words of
        // the logical shapes its metadata lists.
        let quant = match meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(QUANT_METADATA_KEY))
        {
            Some(json) => Some(parse_quant_metadata(json, &self.file)?),
            None => None,
        };
        let mut all: Vec<(usize, usize)> = Vec::new();
        let mut tensors = Vec::new();
        for (name, info) in meta.tensors() {
            let (start, end) = info.data_offsets;
            let elems = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let size = elems.and_then(|e| e.checked_mul(info.dtype.bitsize() / 8));
            if end < start || size != Some(end - start) {
                return Err(self.err(format!(
                    "tensor {name}: offsets {start}..{end} do not match shape {:?} of {:?}",
                    info.shape, info.dtype
                )));
            }
            all.push((start, end));
            let packed = match (&quant, info.dtype) {
                (Some((dt, qm)), safetensors::Dtype::U8) => qm.tensors.get(&name).map(|t| (*dt, t)),
                _ => None,
            };
            let shape = match packed {
                Some((_, t)) => t.shape.clone(),
                None => info.shape.clone(),
            };
            if !wanted(&name, &shape)? {
                continue;
            }
            let dtype = match (packed, info.dtype) {
                (Some((dt, t)), _) => {
                    if end - start != t.bytes {
                        return Err(self.err(format!(
                            "tensor {name}: {} bytes, but its {} layout for shape {:?} needs {}",
                            end - start,
                            dt.name(),
                            t.shape,
                            t.bytes
                        )));
                    }
                    if dt == WeightDtype::Q8 {
                        StoredDtype::Q8
                    } else {
                        StoredDtype::Q4
                    }
                }
                (None, safetensors::Dtype::BF16) => StoredDtype::BF16,
                (None, safetensors::Dtype::F16) => StoredDtype::F16,
                (None, safetensors::Dtype::F32) => StoredDtype::F32,
                (None, other) => {
                    return Err(Error::Dtype {
                        name,
                        found: format!("{other:?}"),
                    })
                }
            };
            tensors.push((name, dtype, shape, start, end));
        }
        all.sort();
        if all.windows(2).any(|w| w[1].0 < w[0].1) {
            return Err(self.err("tensors overlap in the header"));
        }
        tensors.sort_by_key(|t| t.3);
        self.data_len = all.last().map(|t| t.1).unwrap_or(0);
        self.tensors = tensors;
        self.buf = Vec::new();
        self.parsed = true;
        Ok(())
    }

    /// Consumes the next bytes of the file; `each` gets every wanted tensor completed by them.
    /// `wanted(name, shape)` decides, when the header arrives, which tensors to keep (an error
    /// stops the load before any tensor is handed over, e.g. a shape that config.json refutes).
    pub fn push(
        &mut self,
        mut chunk: &[u8],
        wanted: &dyn Fn(&str, &[usize]) -> Result<bool>,
        each: &mut dyn FnMut(StreamedTensor) -> Result<()>,
    ) -> Result<()> {
        // The header: 8 bytes of length, then the JSON.
        while !self.parsed {
            if chunk.is_empty() {
                return Ok(());
            }
            let need = match self.header_len {
                None => 8 - self.buf.len(),
                Some(n) => 8 + n - self.buf.len(),
            };
            let take = need.min(chunk.len());
            self.buf.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if self.header_len.is_none() && self.buf.len() == 8 {
                let n = u64::from_le_bytes(self.buf[..8].try_into().unwrap());
                if n > 100_000_000 {
                    return Err(self.err(format!("header length {n} is implausible")));
                }
                self.header_len = Some(n as usize);
            }
            if let Some(n) = self.header_len {
                if self.buf.len() == 8 + n {
                    self.parse_header(wanted)?;
                    break;
                }
            }
        }
        // Data: fill the next wanted tensor, skip what lies between.
        loop {
            // Empty tensors are complete as soon as their offset is reached.
            if let Some(t) = self.tensors.get(self.next) {
                if t.3 == t.4 && self.pos >= t.3 {
                    let (name, dtype, shape, _, _) = t.clone();
                    self.next += 1;
                    each(StreamedTensor {
                        name,
                        dtype,
                        shape,
                        bytes: Vec::new(),
                    })?;
                    continue;
                }
            }
            if chunk.is_empty() {
                break;
            }
            if self.pos >= self.data_len {
                return Err(self.err(format!(
                    "more bytes than the header declares ({} data bytes)",
                    self.data_len
                )));
            }
            let Some(t) = self.tensors.get(self.next) else {
                // Nothing wanted after this point: skip to the end of the data.
                let skip = (self.data_len - self.pos).min(chunk.len());
                self.pos += skip;
                chunk = &chunk[skip..];
                continue;
            };
            let (start, end) = (t.3, t.4);
            if self.pos < start {
                let skip = (start - self.pos).min(chunk.len());
                self.pos += skip;
                chunk = &chunk[skip..];
                continue;
            }
            if self.buf.capacity() < end - start {
                self.buf.reserve_exact(end - start - self.buf.len());
            }
            let take = (end - self.pos).min(chunk.len());
            self.buf.extend_from_slice(&chunk[..take]);
            self.pos += take;
            chunk = &chunk[take..];
            if self.pos == end {
                let (name, dtype, shape, _, _) = self.tensors[self.next].clone();
                self.next += 1;
                let bytes = std::mem::take(&mut self.buf);
                each(StreamedTensor {
                    name,
                    dtype,
                    shape,
                    bytes,
                })?;
            }
        }
        Ok(())
    }

    /// Checks that the whole file arrived.
    pub fn finish(&self) -> Result<()> {
        if !self.parsed || self.pos < self.data_len {
            return Err(self.err(format!(
                "the file ended after {} of {} data bytes",
                self.pos, self.data_len
            )));
        }
        Ok(())
    }
}
