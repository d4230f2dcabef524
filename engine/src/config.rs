//! `config.json` of a Hymba checkpoint, parsed into a typed config, and the
//! dimensions and per-layer roles derived from it (spec §1–§2.3).
//!
//! Nothing about the 1.5B layout is hard-coded: head dims, the `in_proj`
//! split, the sliding-window layers and the KV-reuse groups all come from here.

use crate::error::{Error, Result};
use serde::Deserialize;
use serde_json::Value;

/// The raw fields of `config.json` that the engine reads. Unknown fields are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct RawConfig {
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "neg1")]
    pub attn_hidden_size: i64,
    #[serde(default = "neg1")]
    pub kq_head_dim: i64,
    pub v_head_dim: Option<i64>,
    pub kq_norm: Option<String>,
    #[serde(default = "yes")]
    pub rope: bool,
    #[serde(default = "theta")]
    pub rope_theta: f64,
    pub rope_type: Option<String>,
    #[serde(default = "maxpos")]
    pub max_position_embeddings: usize,
    pub orig_max_position_embeddings: Option<usize>,
    pub sliding_window: Option<usize>,
    pub global_attn_idx: Option<Vec<usize>>,
    #[serde(default)]
    pub num_memory_tokens: usize,
    #[serde(default)]
    pub memory_tokens_interspersed_every: i64,
    pub kv_reuse_group: Option<Vec<Vec<usize>>>,
    #[serde(default = "neg1")]
    pub kv_reuse_every_i_layer: i64,
    #[serde(default)]
    pub kv_weight_reuse: bool,
    pub layer_type: Option<Vec<String>>,
    pub conv_dim: Option<Value>,
    #[serde(default = "two")]
    pub mamba_expand: usize,
    #[serde(default = "sixteen")]
    pub mamba_d_state: usize,
    #[serde(default = "four")]
    pub mamba_d_conv: usize,
    pub mamba_dt_rank: Option<Value>,
    #[serde(default = "yes")]
    pub mamba_conv_bias: bool,
    #[serde(default)]
    pub mamba_proj_bias: bool,
    #[serde(default = "yes")]
    pub mamba_inner_layernorms: bool,
    #[serde(default = "one")]
    pub num_mamba: usize,
    pub hidden_act: Option<String>,
    pub mlp_hidden_act: Option<String>,
    #[serde(default = "eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "one")]
    pub num_experts: usize,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<Value>,
    pub torch_dtype: Option<String>,
}

fn neg1() -> i64 {
    -1
}
fn yes() -> bool {
    true
}
fn theta() -> f64 {
    10000.0
}
fn maxpos() -> usize {
    2048
}
fn two() -> usize {
    2
}
fn four() -> usize {
    4
}
fn sixteen() -> usize {
    16
}
fn one() -> usize {
    1
}
fn eps() -> f64 {
    1e-6
}

/// How a layer attends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKind {
    /// Full causal attention over every position.
    Global,
    /// Sliding window of `window` text positions; meta tokens always visible.
    SlidingWindow { window: usize },
}

