//! One error type for the whole engine. Every variant names the file, tensor,
//! shape or limit involved and, where there is one, what the user can do.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("model directory {dir} has no {what}; a Hymba checkpoint needs config.json and model.safetensors (or model.safetensors.index.json with its shards)")]
    MissingFile { dir: String, what: String },
    #[error("{path}: invalid config.json: {msg}")]
    Config { path: String, msg: String },
    #[error("unsupported model configuration: {0}")]
    Unsupported(String),
    #[error("{file}: not a valid safetensors file ({msg}); the file may be truncated or corrupt, download it again")]
    Safetensors { file: String, msg: String },
    #[error("tensor {name} is missing from the checkpoint (looked in {files})")]
    MissingTensor { name: String, files: String },
    #[error("tensor {name} has shape {found:?}, expected {expected:?} from config.json")]
    Shape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor {name} has dtype {found}; supported weight dtypes are bf16, f16 and f32")]
    Dtype { name: String, found: String },
    /// A pre-quantized checkpoint (`hymba quantize`) whose metadata and tensors disagree.
    #[error("{file}: pre-quantized checkpoint, {what}: {msg}")]
    Quantized {
        file: String,
        /// "tensor NAME" or "metadata KEY".
        what: String,
        msg: String,
    },
    #[error("this checkpoint's weights are pre-quantized to {stored} (written by hymba quantize); it loads only as {stored} (--dtype {stored} or auto), not as {requested}. To run {requested}, load the original full-precision checkpoint")]
    DtypeConflict { stored: String, requested: String },
    #[error("no GPU adapter found ({0}). Install a Vulkan driver; for a software one on Debian/Ubuntu: apt-get install mesa-vulkan-drivers")]
    NoAdapter(String),
    #[error("GPU device request failed: {0}")]
    Device(String),
    #[error("GPU limit exceeded: {what} needs {needed} bytes but the adapter allows {limit} ({limit_name}); use a smaller dtype (--dtype f16) or another adapter")]
    GpuLimit {
        what: String,
        needed: u64,
        limit: u64,
        limit_name: &'static str,
    },
    #[error("GPU error: {0}")]
    Gpu(String),
    #[error("the sequence would be {needed} positions long (including {meta} meta tokens), more than this model allows ({limit}); shorten the prompt or lower the token limit")]
    ContextTooLong {
        needed: usize,
        meta: usize,
        limit: usize,
    },
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    BadToken { id: u32, vocab: usize },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Invalid(String),
    #[error("cancelled")]
    Cancelled,
}

pub type Result<T> = std::result::Result<T, Error>;
