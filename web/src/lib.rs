//! # hymba-web
//!
//! The browser face of hymba-engine: a wasm-bindgen API (`Engine`, `HymbaModel`)
//! that the hand-written JS wrapper in `web/js/` builds on. Everything that
//! touches the GPU is async and awaits WebGPU's own promises, so the JS event
//! loop is never blocked; generation yields to it after every token.
//!
//! Options and results cross the boundary as JSON strings (parsed and
//! serialised by the JS wrapper), which keeps this layer free of per-field glue.

pub mod chat;

#[cfg(target_arch = "wasm32")]
mod wasm;

#[cfg(target_arch = "wasm32")]
pub use wasm::*;

use serde::Deserialize;

/// Generation options as the JS wrapper sends them (OpenAI-style names).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct GenOptions {
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Completion only: append to the current sequence instead of starting a new one.
    #[serde(rename = "continue")]
    pub continue_: bool,
    /// Completion only: let the tokenizer add BOS (default true on a fresh sequence).
    pub add_special_tokens: Option<bool>,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions {
            max_tokens: 128,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: None,
            stop: Vec::new(),
            ignore_eos: false,
            continue_: false,
            add_special_tokens: None,
        }
    }
}

/// Load options.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct LoadOptions {
    /// "auto" (f32 up to 1 GiB of weights, f16 above), "f32" or "f16".
    pub dtype: Option<String>,
    /// Longest sequence in positions, meta tokens included.
    pub max_positions: Option<usize>,
    /// Positions per prefill chunk (default: 512 where the prompt GEMMs run on tensor cores,
    /// else 256).
    pub chunk: Option<usize>,
    /// A name to report in `info()`.
    pub name: Option<String>,
}

/// WebGPU limits every conforming adapter offers and the kernels rely on
/// (name as in the WebGPU spec, value).
pub const REQUIRED_LIMITS: [(&str, u64); 5] = [
    ("maxComputeInvocationsPerWorkgroup", 256),
    ("maxComputeWorkgroupSizeX", 256),
    ("maxComputeWorkgroupStorageSize", 16384),
    ("maxStorageBuffersPerShaderStage", 8),
    ("maxComputeWorkgroupsPerDimension", 65535),
];