/// A layer's part in cross-layer KV sharing (`kv_reuse_group`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvRole {
    /// Computes and keeps its own K/V; nobody reuses them.
    Standalone,
    /// Computes K/V that the listed later layers reuse.
    Producer { consumers: Vec<usize> },
    /// Has no K/V projection; attends with its own queries over `producer`'s K/V.
    Consumer { producer: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRole {
    pub attention: AttentionKind,
    pub kv: KvRole,
}

impl LayerRole {
    /// True when the layer computes K/V (its `in_proj` has k and v rows).
    pub fn owns_kv(&self) -> bool {
        !matches!(self.kv, KvRole::Consumer { .. })
    }
    /// The layer whose KV cache this layer reads.
    pub fn kv_source(&self, me: usize) -> usize {
        match self.kv {
            KvRole::Consumer { producer } => producer,
            _ => me,
        }
    }
}

/// The typed, validated configuration with every derived dimension.
#[derive(Debug, Clone)]
pub struct HymbaConfig {
    pub raw: RawConfig,
    /// The config.json object as read (for saving it back unchanged).
    pub raw_json: Value,
    pub vocab_size: usize,
    /// Residual width d.
    pub hidden: usize,
    pub intermediate: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// q/k head dim.
    pub d_qk: usize,
    /// v head dim (= mamba inner width / heads).
    pub d_v: usize,
    /// SSM inner width D_in (= heads * d_v).
    pub d_inner: usize,
    pub d_state: usize,
    pub d_conv: usize,
    pub dt_rank: usize,
    pub n_meta: usize,
    pub eps: f32,
    pub conv_bias: bool,
    pub inner_norms: bool,
    pub rope: bool,
    /// The RoPE base after static NTK scaling (74534.83 for Hymba-1.5B).
    pub rope_base: f64,
    pub max_position_embeddings: usize,
    pub layers: Vec<LayerRole>,
    pub bos_token_id: u32,
    pub eos_token_ids: Vec<u32>,
}

impl HymbaConfig {
    pub fn from_json_str(text: &str, path: &str) -> Result<Self> {
        let bad = |e: serde_json::Error| Error::Config {
            path: path.to_string(),
            msg: e.to_string(),
        };
        let raw_json: Value = serde_json::from_str(text).map_err(bad)?;
        let raw: RawConfig = serde_json::from_value(raw_json.clone()).map_err(bad)?;
        Self::from_raw(raw, raw_json, path)
    }

    pub fn from_raw(raw: RawConfig, raw_json: Value, path: &str) -> Result<Self> {
        let bad = |msg: String| Error::Config {
            path: path.to_string(),
            msg,
        };
        let unsup = |msg: String| Error::Unsupported(format!("{path}: {msg}"));
        if let Some(t) = &raw.model_type {
            if t != "hymba" {
                return Err(unsup(format!(
                    "model_type is {t:?}; this engine runs Hymba models (model_type \"hymba\")"
                )));
            }
        }
        let d = raw.hidden_size;
        let h = raw.num_attention_heads;
        let hkv = raw.num_key_value_heads.unwrap_or(h);
        if d == 0 || h == 0 || hkv == 0 || raw.num_hidden_layers == 0 || raw.vocab_size == 0 {
            return Err(bad("hidden_size, num_attention_heads, num_key_value_heads, num_hidden_layers and vocab_size must be positive".into()));
        }
        if !h.is_multiple_of(hkv) {
            return Err(bad(format!(
                "num_attention_heads {h} is not a multiple of num_key_value_heads {hkv}"
            )));
        }
        if raw.memory_tokens_interspersed_every > 0 {
            return Err(unsup(format!(
                "memory_tokens_interspersed_every = {} (interspersed meta tokens); only 0 (meta tokens at the start) is supported",
                raw.memory_tokens_interspersed_every
            )));
        }
        if let Some(n) = &raw.kq_norm {
            if n != "none" {
                return Err(unsup(format!(
                    "kq_norm = {n:?}; only \"none\" is supported"
                )));
            }
        }
        if raw.num_experts != 1 {
            return Err(unsup(format!(
                "num_experts = {}; only a single dense MLP (1) is supported",
                raw.num_experts
            )));
        }
        if raw.num_mamba != 1 {
            return Err(unsup(format!(
                "num_mamba = {}; only 1 is supported",
                raw.num_mamba
            )));
        }
        if raw.kv_weight_reuse {
            return Err(unsup("kv_weight_reuse = true is not supported".into()));
        }
        if raw.mamba_proj_bias {
            return Err(unsup(
                "mamba_proj_bias = true (biases on in_proj/out_proj) is not supported".into(),
            ));
        }
        for (name, act) in [
            ("hidden_act", &raw.hidden_act),
            ("mlp_hidden_act", &raw.mlp_hidden_act),
        ] {
            if let Some(a) = act {
                if a != "silu" {
                    return Err(unsup(format!("{name} = {a:?}; only \"silu\" is supported")));
                }
            }
        }
        if !raw.tie_word_embeddings {
            // Untied heads are handled by the loader (lm_head.weight must then exist).
        }
        if let Some(lt) = &raw.layer_type {
            if lt.len() != raw.num_hidden_layers || lt.iter().any(|t| t != "h") {
                return Err(unsup(
                    "layer_type must list one \"h\" (hybrid) entry per layer".into(),
                ));
            }
        }
        let attn_hidden = if raw.attn_hidden_size > 0 {
            raw.attn_hidden_size as usize
        } else {
            d
        };
        if attn_hidden % h != 0 {
            return Err(bad(format!(
                "attn_hidden_size {attn_hidden} is not a multiple of num_attention_heads {h}"
            )));
        }
        let d_qk = if raw.kq_head_dim > 0 {
            raw.kq_head_dim as usize
        } else {
            attn_hidden / h
        };
        let d_inner = raw.mamba_expand * d;
        if !d_inner.is_multiple_of(h) {
            return Err(bad(format!(
                "mamba_expand*hidden_size = {d_inner} is not a multiple of num_attention_heads {h}"
            )));
        }
        let d_v = d_inner / h;
        if d_qk % 2 != 0 {
            return Err(bad(format!(
                "q/k head dim {d_qk} must be even for rotary embeddings"
            )));
        }
        if !d_qk.is_multiple_of(4) || !d_v.is_multiple_of(4) {
            return Err(unsup(format!(
                "head dims q/k {d_qk}, v {d_v}: the attention kernels load heads four elements at a time (and the f16 KV cache packs them in pairs), so both must be multiples of 4"
            )));
        }
        if d_qk > 256 || d_v > 128 {
            return Err(unsup(format!(
                "head dims q/k {d_qk}, v {d_v}: the attention kernels support q/k up to 256 and v up to 128"
            )));
        }
        if raw.mamba_d_state == 0 || raw.mamba_d_state > 64 {
            return Err(unsup(format!(
                "mamba_d_state = {}; the selective-scan kernel supports 1..=64",
                raw.mamba_d_state
            )));
        }
        if raw.mamba_d_conv == 0 || raw.mamba_d_conv > 8 {
            return Err(unsup(format!(
                "mamba_d_conv = {}; the conv kernel supports 1..=8",
                raw.mamba_d_conv
            )));
        }
        let dt_rank = match &raw.mamba_dt_rank {
            None => d.div_ceil(16),
            Some(Value::String(s)) if s == "auto" => d.div_ceil(16),
            Some(Value::Number(n)) => n
                .as_u64()
                .ok_or_else(|| bad("mamba_dt_rank must be a positive integer or \"auto\"".into()))?
                as usize,
            Some(v) => {
                return Err(bad(format!(
                    "mamba_dt_rank = {v}; expected an integer or \"auto\""
                )))
            }
        };
        if let Some(Value::Object(m)) = &raw.conv_dim {
            for (k, v) in m {
                if v.as_u64() != Some(d_inner as u64) {
                    return Err(unsup(format!(
                        "conv_dim[{k}] = {v}; expected mamba_expand*hidden_size = {d_inner}"
                    )));
                }
            }
        }
        let n = raw.num_hidden_layers;
        // Attention kind per layer.
        let window = raw.sliding_window;
        let globals: Vec<usize> = match (&raw.global_attn_idx, window) {
            (_, None) => (0..n).collect(),
            (None, Some(_)) => (0..n).collect(),
            (Some(g), Some(_)) => g.clone(),
        };
        for &g in &globals {
            if g >= n {
                return Err(bad(format!(
                    "global_attn_idx names layer {g}, but there are {n} layers"
                )));
            }
        }
        if !globals.contains(&0) {
            return Err(unsup("layer 0 is not a global-attention layer; the reference cache reads the sequence length from layer 0, so this engine requires it".into()));
        }
        if let Some(w) = window {
            if w == 0 {
                return Err(bad("sliding_window must be positive".into()));
            }
        }
        let attention: Vec<AttentionKind> = (0..n)
            .map(|i| {
                if globals.contains(&i) {
                    AttentionKind::Global
                } else {
                    AttentionKind::SlidingWindow {
                        window: window.unwrap(),
                    }
                }
            })
            .collect();
        let mut kv: Vec<KvRole> = vec![KvRole::Standalone; n];
        if raw.kv_reuse_group.is_none() && raw.kv_reuse_every_i_layer > 0 {
            return Err(unsup(
                "kv_reuse_every_i_layer without kv_reuse_group is not supported".into(),
            ));
        }
        for group in raw.kv_reuse_group.iter().flatten() {
            if group.len() < 2 {
                continue;
            }
            let p = group[0];
            for &l in group {
                if l >= n {
                    return Err(bad(format!(
                        "kv_reuse_group names layer {l}, but there are {n} layers"
                    )));
                }
                if kv[l] != KvRole::Standalone {
                    return Err(bad(format!(
                        "layer {l} appears in two kv_reuse_group entries"
                    )));
                }
            }
            for &c in &group[1..] {
                if c <= p {
                    return Err(unsup(format!(
                        "kv_reuse_group {group:?}: a consumer must come after its producer"
                    )));
                }
                if attention[c] != attention[p] {
                    return Err(unsup(format!("kv_reuse_group {group:?}: layers {p} and {c} have different attention types")));
                }
                kv[c] = KvRole::Consumer { producer: p };
            }
            kv[p] = KvRole::Producer {
                consumers: group[1..].to_vec(),
            };
        }
        let layers = attention
            .into_iter()
            .zip(kv)
            .map(|(attention, kv)| LayerRole { attention, kv })
            .collect();
        let rope_base = match raw.rope_type.as_deref() {
            Some("ntk") => {
                let orig = raw.orig_max_position_embeddings.ok_or_else(|| {
                    bad("rope_type \"ntk\" needs orig_max_position_embeddings".into())
                })?;
                let factor = 2.0f64;
                let scale =
                    factor * raw.max_position_embeddings as f64 / orig as f64 - (factor - 1.0);
                // The reference's NTK base, theta * (2 * max / orig - 1)^(d / (d - 2)), is zero
                // or undefined unless max_position_embeddings > orig / 2: every RoPE angle
                // would be inf / NaN.
                if scale <= 0.0 {
                    return Err(bad(format!(
                        "rope_type \"ntk\" with max_position_embeddings = {} and \
                         orig_max_position_embeddings = {orig}: the NTK RoPE base \
                         rope_theta * (2 * {} / {orig} - 1)^(d / (d - 2)) is not positive; \
                         max_position_embeddings must exceed orig_max_position_embeddings / 2",
                        raw.max_position_embeddings, raw.max_position_embeddings
                    )));
                }
                raw.rope_theta * scale.powf(d_qk as f64 / (d_qk as f64 - 2.0))
            }
            None | Some("default") => raw.rope_theta,
            Some(t) => {
                return Err(unsup(format!(
                    "rope_type = {t:?}; supported: \"ntk\" (static), \"default\""
                )))
            }
        };
        if !(rope_base.is_finite() && rope_base > 0.0) {
            return Err(bad(format!(
                "rope_theta = {}: the RoPE base must be a positive finite number",
                raw.rope_theta
            )));
        }
        let eos_token_ids = match &raw.eos_token_id {
            None => vec![2],
            Some(Value::Number(x)) => vec![x.as_u64().unwrap_or(2) as u32],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            Some(_) => vec![],
        };
        Ok(HymbaConfig {
            vocab_size: raw.vocab_size,
            hidden: d,
            intermediate: raw.intermediate_size,
            n_layers: n,
            n_heads: h,
            n_kv_heads: hkv,
            d_qk,
            d_v,
            d_inner,
            d_state: raw.mamba_d_state,
            d_conv: raw.mamba_d_conv,
            dt_rank,
            n_meta: raw.num_memory_tokens,
            eps: raw.rms_norm_eps as f32,
            conv_bias: raw.mamba_conv_bias,
            inner_norms: raw.mamba_inner_layernorms,
            rope: raw.rope,
            rope_base,
            max_position_embeddings: raw.max_position_embeddings,
            layers,
            bos_token_id: raw.bos_token_id.unwrap_or(1),
            eos_token_ids,
            raw,
            raw_json,
        })
    }

    /// Width of q (all query heads).
    pub fn q_width(&self) -> usize {
        self.n_heads * self.d_qk
    }
    pub fn k_width(&self) -> usize {
        self.n_kv_heads * self.d_qk
    }
    pub fn v_width(&self) -> usize {
        self.n_kv_heads * self.d_v
    }
    /// Rows of `in_proj` for layer `i`: q|k|v|x|z for KV owners, q|x|z for consumers.
    pub fn in_proj_rows(&self, i: usize) -> usize {
        self.in_proj_split(i).total
    }
    pub fn in_proj_split(&self, i: usize) -> InProjSplit {
        let q = 0;
        let owns = self.layers[i].owns_kv();
        let (k, v, x) = if owns {
            let k = self.q_width();
            let v = k + self.k_width();
            (Some(k), Some(v), v + self.v_width())
        } else {
            (None, None, self.q_width())
        };
        let z = x + self.d_inner;
        InProjSplit {
            q,
            k,
            v,
            x,
            z,
            total: z + self.d_inner,
        }
    }
    /// Width of the x_proj output: dt rank + B + C.
    pub fn x_proj_rows(&self) -> usize {
        self.dt_rank + 2 * self.d_state
    }
    /// Largest sliding window of any layer (None when every layer is global).
    pub fn max_window(&self) -> Option<usize> {
        self.layers
            .iter()
            .filter_map(|l| match l.attention {
                AttentionKind::SlidingWindow { window } => Some(window),
                _ => None,
            })
            .max()
    }
    /// RoPE inverse frequencies as the reference computes them (f32).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let base = self.rope_base as f32;
        (0..self.d_qk / 2)
            .map(|j| {
                let e = (2 * j) as f32 / self.d_qk as f32;
                1.0f32 / (base as f64).powf(e as f64) as f32
            })
            .collect()
    }
    /// Number of parameters (lm_head counted once when tied).
    pub fn parameter_count(&self) -> usize {
        let d = self.hidden;
        let mut total = self.vocab_size * d + self.n_meta * d + d;
        for i in 0..self.n_layers {
            total += self.layer_parameter_count(i);
        }
        if !self.raw.tie_word_embeddings {
            total += self.vocab_size * d;
        }
        total
    }
    pub fn layer_parameter_count(&self, i: usize) -> usize {
        let d = self.hidden;
        let di = self.d_inner;
        d + self.in_proj_rows(i) * d
            + di * self.d_conv
            + if self.conv_bias { di } else { 0 }
            + self.x_proj_rows() * di
            + di * self.dt_rank
            + di
            + di * self.d_state
            + di
            + if self.inner_norms {
                self.dt_rank + 2 * self.d_state
            } else {
                0
            }
            + 2 * di
            + d * di
            + d
            + 3 * d * self.intermediate
    }
    /// KV-cache bytes per position for the layers that own K/V, with `elem` bytes per value.
    pub fn kv_bytes_per_position(&self, elem: usize) -> usize {
        let owners = self.layers.iter().filter(|l| l.owns_kv()).count();
        owners * (self.k_width() + self.v_width()) * elem
    }
}

