//! # hymba-engine
//!
//! Inference for NVIDIA's Hymba hybrid-head language models on wgpu: every
//! numeric step runs in WGSL compute shaders (`shaders/`), natively (Vulkan,
//! Metal, DX12) and in the browser (WebGPU, through WebAssembly).
//!
//! Layers of the crate, bottom up:
//! - [`gpu`]: device, buffers, readback, kernels and recorded programs;
//! - [`kernels`]: one wrapper per WGSL kernel family;
//! - [`config`] and [`loader`]: `config.json` and safetensors checkpoints;
//! - [`model`]: the Hymba forward pass (meta tokens, hybrid layers, KV sharing);
//! - [`cache`]: per-sequence state (KV ring buffers, conv and SSM states);
//! - [`generate`]: prefill / decode / sampling / stopping;
//! - [`chat`]: the Hymba Instruct chat template and stop-string filtering.

pub mod cache;
pub mod chat;
pub mod config;
pub mod error;
pub mod generate;
pub mod gpu;
pub mod kernels;
pub mod loader;
pub mod model;
pub mod sampling;
pub mod tokenizer;

pub use config::HymbaConfig;
pub use error::{Error, Result};