/// Column offsets of the blocks in a layer's `in_proj` output.
#[derive(Debug, Clone, Copy)]
pub struct InProjSplit {
    pub q: usize,
    pub k: Option<usize>,
    pub v: Option<usize>,
    pub x: usize,
    pub z: usize,
    pub total: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const HYMBA_15B: &str = include_str!("../../tests/configs/hymba-1.5b-config.json");

    #[test]
    fn real_15b_config_derives_spec_dimensions() {
        let c = HymbaConfig::from_json_str(HYMBA_15B, "1.5b").unwrap();
        assert_eq!((c.d_qk, c.d_v, c.d_inner, c.dt_rank), (64, 128, 3200, 100));
        assert_eq!(c.in_proj_rows(0), 8960);
        assert_eq!(c.in_proj_rows(2), 8000);
        assert_eq!(c.in_proj_rows(17), 8000);
        assert_eq!(c.in_proj_rows(18), 8000);
        assert_eq!(c.x_proj_rows(), 132);
        assert!(
            (c.rope_base - 74534.83031811893).abs() < 1e-6,
            "{}",
            c.rope_base
        );
        let inv = c.rope_inv_freq();
        assert!((inv[1] - 0.704269).abs() < 1e-5);
        assert!((inv[31] - 1.9050e-5).abs() < 1e-8);
        assert_eq!(c.layers.iter().filter(|l| l.owns_kv()).count(), 17);
        assert_eq!(
            c.layers[16].kv,
            KvRole::Producer {
                consumers: vec![17, 18]
            }
        );
        assert_eq!(c.layers[18].kv, KvRole::Consumer { producer: 16 });
        assert_eq!(c.layers[15].attention, AttentionKind::Global);
        assert_eq!(
            c.layers[1].attention,
            AttentionKind::SlidingWindow { window: 1024 }
        );
        assert_eq!(c.parameter_count(), 1_522_797_824);
    }

    #[test]
    fn rope_bases_that_would_make_every_angle_nan_are_refused() {
        // max_position_embeddings <= orig / 2 makes the NTK base 0 (found by a test model with
        // max 1024 and orig 2048, whose logits were all NaN)
        for (max, rope_type) in [(1024, "ntk"), (512, "ntk")] {
            let mut v: serde_json::Value = serde_json::from_str(HYMBA_15B).unwrap();
            v["max_position_embeddings"] = max.into();
            v["rope_type"] = rope_type.into();
            let e = HymbaConfig::from_json_str(&v.to_string(), "x")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("max_position_embeddings") && e.contains("orig_max_position_embeddings"),
                "{e}"
            );
        }
        let mut v: serde_json::Value = serde_json::from_str(HYMBA_15B).unwrap();
        v["max_position_embeddings"] = 1025.into();
        assert!(HymbaConfig::from_json_str(&v.to_string(), "x").is_ok());
        let mut v: serde_json::Value = serde_json::from_str(HYMBA_15B).unwrap();
        v["rope_type"] = "default".into();
        v["rope_theta"] = (-1.0).into();
        let e = HymbaConfig::from_json_str(&v.to_string(), "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("rope_theta"), "{e}");
    }

    #[test]
    fn unsupported_configs_are_named() {
        let mut v: serde_json::Value = serde_json::from_str(HYMBA_15B).unwrap();
        v["memory_tokens_interspersed_every"] = 4.into();
        let e = HymbaConfig::from_json_str(&v.to_string(), "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("memory_tokens_interspersed_every"), "{e}");
        let mut v: serde_json::Value = serde_json::from_str(HYMBA_15B).unwrap();
        v["kq_norm"] = "rms".into();
        assert!(HymbaConfig::from_json_str(&v.to_string(), "x")
            .unwrap_err()
            .to_string()
            .contains("kq_norm"));
        let mut v: serde_json::Value = serde_json::from_str(HYMBA_15B).unwrap();
        v["num_experts"] = 4.into();
        assert!(HymbaConfig::from_json_str(&v.to_string(), "x")
            .unwrap_err()
            .to_string()
            .contains("num_experts"));
        let mut v: serde_json::Value = serde_json::from_str(HYMBA_15B).unwrap();
        v["global_attn_idx"] = serde_json::json!([15, 31]);
        assert!(HymbaConfig::from_json_str(&v.to_string(), "x")
            .unwrap_err()
            .to_string()
            .contains("layer 0"));
        // Even (RoPE is fine) but not a multiple of 4: the attention kernels' vec4 loads.
        let mut v: serde_json::Value = serde_json::from_str(HYMBA_15B).unwrap();
        v["kq_head_dim"] = 62.into();
        let e = HymbaConfig::from_json_str(&v.to_string(), "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("q/k 62") && e.contains("multiples of 4"), "{e}");
        assert!(HymbaConfig::from_json_str("{", "cfg.json")
            .unwrap_err()
            .to_string()
            .contains("cfg.json"));
    }
}
