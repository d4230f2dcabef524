//! The Hymba forward pass on the GPU (spec §3): meta tokens, hybrid layers
//! (attention heads ‖ SSM heads, merged), KV producers and consumers, the
//! SwiGLU MLP, the final norm and the tied LM head.
//!
//! A forward over a chunk of positions is recorded as a list of dispatches
//! ([`Recorder`]); prompts run in chunks of at most `chunk` positions, decode
//! steps are one position through a program built once per sequence whose
//! parameters are rewritten each step.

use crate::cache::Sequence;
use crate::config::{AttentionKind, HymbaConfig};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Recorder};
use crate::kernels::{
    AttentionDecodeParams, AttentionParams, ConvParams, Kernels, KvDtype, Matrix, Prologue,
    RopeParams, SampleParams, ScanInput, ScanParams, WeightDtype, DECODE_KEYS_PER_SPLIT,
    GEMV_MAX_ROWS, NO_WINDOW, X_PROJ_SLICES,
};
use crate::loader::{expected_tensors, Checkpoint};
use crate::sampling::SamplingParams;
use std::collections::HashMap;
use std::sync::Arc;

/// Weight storage choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtypeChoice {
    /// f32 when the f32 model is small (≤ 1 GiB of weights), f16 otherwise.
    Auto,
    F32,
    F16,
    /// Block-quantized 8-bit weights (in_proj, out_proj, MLP, embeddings / LM head).
    Q8,
    /// Block-quantized 4-bit weights (in_proj, out_proj, MLP, embeddings / LM head).
    Q4,
}

impl std::str::FromStr for DtypeChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(DtypeChoice::Auto),
            "f32" => Ok(DtypeChoice::F32),
            "f16" => Ok(DtypeChoice::F16),
            "q8" => Ok(DtypeChoice::Q8),
            "q4" => Ok(DtypeChoice::Q4),
            _ => Err(format!(
                "unknown dtype {s:?} (expected auto, f32, f16, q8 or q4)"
            )),
        }
    }
}

/// A decode step encoded ahead of time (see `Model::prepare_decode`).
pub struct PreparedDecode {
    commands: wgpu::CommandBuffer,
    params: Option<Vec<u8>>,
    pos: usize,
    sample: bool,
    backup: bool,
}

/// Prefill chunk (positions) by default.
pub const CHUNK_DEFAULT: usize = 256;

/// Prefill chunk by default where the prompt GEMMs run on tensor cores (cooperative matrices):
/// twice the tiles per product fill the SMs better. On an H200 pp512 f16 went from 9,267 to
/// 10,920 tokens/s (best of 10) for 28 MiB more GPU memory (workspaces 35.9 -> 57.7 MiB, the
/// sliding-window rings' chunk slack 6.6 MiB).
pub const CHUNK_TENSOR_CORES: usize = 512;

#[derive(Debug, Clone)]
pub struct ModelOptions {
    pub dtype: DtypeChoice,
    /// Positions per prefill chunk (also sizes the sliding-window ring slack and the prompt
    /// workspaces). None: [`CHUNK_TENSOR_CORES`] where the prompt GEMMs run on tensor cores,
    /// else [`CHUNK_DEFAULT`].
    pub chunk: Option<usize>,
    /// Longest sequence in positions, meta tokens included (default: n_meta + max_position_embeddings).
    pub max_positions: Option<usize>,
    /// Decode with the fused kernels (8 dispatches per layer on GPUs, 9 on CPU adapters); false runs the prompt kernels
    /// one position at a time (20 dispatches per layer), kept as a cross-check.
    pub fused_decode: bool,
    /// KV-cache storage; None picks it from the weight storage ([`KvDtype::for_weights`]: f32
    /// for f32 weights, f16 for f16 / q8 / q4).
    pub kv_dtype: Option<KvDtype>,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            dtype: DtypeChoice::Auto,
            chunk: None,
            max_positions: None,
            fused_decode: true,
            kv_dtype: None,
        }
    }
}

struct LayerWeights {
    input_norm: wgpu::Buffer,
    in_proj: Matrix,
    /// conv1d weight [d_inner, d_conv] then bias [d_inner].
    conv: wgpu::Buffer,
    x_proj: Matrix,
    /// dt, B, C RMSNorm weights (None when mamba_inner_layernorms is false).
    inner_norms: Option<(wgpu::Buffer, wgpu::Buffer, wgpu::Buffer)>,
    /// The same three weights concatenated (for the fused decode scan, and the prefill norm that
    /// sums x_proj's split partial results).
    inner_norms_cat: Option<wgpu::Buffer>,
    dt_proj: Matrix,
    /// A = -exp(A_log) [d_inner, d_state], dt_proj bias [d_inner], D [d_inner].
    ssm_consts: wgpu::Buffer,
    /// pre_avg_layernorm1 then pre_avg_layernorm2 weights, [2, d_inner].
    pre_avg: wgpu::Buffer,
    out_proj: Matrix,
    pre_mlp_norm: wgpu::Buffer,
    /// gate_proj rows then up_proj rows: [2 * intermediate, hidden].
    gate_up: Matrix,
    down: Matrix,
}

/// Activation buffers for up to `rows` positions at a time: a prompt chunk, or a decode step.
struct Workspace {
    rows: usize,
    h: wgpu::Buffer,
    u: wgpu::Buffer,
    p: wgpu::Buffer,
    att: wgpu::Buffer,
    xc: wgpu::Buffer,
    xp: wgpu::Buffer,
    dt: wgpu::Buffer,
    y: wgpu::Buffer,
    /// The merge's output: the same buffer as `xc`.
    m: wgpu::Buffer,
    /// [rows, 2 * intermediate]: gate then up. The same buffer as `p`.
    gu: wgpu::Buffer,
    /// Logits of every row [rows, vocab], created on the first `Logits::All` (scoring, tests):
    /// at 32k vocabulary and 256-row chunks it is 31 MiB that generation never uses.
    logits_all: std::sync::OnceLock<wgpu::Buffer>,
}

impl Workspace {
    fn new(
        g: &Gpu,
        cfg: &HymbaConfig,
        kernels: &Kernels,
        layers: &[LayerWeights],
        rows: usize,
    ) -> Result<Workspace> {
        let c = rows;
        let pw = (0..cfg.n_layers)
            .map(|i| cfg.in_proj_rows(i))
            .max()
            .unwrap();
        // Buffers whose contents are never live at once share memory: the in_proj output is
        // dead once the layer's branches have run, before the MLP writes gate|up; the conv
        // output is dead once the scan has run, before the merge writes its output. (No
        // dispatch binds both of a pair.)
        let p = g.buffer(
            "in_proj out | mlp gate|up",
            (c * pw.max(2 * cfg.intermediate) * 4) as u64,
        )?;
        let xc = g.buffer("conv out | merged", (c * cfg.d_inner * 4) as u64)?;
        // Floats of down's K-split partial results at full chunks (1 slice: none needed).
        let down_parts = layers.first().map_or(0, |l| {
            let splits = kernels.coop_splits(&l.down, c, 0, 2 * cfg.intermediate, u64::MAX);
            if splits > 1 {
                splits * c * Kernels::parts_stride(cfg.hidden)
            } else {
                0
            }
        });
        Ok(Workspace {
            rows,
            h: g.buffer("h", (c * cfg.hidden * 4) as u64)?,
            u: g.buffer("u", (c * cfg.hidden * 4) as u64)?,
            p: p.clone(),
            att: g.buffer("attention out", (c * cfg.d_inner * 4) as u64)?,
            xc: xc.clone(),
            // A prompt chunk's rows, or a decode step's partial rows (x_proj split over K).
            xp: g.buffer(
                "x_proj out",
                (c.max(X_PROJ_SLICES) * cfg.x_proj_rows() * 4) as u64,
            )?,
            // Also the scratch of down's K-split partial results ([`Model::gemm_partial`]):
            // room for as many slices as the tensor-core GEMM wants (5 on an H200 for
            // Hymba-1.5B, where `dt`'s own size holds 2).
            dt: g.buffer(
                "dt | down partials",
                (c * cfg.d_inner).max(down_parts) as u64 * 4,
            )?,
            y: g.buffer("ssm out", (c * cfg.d_inner * 4) as u64)?,
            m: xc,
            gu: p,
            logits_all: std::sync::OnceLock::new(),
        })
    }

    /// Natively the model (and its workspaces) may be shared by threads; on wasm32 wgpu's
    /// handles are neither `Send` nor `Sync`, and the `Arc` only counts references.
    #[allow(clippy::arc_with_non_send_sync)]
    fn shared(self) -> Arc<Workspace> {
        Arc::new(self)
    }

    /// Bytes of GPU memory held (each shared buffer once).
    fn bytes(&self) -> u64 {
        debug_assert!(
            self.gu == self.p && self.m == self.xc,
            "shared workspaces counted once"
        );
        [
            &self.h, &self.u, &self.p, &self.att, &self.xc, &self.xp, &self.dt, &self.y,
        ]
        .iter()
        .map(|b| b.size())
        .sum::<u64>()
            + self.logits_all.get().map(|l| l.size()).unwrap_or(0)
    }
}

/// What a decode step writes besides its [`Workspace`] rows, kept for the model's lifetime.
struct StepBuffers {
    /// The decode step's workspace ([`GEMV_MAX_ROWS`] rows; prompts that short use it too).
    ws: Arc<Workspace>,
    /// One row of logits [vocab]: what decoding and a prompt's last position need.
    logits: wgpu::Buffer,
    /// Decode attention partials [n_heads, max splits, 2 + d_v].
    part: wgpu::Buffer,
    /// Per-layer outputs of a decode step's two branches (see [`BranchOutputs`]).
    branch: Vec<BranchOutputs>,
}

/// Where one layer's attention and SSM branches leave their results in a decode step: a buffer
/// set per layer, so each is first written in the step's compute pass where the layer runs.
/// wgpu then needs no barrier before the x_proj GEMV (it runs beside the attention blocks) or
/// before the attention combine (beside the scan): a barrier drains the whole GPU, and these
/// small dispatches cost more waiting than working.
struct BranchOutputs {
    /// x_proj partial rows [X_PROJ_SLICES, x_proj rows].
    xp: wgpu::Buffer,
    /// Attention heads' output [d_inner].
    att: wgpu::Buffer,
    /// SSM output [d_inner].
    y: wgpu::Buffer,
}

/// A K-split product's partial results not yet summed into its output, and the scratch buffer
/// holding them (the residual `h` is complete only once they are summed).
type PendingSum<'a> = (crate::kernels::Partials, &'a wgpu::Buffer);

/// What a forward returns besides updating the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    None,
    Last,
    All,
}

/// Per-layer tensors captured by a traced forward (rows = positions of the call).
#[derive(Debug, Default, Clone)]
pub struct Trace {
    /// hidden[i] = input of layer i, hidden[n_layers] = output of the last layer; [rows, d].
    pub hidden: Vec<Vec<f32>>,
    pub attn_out: Vec<Vec<f32>>,
    pub ssm_out: Vec<Vec<f32>>,
    pub final_norm: Vec<f32>,
}

pub struct Model {
    pub cfg: HymbaConfig,
    pub gpu: Arc<Gpu>,
    kernels: Arc<Kernels>,
    pub dtype: WeightDtype,
    /// How every sequence's KV cache stores keys and values.
    pub kv_dtype: KvDtype,
    embed: Matrix,
    lm_head: Option<Matrix>,
    meta: wgpu::Buffer,
    final_norm: wgpu::Buffer,
    cos_sin: wgpu::Buffer,
    layers: Vec<LayerWeights>,
    step: StepBuffers,
    /// The prompt workspace: created for a prompt longer than the decode step's workspace,
    /// sized to its chunk (at most `chunk` rows), kept for the prompts that follow and given
    /// back when decoding starts (58 MiB for Hymba-1.5B at 512-row chunks).
    prompt_ws: std::sync::Mutex<Option<Arc<Workspace>>>,
    pub chunk: usize,
    pub max_positions: usize,
    global_cap0: usize,
    fused_decode: bool,
    /// The meta-token prefix every sequence starts from, in host memory (computed at load).
    prefix: Option<crate::cache::Prefix>,
    weight_report: Vec<TensorStorage>,
    /// Times each fused decode stage is recorded (1; see [`Model::set_stage_repeat`]).
    stage_repeat: [std::sync::atomic::AtomicU32; DecodeStage::COUNT],
}

/// The dispatches of one fused decode layer, for [`Model::set_stage_repeat`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeStage {
    InProj,
    AttentionSplit,
    AttentionCombine,
    XProj,
    Scan,
    OutProj,
    GateUp,
    Down,
}

impl DecodeStage {
    pub const COUNT: usize = 8;
    pub const ALL: [DecodeStage; 8] = [
        DecodeStage::InProj,
        DecodeStage::AttentionSplit,
        DecodeStage::AttentionCombine,
        DecodeStage::XProj,
        DecodeStage::Scan,
        DecodeStage::OutProj,
        DecodeStage::GateUp,
        DecodeStage::Down,
    ];
    pub fn name(self) -> &'static str {
        match self {
            DecodeStage::InProj => "in_proj",
            DecodeStage::AttentionSplit => "attention split",
            DecodeStage::AttentionCombine => "attention combine",
            DecodeStage::XProj => "x_proj + conv",
            DecodeStage::Scan => "scan",
            DecodeStage::OutProj => "out_proj (merge)",
            DecodeStage::GateUp => "gate_up",
            DecodeStage::Down => "down (swiglu)",
        }
    }
}

/// How one weight buffer is stored on the GPU ([`Model::weight_report`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TensorStorage {
    /// The checkpoint tensor it holds; buffers made of several tensors join their names with
    /// `+` (e.g. `model.layers.0.moe.experts.0.gate_proj+up_proj.weight`).
    pub name: String,
    /// Element storage on the GPU: f32, f16, q8 or q4.
    pub dtype: WeightDtype,
    /// Logical shape (before row padding).
    pub shape: Vec<usize>,
    /// Size of the GPU buffer in bytes (`wgpu::Buffer::size`: padding included).
    pub bytes: u64,
}

/// Tensors of [`Model::weight_report`] with the same role, dtype and shape in several layers,
/// grouped: `model.layers.*.mamba.in_proj.weight` for layers 0-31.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TensorGroup {
    /// The name with the layer number replaced by `*` (or the name itself outside layers).
    pub pattern: String,
    /// Layer numbers in the group (empty outside layers).
    pub layers: Vec<usize>,
    pub dtype: WeightDtype,
    pub shape: Vec<usize>,
    /// Bytes of all the group's buffers together.
    pub bytes: u64,
}

/// Groups a weight report by role (layer number → `*`), dtype and shape, in first-seen order.
pub fn group_weight_report(report: &[TensorStorage]) -> Vec<TensorGroup> {
    let mut groups: Vec<TensorGroup> = Vec::new();
    for t in report {
        let (pattern, layer) = match t.name.strip_prefix("model.layers.") {
            Some(rest) => match rest.split_once('.') {
                Some((num, tail)) if num.parse::<usize>().is_ok() => {
                    (format!("model.layers.*.{tail}"), num.parse::<usize>().ok())
                }
                _ => (t.name.clone(), None),
            },
            None => (t.name.clone(), None),
        };
        match groups
            .iter_mut()
            .find(|g| g.pattern == pattern && g.dtype == t.dtype && g.shape == t.shape)
        {
            Some(g) => {
                g.layers.extend(layer);
                g.bytes += t.bytes;
            }
            None => groups.push(TensorGroup {
                pattern,
                layers: layer.into_iter().collect(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                bytes: t.bytes,
            }),
        }
    }
    groups
}

/// `a.x.weight` + `a.y.weight` → `a.x+y.weight` (names that differ in one dotted part).
fn joined_name(names: &[&str]) -> String {
    if names.len() == 1 {
        return names[0].to_string();
    }
    let parts: Vec<Vec<&str>> = names.iter().map(|n| n.split('.').collect()).collect();
    let same_len = parts.iter().all(|p| p.len() == parts[0].len());
    let diff: Vec<usize> = (0..parts[0].len())
        .filter(|&i| same_len && parts.iter().any(|p| p[i] != parts[0][i]))
        .collect();
    if diff.len() == 1 {
        let i = diff[0];
        let mut out = parts[0].clone();
        let joined = parts.iter().map(|p| p[i]).collect::<Vec<_>>().join("+");
        out[i] = &joined;
        return out.join(".");
    }
    names.join("+")
}

fn aggregate(v: Vec<(String, f64)>) -> Vec<(String, f64, usize)> {
    let mut m: Vec<(String, f64, usize)> = Vec::new();
    for (n, t) in v {
        match m.iter_mut().find(|e| e.0 == n) {
            Some(e) => {
                e.1 += t;
                e.2 += 1;
            }
            None => m.push((n, t, 1)),
        }
    }
    m.sort_by(|a, b| b.1.total_cmp(&a.1));
    m
}

/// Whether the fused decode kernels cover this config (x_proj row in workgroup memory).
fn cfg_fusable(c: &HymbaConfig) -> bool {
    c.x_proj_rows() <= 640
        && c.d_qk.is_multiple_of(4)
        && c.d_v.is_multiple_of(4)
        && c.d_state.is_multiple_of(4)
}

/// Widens words of two f16 each (element 2i in the low half, as `pack2x16float` stores them).
fn unpack_f16_words(words: &[u32]) -> Vec<f32> {
    words
        .iter()
        .flat_map(|&w| {
            [
                half::f16::from_bits(w as u16).to_f32(),
                half::f16::from_bits((w >> 16) as u16).to_f32(),
            ]
        })
        .collect()
}

fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// Builds a [`Model`] from tensors handed over one at a time, in any order: each weight is
/// converted, quantized if asked, and uploaded when it arrives, so a streaming load (the
/// browser's) holds about one tensor in memory, not the checkpoint. Small per-layer vectors
/// that the GPU keeps concatenated (conv weight and bias, A / dt bias / D, the merge norms)
/// and the gate projection until its up projection arrives wait on the CPU.
pub struct ModelBuilder {
    gpu: Arc<Gpu>,
    kernels: Arc<Kernels>,
    cfg: HymbaConfig,
    opts: ModelOptions,
    dtype: WeightDtype,
    /// Expected tensors not yet received: name -> shape.
    missing: HashMap<String, Vec<usize>>,
    /// Received tensors that wait for their partners.
    pending: HashMap<String, Vec<f32>>,
    /// Pre-quantized gate / up projections waiting for their partner: packed bytes, rows.
    pending_q: HashMap<String, (Vec<u8>, usize)>,
    buffers: HashMap<String, wgpu::Buffer>,
    matrices: HashMap<String, Matrix>,
    /// Every weight buffer uploaded so far ([`Model::weight_report`]).
    report: Vec<TensorStorage>,
}

impl ModelBuilder {
    pub fn new(
        gpu: Arc<Gpu>,
        kernels: Arc<Kernels>,
        cfg: HymbaConfig,
        opts: &ModelOptions,
    ) -> Result<ModelBuilder> {
        let dtype = match opts.dtype {
            DtypeChoice::F32 => WeightDtype::F32,
            DtypeChoice::F16 => WeightDtype::F16,
            DtypeChoice::Q8 => WeightDtype::Q8,
            DtypeChoice::Q4 => WeightDtype::Q4,
            DtypeChoice::Auto => {
                if (cfg.parameter_count() as u64) * 4 <= 1 << 30 {
                    WeightDtype::F32
                } else {
                    WeightDtype::F16
                }
            }
        };
        Ok(Self::with_dtype(gpu, kernels, cfg, opts, dtype))
    }

    /// A builder that stores the large matrices as `dtype` whatever `opts.dtype` says (a
    /// pre-quantized checkpoint's own dtype).
    pub fn with_dtype(
        gpu: Arc<Gpu>,
        kernels: Arc<Kernels>,
        cfg: HymbaConfig,
        opts: &ModelOptions,
        dtype: WeightDtype,
    ) -> ModelBuilder {
        ModelBuilder {
            missing: expected_tensors(&cfg).into_iter().collect(),
            gpu,
            kernels,
            cfg,
            opts: opts.clone(),
            dtype,
            pending: HashMap::new(),
            pending_q: HashMap::new(),
            buffers: HashMap::new(),
            matrices: HashMap::new(),
            report: Vec::new(),
        }
    }

    fn note(&mut self, name: String, dtype: WeightDtype, shape: Vec<usize>, bytes: u64) {
        self.report.push(TensorStorage {
            name,
            dtype,
            shape,
            bytes,
        });
    }

    fn note_matrix(&mut self, name: String, m: &Matrix) {
        let bytes = m.parts.iter().map(|p| p.buf.size()).sum();
        self.note(name, m.dtype, vec![m.rows, m.cols], bytes);
    }

    fn note_buffer(&mut self, name: &str, shape: Vec<usize>, b: &wgpu::Buffer) {
        self.note(name.to_string(), WeightDtype::F32, shape, b.size());
    }

    /// Takes one tensor of a pre-quantized checkpoint ([`Checkpoint::quantized_bytes`]): the
    /// packed words of a q8 / q4 matrix of logical `shape`, uploaded as they are (gate and up
    /// are joined without requantizing). Its dtype must be the builder's.
    pub fn add_quantized(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: WeightDtype,
        bytes: Vec<u8>,
    ) -> Result<()> {
        self.check_shape(name, shape)?;
        // With `auto`, a pre-quantized checkpoint loads as its own dtype (decided by its first
        // matrix, before any other matrix is uploaded).
        let stored_as_chosen =
            |k: &String| !k.ends_with("x_proj.0.weight") && !k.ends_with("dt_proj.0.weight");
        if dtype != self.dtype
            && self.opts.dtype == DtypeChoice::Auto
            && !self.matrices.keys().any(stored_as_chosen)
            && !self.pending.keys().any(|k| k.ends_with("p_proj.weight"))
        {
            self.dtype = dtype;
        }
        if dtype != self.dtype {
            return Err(Error::DtypeConflict {
                stored: dtype.name().into(),
                requested: self.dtype.name().into(),
            });
        }
        if self.missing.remove(name).is_none() {
            return Ok(());
        }
        let g = &*self.gpu;
        let (rows, cols) = (shape[0], shape[1..].iter().product::<usize>());
        let layer_part = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split_once('.'))
            .map(|(_, rest)| rest);
        match layer_part {
            Some("moe.experts.0.gate_proj.weight" | "moe.experts.0.up_proj.weight") => {
                let base = name
                    .rsplit_once("moe.experts.0.")
                    .map(|(b, _)| b.to_string())
                    .unwrap_or_default();
                let gate = format!("{base}moe.experts.0.gate_proj.weight");
                let up = format!("{base}moe.experts.0.up_proj.weight");
                self.pending_q.insert(name.to_string(), (bytes, rows));
                if self.pending_q.contains_key(&gate) && self.pending_q.contains_key(&up) {
                    let (gb, gr) = self.pending_q.remove(&gate).unwrap_or_default();
                    let (ub, ur) = self.pending_q.remove(&up).unwrap_or_default();
                    let joined =
                        crate::kernels::stack_quantized(&[(&gb, gr), (&ub, ur)], cols, dtype);
                    let label = joined_name(&[&gate, &up]);
                    let m =
                        Matrix::upload_quantized_bytes(g, &label, &joined, gr + ur, cols, dtype)?;
                    self.note_matrix(label, &m);
                    self.matrices.insert(format!("{base}gate_up"), m);
                }
            }
            _ => {
                let m = Matrix::upload_quantized_bytes(g, name, &bytes, rows, cols, dtype)?;
                self.note_matrix(name.to_string(), &m);
                self.matrices.insert(name.to_string(), m);
            }
        }
        Ok(())
    }

    /// Whether `name` is a tensor the model still needs.
    pub fn wants(&self, name: &str) -> bool {
        self.missing.contains_key(name)
    }

    /// Checks a tensor's shape against config.json before its bytes arrive.
    pub fn check_shape(&self, name: &str, shape: &[usize]) -> Result<()> {
        match self.missing.get(name) {
            Some(want) if want.as_slice() != shape => Err(Error::Shape {
                name: name.to_string(),
                found: shape.to_vec(),
                expected: want.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// Takes one tensor (widened to f32, row-major); names the model does not use are ignored.
    pub fn add(&mut self, name: &str, shape: &[usize], data: Vec<f32>) -> Result<()> {
        self.check_shape(name, shape)?;
        if self.missing.remove(name).is_none() {
            return Ok(());
        }
        let g = &*self.gpu;
        let cols: usize = shape[1..].iter().product();
        let rows = data.len().checked_div(cols).unwrap_or(0);
        let layer_part = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split_once('.'))
            .map(|(_, rest)| rest);
        match (name, layer_part) {
            ("model.embed_tokens.weight" | "lm_head.weight", _)
            | (
                _,
                Some(
                    "mamba.in_proj.weight"
                    | "mamba.out_proj.weight"
                    | "moe.experts.0.down_proj.weight",
                ),
            ) => {
                let m = Matrix::upload(g, name, &data, rows, cols, self.dtype)?;
                self.note_matrix(name.to_string(), &m);
                self.matrices.insert(name.to_string(), m);
            }
            // The fused decode kernels bind x_proj (dt_rank + 2 d_state rows) and dt_proj
            // (d_inner x dt_rank) whole: both are small.
            (_, Some("mamba.x_proj.0.weight" | "mamba.dt_proj.0.weight")) => {
                let m =
                    Matrix::upload_parts(g, name, &data, rows, cols, WeightDtype::F32, u64::MAX)?;
                self.note_matrix(name.to_string(), &m);
                self.matrices.insert(name.to_string(), m);
            }
            (_, Some("moe.experts.0.gate_proj.weight" | "moe.experts.0.up_proj.weight")) => {
                let base = name
                    .rsplit_once("moe.experts.0.")
                    .map(|(b, _)| b.to_string())
                    .unwrap_or_default();
                let gate = format!("{base}moe.experts.0.gate_proj.weight");
                let up = format!("{base}moe.experts.0.up_proj.weight");
                self.pending.insert(name.to_string(), data);
                if self.pending.contains_key(&gate) && self.pending.contains_key(&up) {
                    let mut gu = self.pending.remove(&gate).unwrap_or_default();
                    gu.extend(self.pending.remove(&up).unwrap_or_default());
                    let rows = gu.len() / cols.max(1);
                    let label = joined_name(&[&gate, &up]);
                    let m = Matrix::upload(g, &label, &gu, rows, cols, self.dtype)?;
                    self.note_matrix(label, &m);
                    self.matrices.insert(format!("{base}gate_up"), m);
                }
            }
            ("model.memory_tokens" | "model.final_layernorm.weight", _)
            | (_, Some("input_layernorm.weight" | "pre_moe_layernorm.weight")) => {
                let b = g.upload(name, &data)?;
                self.note_buffer(name, shape.to_vec(), &b);
                self.buffers.insert(name.to_string(), b);
            }
            _ => {
                self.pending.insert(name.to_string(), data);
            }
        }
        Ok(())
    }

    /// Bytes of the tensors received so far that still wait on the CPU.
    pub fn pending_bytes(&self) -> u64 {
        self.pending.values().map(|v| v.len() as u64 * 4).sum()
    }

    /// Assembles the model once every tensor has arrived (an error names the first missing
    /// one) and computes the meta-token prefix.
    pub async fn finish(mut self) -> Result<Model> {
        if let Some(name) = expected_tensors(&self.cfg)
            .into_iter()
            .map(|t| t.0)
            .find(|n| self.missing.contains_key(n))
        {
            return Err(Error::MissingTensor {
                name,
                files: "the checkpoint's safetensors files".into(),
            });
        }
        let cfg = self.cfg.clone();
        let g = &*self.gpu;
        let mut take_m = |name: &str| -> Result<Matrix> {
            let m = self
                .matrices
                .remove(name)
                .ok_or_else(|| Error::MissingTensor {
                    name: name.to_string(),
                    files: "the checkpoint's safetensors files".into(),
                })?;
            Ok(m)
        };
        let embed = take_m("model.embed_tokens.weight")?;
        let lm_head = if cfg.raw.tie_word_embeddings {
            None
        } else {
            Some(take_m("lm_head.weight")?)
        };
        let mut layer_mats = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let n = |s: &str| format!("model.layers.{i}.{s}");
            layer_mats.push((
                take_m(&n("mamba.in_proj.weight"))?,
                take_m(&n("mamba.x_proj.0.weight"))?,
                take_m(&n("mamba.dt_proj.0.weight"))?,
                take_m(&n("mamba.out_proj.weight"))?,
                take_m(&n("gate_up"))?,
                take_m(&n("moe.experts.0.down_proj.weight"))?,
            ));
        }
        let mut take_v = |name: &str| -> Vec<f32> { self.pending.remove(name).unwrap_or_default() };
        let mut take_b = |name: &str| -> Result<wgpu::Buffer> {
            self.buffers
                .remove(name)
                .ok_or_else(|| Error::MissingTensor {
                    name: name.to_string(),
                    files: "the checkpoint's safetensors files".into(),
                })
        };
        let meta = if cfg.n_meta > 0 {
            take_b("model.memory_tokens")?
        } else {
            g.buffer("no meta tokens", 16)?
        };
        let final_norm = take_b("model.final_layernorm.weight")?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        let mut extra: Vec<TensorStorage> = Vec::new();
        for (i, (in_proj, x_proj, dt_proj, out_proj, gate_up, down)) in
            layer_mats.into_iter().enumerate()
        {
            let n = |s: &str| format!("model.layers.{i}.{s}");
            let mut conv = take_v(&n("mamba.conv1d.weight"));
            if cfg.conv_bias {
                conv.extend(take_v(&n("mamba.conv1d.bias")));
            } else {
                conv.extend(std::iter::repeat_n(0.0, cfg.d_inner));
            }
            let mut consts: Vec<f32> = take_v(&n("mamba.A_log.0"))
                .iter()
                .map(|a| -a.exp())
                .collect();
            consts.extend(take_v(&n("mamba.dt_proj.0.bias")));
            consts.extend(take_v(&n("mamba.D.0")));
            let mut pre_avg = take_v(&n("mamba.pre_avg_layernorm1.weight"));
            pre_avg.extend(take_v(&n("mamba.pre_avg_layernorm2.weight")));
            // Buffers computed from several tensors, named as in the weight report.
            let mut derived = |name: String, data: &[f32]| -> Result<wgpu::Buffer> {
                let b = g.upload(&name, data)?;
                extra.push(TensorStorage {
                    name,
                    dtype: WeightDtype::F32,
                    shape: vec![data.len()],
                    bytes: b.size(),
                });
                Ok(b)
            };
            let conv = derived(n("mamba.conv1d.weight+bias"), &conv)?;
            let ssm_consts = derived(n("mamba.-exp(A_log.0)+dt_proj.0.bias+D.0"), &consts)?;
            let pre_avg = derived(n("mamba.pre_avg_layernorm1+2.weight"), &pre_avg)?;
            let (inner_norms, inner_norms_cat) = if cfg.inner_norms {
                let names = [
                    n("mamba.dt_layernorm.weight"),
                    n("mamba.B_layernorm.weight"),
                    n("mamba.C_layernorm.weight"),
                ];
                let (dt, b, c) = (take_v(&names[0]), take_v(&names[1]), take_v(&names[2]));
                let cat: Vec<f32> = dt.iter().chain(&b).chain(&c).copied().collect();
                let sep = (
                    derived(names[0].clone(), &dt)?,
                    derived(names[1].clone(), &b)?,
                    derived(names[2].clone(), &c)?,
                );
                // The same three again, concatenated for the fused decode scan and the prefill
                // norm of x_proj's split sum (rmsnorm.wgsl PARTS INPLACE).
                let cat = derived(n("mamba.dt+B+C_layernorm.weight (fused copy)"), &cat)?;
                (Some(sep), Some(cat))
            } else {
                (None, None)
            };
            layers.push(LayerWeights {
                input_norm: take_b(&n("input_layernorm.weight"))?,
                in_proj,
                conv,
                x_proj,
                inner_norms,
                inner_norms_cat,
                dt_proj,
                ssm_consts,
                pre_avg,
                out_proj,
                pre_mlp_norm: take_b(&n("pre_moe_layernorm.weight"))?,
                gate_up,
                down,
            });
        }
        let mut report = std::mem::take(&mut self.report);
        report.extend(extra);
        Model::assemble(
            self.gpu.clone(),
            self.kernels.clone(),
            cfg,
            self.dtype,
            embed,
            lm_head,
            meta,
            final_norm,
            layers,
            &self.opts,
            report,
        )
        .await
    }
}

impl Model {
    /// Uploads a validated checkpoint and computes the meta-token prefix.
    ///
    /// A pre-quantized checkpoint (`hymba quantize`, [`Checkpoint::quantization`]) has its packed
    /// words uploaded as they are; it loads with [`DtypeChoice::Auto`] or its own dtype, and any
    /// other choice is an [`Error::DtypeConflict`] (re-quantizing or widening stored 4/8-bit
    /// weights would only lose accuracy or memory silently).
    pub async fn load(
        gpu: Arc<Gpu>,
        kernels: Arc<Kernels>,
        ck: &Checkpoint,
        opts: &ModelOptions,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<Model> {
        let cfg = ck.config.clone();
        let chosen = match opts.dtype {
            DtypeChoice::F32 => Some(WeightDtype::F32),
            DtypeChoice::F16 => Some(WeightDtype::F16),
            DtypeChoice::Q8 => Some(WeightDtype::Q8),
            DtypeChoice::Q4 => Some(WeightDtype::Q4),
            DtypeChoice::Auto => None,
        };
        let dtype = match (ck.quantization(), chosen) {
            (Some(q), Some(c)) if q != c => {
                return Err(Error::DtypeConflict {
                    stored: q.name().into(),
                    requested: c.name().into(),
                })
            }
            (Some(q), _) => q,
            (None, Some(c)) => c,
            (None, None) => {
                if (cfg.parameter_count() as u64) * 4 <= 1 << 30 {
                    WeightDtype::F32
                } else {
                    WeightDtype::F16
                }
            }
        };
        let mut b = ModelBuilder::with_dtype(gpu, kernels, cfg.clone(), opts, dtype);
        let total = ck.stored_bytes();
        let mut done = 0u64;
        for (name, shape) in expected_tensors(&cfg) {
            match ck.quantized_bytes(&name)? {
                Some((qd, bytes)) => b.add_quantized(&name, &shape, qd, bytes.to_vec())?,
                None => b.add(&name, &shape, ck.f32(&name)?)?,
            }
            done += ck.stored_bytes_of(&name);
            progress(done.min(total), total);
        }
        progress(total, total);
        b.finish().await
    }

    #[allow(clippy::too_many_arguments)]
    async fn assemble(
        gpu: Arc<Gpu>,
        kernels: Arc<Kernels>,
        cfg: HymbaConfig,
        dtype: WeightDtype,
        embed: Matrix,
        lm_head: Option<Matrix>,
        meta: wgpu::Buffer,
        final_norm: wgpu::Buffer,
        layers: Vec<LayerWeights>,
        opts: &ModelOptions,
        weight_report: Vec<TensorStorage>,
    ) -> Result<Model> {
        let tensor_cores = layers.first().is_some_and(|l| {
            let gu = 2 * cfg.intermediate;
            kernels
                .coop2_kernel(&l.gate_up, CHUNK_TENSOR_CORES, 0, cfg.hidden, 0, gu)
                .is_some()
        });
        let chunk = opts
            .chunk
            .unwrap_or(if tensor_cores {
                CHUNK_TENSOR_CORES
            } else {
                CHUNK_DEFAULT
            })
            .max(cfg.n_meta)
            .max(1);
        let kv_dtype = opts.kv_dtype.unwrap_or(KvDtype::for_weights(dtype));
        kv_dtype.check_dims(cfg.d_qk, cfg.d_v)?;
        let max_positions = opts
            .max_positions
            .unwrap_or(cfg.n_meta + cfg.max_position_embeddings)
            .max(cfg.n_meta + 1);
        if max_positions > 256 * DECODE_KEYS_PER_SPLIT {
            return Err(Error::Unsupported(format!(
                "a context of {max_positions} positions; the decode attention combines at most 256 blocks of {DECODE_KEYS_PER_SPLIT} keys ({} positions)",
                256 * DECODE_KEYS_PER_SPLIT
            )));
        }
        // RoPE cos/sin table: angles in f32 as the reference computes them.
        let half = cfg.d_qk / 2;
        let inv = cfg.rope_inv_freq();
        let mut cs = Vec::with_capacity(max_positions * half * 2);
        for pos in 0..max_positions {
            for &f in inv.iter().take(half) {
                if cfg.rope {
                    let a = pos as f32 * f;
                    cs.push((a as f64).cos() as f32);
                    cs.push((a as f64).sin() as f32);
                } else {
                    cs.push(1.0);
                    cs.push(0.0);
                }
            }
        }
        let g = &*gpu;
        let cos_sin = g.upload("rope cos/sin", &cs)?;
        let step = StepBuffers {
            ws: Workspace::new(g, &cfg, &kernels, &layers, GEMV_MAX_ROWS)?.shared(),
            logits: g.buffer("logits", (cfg.vocab_size * 4) as u64)?,
            part: g.buffer(
                "attention partials",
                (cfg.n_heads * max_positions.div_ceil(DECODE_KEYS_PER_SPLIT) * (2 + cfg.d_v) * 4)
                    as u64,
            )?,
            // Only the GPU decode path uses them (CPU adapters keep the shared buffers).
            branch: (0..if kernels.cpu_adapter() {
                0
            } else {
                cfg.n_layers
            })
                .map(|l| {
                    Ok(BranchOutputs {
                        xp: g.buffer(
                            &format!("layer {l} decode x_proj out"),
                            (X_PROJ_SLICES * cfg.x_proj_rows() * 4) as u64,
                        )?,
                        att: g.buffer(
                            &format!("layer {l} decode attention out"),
                            (cfg.d_inner * 4) as u64,
                        )?,
                        y: g.buffer(
                            &format!("layer {l} decode ssm out"),
                            (cfg.d_inner * 4) as u64,
                        )?,
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        };
        let global_cap0 = round_up(2 * chunk, 256)
            .min(max_positions - cfg.n_meta)
            .max(1);
        let cfg_copy = cfg.clone();
        let mut model = Model {
            cfg,
            gpu,
            kernels,
            dtype,
            kv_dtype,
            embed,
            lm_head,
            meta,
            final_norm,
            cos_sin,
            layers,
            step,
            prompt_ws: std::sync::Mutex::new(None),
            chunk,
            max_positions,
            global_cap0,
            fused_decode: opts.fused_decode && cfg_fusable(&cfg_copy),
            prefix: None,
            weight_report,
            stage_repeat: std::array::from_fn(|_| std::sync::atomic::AtomicU32::new(1)),
        };
        // The meta-token prefix is a constant of the checkpoint: compute it once.
        let mut prefix = model.empty_sequence()?;
        if model.cfg.n_meta > 0 {
            model.forward(&mut prefix, &[], Logits::None, None).await?;
        }
        model.gpu.finish().await?;
        // Record (and drop) one decode step, so that the kernels compiled on first use are
        // compiled now and not inside the first generation's measured time.
        let mut rec = Recorder::new(&model.gpu);
        model.record_decode(
            &mut rec,
            &prefix,
            &crate::sampling::SamplingParams::greedy(),
            true,
            false,
        )?;
        drop(rec);
        // Without meta tokens a new sequence starts from zeros: nothing to keep.
        if model.cfg.n_meta > 0 {
            model.prefix = Some(crate::cache::Prefix::read(&model.gpu, &model.cfg, &prefix).await?);
        }
        // The meta-token rows' prompt workspace is not needed until a prompt comes.
        model.release_prompt_workspace();
        Ok(model)
    }

    /// Measurement only (`hymba-bench --stages`): record `stage` `n` times in every layer of the
    /// fused decode step (0 leaves it out). With any count other than 1 the outputs are wrong;
    /// the time difference is the stage's marginal cost in the dependent chain. Applies to
    /// sequences created afterwards (a sequence caches its recorded step).
    pub fn set_stage_repeat(&self, stage: DecodeStage, n: u32) {
        self.stage_repeat[stage as usize].store(n, std::sync::atomic::Ordering::Relaxed);
    }

    fn reps(&self, stage: DecodeStage) -> u32 {
        self.stage_repeat[stage as usize].load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes of weights on the GPU: the sum of [`Model::weight_report`].
    pub fn weight_bytes(&self) -> u64 {
        self.weight_report.iter().map(|t| t.bytes).sum()
    }

    /// Bytes of a sequence's cache once it holds `tokens` user tokens and decodes, measured: an
    /// empty sequence's buffers are grown as a prompt of that length grows them (the global
    /// layers' KV doubles as needed), the sliding-window rings shrunk as the first decode step
    /// shrinks them, their sizes summed, and the sequence dropped.
    pub fn cache_bytes_for(&self, tokens: usize) -> Result<u64> {
        let mut s = self.empty_sequence()?;
        s.ensure_capacity(
            &self.gpu,
            &self.cfg,
            self.cfg.n_meta + tokens,
            self.chunk.min(tokens.max(1)),
            self.max_positions - self.cfg.n_meta,
        )?;
        s.compact_rings(&self.gpu, &self.cfg)?;
        Ok(s.cache_bytes())
    }

    /// Bytes of the model's other GPU buffers, measured from them: the activation workspaces
    /// (each shared buffer once; the prompt workspace while it is alive), the decode step's
    /// logits, attention partials and branch outputs, and the RoPE table. Weights
    /// ([`Model::weight_bytes`]) and each sequence's cache (`Sequence::cache_bytes`) come on
    /// top. (The meta-token prefix new sequences start from is in host memory:
    /// [`Model::prefix_host_bytes`].)
    pub fn activation_bytes(&self) -> u64 {
        let st = &self.step;
        let prompt = self
            .prompt_ws
            .lock()
            .unwrap()
            .as_ref()
            .map_or(0, |w| w.bytes());
        st.ws.bytes()
            + prompt
            + st.logits.size()
            + st.part.size()
            + st.branch
                .iter()
                .map(|o| o.xp.size() + o.att.size() + o.y.size())
                .sum::<u64>()
            + self.cos_sin.size()
    }

    /// Rows of the prompt workspace alive now (0: none; it is created by a prompt longer than
    /// [`GEMV_MAX_ROWS`] positions and given back by the next decode step).
    pub fn prompt_workspace_rows(&self) -> usize {
        self.prompt_ws
            .lock()
            .unwrap()
            .as_ref()
            .map_or(0, |w| w.rows)
    }

    /// Gives the prompt workspace back (the GPU frees it once the work that uses it is done).
    /// Decode steps do this themselves; the next long prompt creates it again.
    pub fn release_prompt_workspace(&self) {
        self.prompt_ws.lock().unwrap().take();
    }

    /// The workspace for a forward of `rows` positions per chunk: the decode step's for a few
    /// rows, else the prompt workspace, created (or replaced by a larger one) as needed.
    fn workspace_for(&self, rows: usize) -> Result<Arc<Workspace>> {
        if rows <= self.step.ws.rows {
            return Ok(self.step.ws.clone());
        }
        let mut slot = self.prompt_ws.lock().unwrap();
        if let Some(w) = slot.as_ref().filter(|w| w.rows >= rows) {
            return Ok(w.clone());
        }
        // Drop a smaller one first, so the two are never held at once.
        *slot = None;
        let w = Workspace::new(&self.gpu, &self.cfg, &self.kernels, &self.layers, rows)?.shared();
        *slot = Some(w.clone());
        Ok(w)
    }

    /// Every weight buffer on the GPU: what it holds, its storage dtype, logical shape and
    /// size in bytes, measured from the uploaded buffers, in upload order.
    pub fn weight_report(&self) -> &[TensorStorage] {
        &self.weight_report
    }

    /// The weight matrices split across several buffers (larger than one storage binding),
    /// with their part counts.
    pub fn split_matrices(&self) -> Vec<(String, usize)> {
        let mut all: Vec<&Matrix> = vec![&self.embed];
        all.extend(self.lm_head.as_ref());
        for l in &self.layers {
            all.extend([
                &l.in_proj,
                &l.x_proj,
                &l.dt_proj,
                &l.out_proj,
                &l.gate_up,
                &l.down,
            ]);
        }
        all.into_iter()
            .filter(|m| m.parts.len() > 1)
            .map(|m| (m.label.clone(), m.parts.len()))
            .collect()
    }

    /// A sequence with nothing in it (not even the meta tokens).
    pub fn empty_sequence(&self) -> Result<Sequence> {
        Sequence::new(
            &self.gpu,
            &self.cfg,
            self.chunk,
            self.global_cap0,
            self.kv_dtype,
        )
    }

    /// Bytes of host memory holding the meta-token prefix (states and meta-token KV slots).
    pub fn prefix_host_bytes(&self) -> usize {
        self.prefix.as_ref().map(|p| p.bytes()).unwrap_or(0)
    }

    /// A new sequence starting from the precomputed meta-token prefix.
    pub fn new_sequence(&self) -> Result<Sequence> {
        let mut s = self.empty_sequence()?;
        if let Some(p) = &self.prefix {
            p.write_into(&self.gpu, &self.cfg, &mut s);
        }
        Ok(s)
    }

    /// Resets `seq` to the meta-token prefix (a new conversation) without reallocating.
    pub fn reset_sequence(&self, seq: &mut Sequence) -> Result<()> {
        *seq = self.new_sequence()?;
        Ok(())
    }

    fn lm_head(&self) -> &Matrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        for &id in ids {
            if id as usize >= self.cfg.vocab_size {
                return Err(Error::BadToken {
                    id,
                    vocab: self.cfg.vocab_size,
                });
            }
        }
        Ok(())
    }

    fn check_room(&self, seq: &Sequence, extra: usize) -> Result<()> {
        let meta = if seq.pos == 0 { self.cfg.n_meta } else { 0 };
        let needed = seq.pos + meta + extra;
        if needed > self.max_positions {
            return Err(Error::ContextTooLong {
                needed,
                meta: self.cfg.n_meta,
                limit: self.max_positions,
            });
        }
        Ok(())
    }

    /// Runs `ids` through the model, appending them to `seq` (prefill semantics:
    /// the sliding window covers `window` text positions before each query). A sequence
    /// with position 0 gets the meta tokens prepended first. Returns logits of the
    /// requested positions ([n, vocab] row-major; for `Last` just one row).
    pub async fn forward(
        &self,
        seq: &mut Sequence,
        ids: &[u32],
        want: Logits,
        mut trace: Option<&mut Trace>,
    ) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        self.check_room(seq, ids.len())?;
        let n_meta_rows = if seq.pos == 0 { self.cfg.n_meta } else { 0 };
        let total_rows = n_meta_rows + ids.len();
        if total_rows == 0 {
            return Ok(Vec::new());
        }
        let chunk_rows = total_rows.min(self.chunk);
        seq.ensure_capacity(
            &self.gpu,
            &self.cfg,
            seq.pos + total_rows,
            chunk_rows,
            self.max_positions - self.cfg.n_meta,
        )?;
        let ws = self.workspace_for(chunk_rows)?;
        let ws = &*ws;
        seq.undoable = None;
        // Mark prompt tokens for the repetition penalty.
        for &id in ids {
            self.gpu.write(&seq.seen, id as u64 * 4, &[1u32]);
        }
        let v = self.cfg.vocab_size;
        let mut out = Vec::new();
        let mut row = 0usize; // rows of this call done
        while row < total_rows {
            let rows = (total_rows - row).min(self.chunk);
            let meta_here = n_meta_rows.saturating_sub(row).min(rows);
            let id_start = row.saturating_sub(n_meta_rows);
            let id_count = rows - meta_here;
            if id_count > 0 {
                self.gpu
                    .write(&seq.ids, 0, &ids[id_start..id_start + id_count]);
            }
            let last_chunk = row + rows == total_rows;
            let chunk_logits = match want {
                Logits::All => Logits::All,
                Logits::Last if last_chunk => Logits::Last,
                _ => Logits::None,
            };
            let pos0 = seq.pos;
            if let Some(tr) = trace.as_deref_mut() {
                self.forward_traced(ws, seq, pos0, rows, meta_here, tr)
                    .await?;
            } else {
                let mut rec = Recorder::new(&self.gpu);
                self.record_chunk(
                    &mut rec,
                    ws,
                    seq,
                    pos0,
                    rows,
                    meta_here,
                    &seq.ids.clone(),
                    0,
                    false,
                    chunk_logits,
                )?;
                rec.finish().run(&self.gpu);
            }
            seq.pos += rows;
            match chunk_logits {
                Logits::All => {
                    // meta rows have no logits: skip them
                    let skip = meta_here;
                    if rows > skip {
                        if trace.is_some() {
                            let mut rec = Recorder::new(&self.gpu);
                            self.record_head(&mut rec, ws, 0, rows)?;
                            rec.finish().run(&self.gpu);
                        }
                        out.extend(
                            self.gpu
                                .read_f32(
                                    self.logits_for(ws, rows)?,
                                    (skip * v) as u64,
                                    ((rows - skip) * v) as u64,
                                )
                                .await?,
                        );
                    }
                }
                Logits::Last => {
                    if trace.is_some() {
                        let mut rec = Recorder::new(&self.gpu);
                        self.record_head(&mut rec, ws, rows - 1, 1)?;
                        rec.finish().run(&self.gpu);
                    }
                    if rows > meta_here {
                        out.extend(self.gpu.read_f32(&self.step.logits, 0, v as u64).await?);
                    }
                }
                Logits::None => {}
            }
            row += rows;
        }
        seq.tokens.extend_from_slice(ids);
        self.gpu.check_errors()?;
        Ok(out)
    }

    /// The logits buffer for `n` rows: the one-row buffer, or the workspace's rows one
    /// (created on first use).
    fn logits_for<'a>(&'a self, ws: &'a Workspace, n: usize) -> Result<&'a wgpu::Buffer> {
        if n <= 1 {
            return Ok(&self.step.logits);
        }
        if let Some(b) = ws.logits_all.get() {
            return Ok(b);
        }
        let b = self.gpu.buffer(
            "logits of every row",
            (ws.rows * self.cfg.vocab_size * 4) as u64,
        )?;
        Ok(ws.logits_all.get_or_init(|| b))
    }

    /// Final norm + LM head for `n` rows starting at row `first` of the chunk, into logits rows
    /// 0..n (of the one-row logits buffer when n = 1, else of the chunk-rows one).
    fn record_head(
        &self,
        rec: &mut Recorder,
        ws: &Workspace,
        first: usize,
        n: usize,
    ) -> Result<()> {
        let c = &self.cfg;
        let k = &self.kernels;
        let logits = self.logits_for(ws, n)?;
        k.rmsnorm(
            rec,
            Some((&ws.h, first * c.hidden, c.hidden)),
            &self.final_norm,
            &ws.u,
            0,
            c.hidden,
            n,
            c.hidden,
            c.eps,
        )?;
        self.gemm(
            rec,
            ws,
            &ws.u,
            0,
            c.hidden,
            self.lm_head(),
            logits,
            0,
            c.vocab_size,
            n,
            false,
        )
    }

    /// Records one chunk: embedding, every layer, and (optionally) the head.
    #[allow(clippy::too_many_arguments)]
    fn record_chunk(
        &self,
        rec: &mut Recorder,
        ws: &Workspace,
        seq: &Sequence,
        pos0: usize,
        rows: usize,
        meta_rows: usize,
        ids: &wgpu::Buffer,
        ids_off: usize,
        decode: bool,
        logits: Logits,
    ) -> Result<()> {
        let c = &self.cfg;
        self.kernels.embed(
            rec,
            ids,
            ids_off,
            &self.embed,
            &self.meta,
            meta_rows,
            &ws.h,
            rows,
        )?;
        // A layer's split down_proj leaves its partial results for the next layer's input norm
        // to sum into the residual; after the last layer they are summed on their own.
        let mut pending = None;
        for l in 0..c.n_layers {
            pending = self.record_layer(rec, ws, seq, l, pos0, rows, decode, pending)?;
        }
        if let Some((pp, parts)) = pending {
            self.kernels.reduce_partials(rec, parts, pp, &ws.h)?;
        }
        match logits {
            Logits::None => Ok(()),
            Logits::All => self.record_head(rec, ws, 0, rows),
            Logits::Last => self.record_head(rec, ws, rows - 1, 1),
        }
    }

    /// One hybrid layer over `rows` positions starting at `pos0`. `pending`: the previous
    /// layer's split down_proj partial results, not yet in the residual `h` (this layer's input
    /// norm sums them in). Returns this layer's, if its down_proj was split: `h` is complete
    /// only once they are summed.
    #[allow(clippy::too_many_arguments)]
    fn record_layer<'a>(
        &'a self,
        rec: &mut Recorder,
        ws: &'a Workspace,
        seq: &Sequence,
        l: usize,
        pos0: usize,
        rows: usize,
        decode: bool,
        pending: Option<PendingSum<'a>>,
    ) -> Result<Option<PendingSum<'a>>> {
        let c = &self.cfg;
        let k = &self.kernels;
        let w = &self.layers[l];
        let d = c.hidden;
        let di = c.d_inner;
        let split = c.in_proj_split(l);
        let pw = split.total;
        // Input norm (with the previous layer's split down_proj summed into the residual
        // first) and the fused in_proj (q | k | v | x | z).
        self.residual_norm(rec, ws, pending, &w.input_norm, rows)?;
        self.gemm(rec, ws, &ws.u, 0, d, &w.in_proj, &ws.p, 0, pw, rows, false)?;
        // Attention heads.
        let src = c.layers[l].kv_source(l);
        let kv = seq.layers[src]
            .kv
            .as_ref()
            .expect("KV source layer owns a cache");
        let cap = kv.cap(c.n_meta);
        let rope = RopeParams {
            rows: rows as u32,
            n_heads: c.n_heads as u32,
            d_qk: c.d_qk as u32,
            d_v: c.d_v as u32,
            p_off: 0,
            p_stride: pw as u32,
            q_col: split.q as u32,
            v_col: split.v.unwrap_or(0) as u32,
            pos0: pos0 as u32,
            n_meta: c.n_meta as u32,
            ring: kv.ring as u32,
            cap: cap as u32,
        };
        if let (Some(kc), Some(_)) = (split.k, split.v) {
            k.store_kv(
                rec,
                &self.cos_sin,
                &ws.p,
                kv.buffers(),
                RopeParams {
                    n_heads: c.n_kv_heads as u32,
                    q_col: kc as u32,
                    ..rope
                },
            )?;
        }
        k.rope_q(rec, &self.cos_sin, &ws.p, rope)?;
        let window = match c.layers[l].attention {
            AttentionKind::Global => NO_WINDOW,
            // A single-token decode step sees one text position less (the reference trims to window - 1).
            AttentionKind::SlidingWindow { window } => {
                (if decode { window - 1 } else { window }) as u32
            }
        };
        k.attention(
            rec,
            &ws.p,
            kv.buffers(),
            &ws.att,
            AttentionParams {
                rows: rows as u32,
                n_heads: c.n_heads as u32,
                n_kv_heads: c.n_kv_heads as u32,
                d_qk: c.d_qk as u32,
                d_v: c.d_v as u32,
                q_off: split.q as u32,
                q_stride: pw as u32,
                out_off: 0,
                out_stride: di as u32,
                pos0: pos0 as u32,
                n_meta: c.n_meta as u32,
                ring: kv.ring as u32,
                cap: cap as u32,
                window,
                scale: 1.0 / (c.d_qk as f32).sqrt(),
                k_col: 0,
                v_col: 0,
                self_kv: 0,
            },
        )?;
        // SSM heads: conv, x_proj, inner norms, dt_proj, selective scan.
        let st = &seq.layers[l];
        k.conv(
            rec,
            &ws.p,
            &w.conv,
            &st.conv,
            &ws.xc,
            ConvParams {
                rows: rows as u32,
                d: di as u32,
                k: c.d_conv as u32,
                x_off: split.x as u32,
                x_stride: pw as u32,
                has_bias: 1,
            },
        )?;
        // x_proj: narrow (dt_rank + 2 d_state outputs), so split over K on GPUs, its partial
        // results in `dt` (dead until dt_proj writes it below).
        let xs = c.x_proj_rows();
        let pending = k.matmul_prompt_partial(
            rec,
            Some(&ws.dt),
            &ws.xc,
            0,
            di,
            &w.x_proj,
            &ws.xp,
            0,
            xs,
            rows,
            false,
        )?;
        match (pending, &w.inner_norms, &w.inner_norms_cat) {
            // The split's sum and the inner dt / B / C norms in one dispatch.
            (Some(pp), Some(_), Some(cat)) => k.rmsnorm_partials(
                rec,
                &ws.dt,
                pp,
                cat,
                &ws.xp,
                None,
                (c.dt_rank, c.dt_rank + c.d_state),
                c.eps,
            )?,
            (pending, norms, _) => {
                if let Some(pp) = pending {
                    k.reduce_partials(rec, &ws.dt, pp, &ws.xp)?;
                }
                if let Some((ndt, nb, nc)) = norms {
                    k.rmsnorm(rec, None, ndt, &ws.xp, 0, xs, rows, c.dt_rank, c.eps)?;
                    k.rmsnorm(rec, None, nb, &ws.xp, c.dt_rank, xs, rows, c.d_state, c.eps)?;
                    k.rmsnorm(
                        rec,
                        None,
                        nc,
                        &ws.xp,
                        c.dt_rank + c.d_state,
                        xs,
                        rows,
                        c.d_state,
                        c.eps,
                    )?;
                }
            }
        }
        k.matmul(
            rec, &ws.xp, 0, xs, &w.dt_proj, None, &ws.dt, 0, di, rows, false,
        )?;
        k.scan(
            rec,
            &ws.xc,
            &ws.dt,
            &ws.xp,
            &ws.p,
            &w.ssm_consts,
            &st.ssm,
            &ws.y,
            // The normed layer input is dead from in_proj to the pre-MLP norm: it holds the
            // row groups' hand-over.
            Some(&ws.u),
            ScanParams {
                rows: rows as u32,
                d: di as u32,
                n: c.d_state as u32,
                xp_stride: xs as u32,
                b_col: c.dt_rank as u32,
                c_col: (c.dt_rank + c.d_state) as u32,
                z_off: split.z as u32,
                z_stride: pw as u32,
                rank: c.dt_rank as u32,
                wdt_stride: 0,
                eps: c.eps,
                inner_norms: c.inner_norms as u32,
                x_off: 0,
                conv_k: 0,
                xp_parts: 1,
                ..Default::default()
            },
        )?;
        // Merge the two kinds of heads, out_proj into the residual.
        k.merge(rec, &ws.att, &ws.y, &w.pre_avg, &ws.m, rows, di, c.eps)?;
        // SwiGLU MLP, its norm fused with the sum of a split out_proj.
        let pending = self.gemm_partial(rec, ws, &ws.m, 0, di, &w.out_proj, rows)?;
        self.residual_norm(rec, ws, pending, &w.pre_mlp_norm, rows)?;
        let i2 = 2 * c.intermediate;
        self.gemm(rec, ws, &ws.u, 0, d, &w.gate_up, &ws.gu, 0, i2, rows, false)?;
        k.swiglu(rec, &ws.gu, rows, c.intermediate)?;
        self.gemm_partial(rec, ws, &ws.gu, 0, i2, &w.down, rows)
    }

    /// `u` = RMSNorm (weight `norm`) of the residual `h`, over `rows` rows; with `pending`, the
    /// split partial results of the product into `h` are summed into it first, in the same
    /// dispatch.
    fn residual_norm(
        &self,
        rec: &mut Recorder,
        ws: &Workspace,
        pending: Option<PendingSum<'_>>,
        norm: &wgpu::Buffer,
        rows: usize,
    ) -> Result<()> {
        let (d, eps) = (self.cfg.hidden, self.cfg.eps);
        match pending {
            Some((pp, parts)) => self.kernels.rmsnorm_partials(
                rec,
                parts,
                pp,
                norm,
                &ws.h,
                Some((&ws.u, 0, d)),
                (d, d),
                eps,
            ),
            None => self
                .kernels
                .rmsnorm(rec, Some((&ws.h, 0, d)), norm, &ws.u, 0, d, rows, d, eps),
        }
    }

    /// A prompt-chunk product without bias that does not write the residual (in_proj, gate|up,
    /// the LM head): [`Kernels::matmul_prompt`] without K-split scratch.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        rec: &mut Recorder,
        ws: &Workspace,
        x: &wgpu::Buffer,
        x_off: usize,
        x_stride: usize,
        w: &Matrix,
        y: &wgpu::Buffer,
        y_off: usize,
        y_stride: usize,
        rows: usize,
        accumulate: bool,
    ) -> Result<()> {
        debug_assert!(y != &ws.h, "products into the residual take gemm_partial");
        self.kernels.matmul_prompt(
            rec, None, x, x_off, x_stride, w, y, y_off, y_stride, rows, accumulate,
        )
    }

    /// A prompt-chunk product into the residual `h` (out_proj, down), with a dead workspace as
    /// scratch for K-split partial results: for out_proj the in_proj output (dead from the merge
    /// until gate|up writes it), for down (whose X is that gate|up output) `dt`, dead from the
    /// scan to the next layer's x_proj (down's partial results wait there for the next layer's
    /// input norm; x_proj borrows it after that, just before dt_proj). Returns the partial
    /// results and their scratch when the product was split (the caller sums them into `h`),
    /// None when it wrote `h` itself. `forward_traced` reads neither scratch after the layer.
    #[allow(clippy::too_many_arguments)]
    fn gemm_partial<'a>(
        &self,
        rec: &mut Recorder,
        ws: &'a Workspace,
        x: &wgpu::Buffer,
        x_off: usize,
        x_stride: usize,
        w: &Matrix,
        rows: usize,
    ) -> Result<Option<PendingSum<'a>>> {
        let parts = if x == &ws.gu { &ws.dt } else { &ws.p };
        let d = self.cfg.hidden;
        let pending = self.kernels.matmul_prompt_partial(
            rec,
            Some(parts),
            x,
            x_off,
            x_stride,
            w,
            &ws.h,
            0,
            d,
            rows,
            true,
        )?;
        Ok(pending.map(|pp| (pp, parts)))
    }

    /// One decode step of a hybrid layer with fused kernels: 8 dispatches on GPUs, where the
    /// attention and SSM branches overlap (no barrier before x_proj or the combine; see
    /// `BranchOutputs`), 9 on CPU adapters.
    fn record_layer_decode(
        &self,
        rec: &mut Recorder,
        seq: &Sequence,
        l: usize,
        pos: usize,
    ) -> Result<()> {
        let c = &self.cfg;
        let k = &self.kernels;
        let w = &self.layers[l];
        let ws = &*self.step.ws;
        let sb = &self.step;
        let d = c.hidden;
        let di = c.d_inner;
        let split = c.in_proj_split(l);
        let pw = split.total;
        for _ in 0..self.reps(DecodeStage::InProj) {
            k.gemv_pro(
                rec,
                &ws.h,
                0,
                d,
                &w.in_proj,
                Prologue::Norm(&w.input_norm, c.eps),
                &ws.p,
                0,
                pw,
                1,
                false,
            )?;
        }
        let src = c.layers[l].kv_source(l);
        let kv = seq.layers[src]
            .kv
            .as_ref()
            .expect("KV source layer owns a cache");
        let window = match c.layers[l].attention {
            AttentionKind::Global => NO_WINDOW,
            AttentionKind::SlidingWindow { window } => (window - 1) as u32,
        };
        let cap = kv.cap(c.n_meta);
        let ap = AttentionDecodeParams {
            n_heads: c.n_heads as u32,
            n_kv_heads: c.n_kv_heads as u32,
            d_qk: c.d_qk as u32,
            d_v: c.d_v as u32,
            q_stride: pw as u32,
            k_col: split.k.unwrap_or(0) as u32,
            v_col: split.v.unwrap_or(0) as u32,
            self_kv: split.k.is_some() as u32,
            pos: pos as u32,
            n_meta: c.n_meta as u32,
            ring: kv.ring as u32,
            cap: cap as u32,
            window,
            scale: 1.0 / (c.d_qk as f32).sqrt(),
            n_splits: cap.div_ceil(DECODE_KEYS_PER_SPLIT) as u32,
        };
        // This layer's branch outputs: its own buffers on GPUs (see BranchOutputs).
        let gpu_path = !k.cpu_adapter();
        let (att, y) = match sb.branch.get(l) {
            Some(bo) => (&bo.att, &bo.y),
            None => (&ws.att, &ws.y),
        };
        for _ in 0..self.reps(DecodeStage::AttentionSplit) {
            k.attention_blocks(rec, &ws.p, &self.cos_sin, kv.buffers(), &sb.part, ap)?;
        }
        if !gpu_path {
            for _ in 0..self.reps(DecodeStage::AttentionCombine) {
                k.attention_combine(rec, &sb.part, att, ap)?;
            }
        }
        // SSM branch. On GPUs: x_proj with the step's conv in its prologue (no barrier before
        // it: it runs beside the attention blocks), then the scan, which recomputes its
        // channels' conv outputs and shifts the conv state, then the attention combine (no
        // barrier: beside the scan). CPU adapters run one invocation per output row of x_proj,
        // which would redo the whole conv per row: they keep the conv in its own dispatch.
        let st = &seq.layers[l];
        let xs = c.x_proj_rows();
        let sp = ScanParams {
            rows: 1,
            d: di as u32,
            n: c.d_state as u32,
            xp_stride: xs as u32,
            b_col: c.dt_rank as u32,
            c_col: (c.dt_rank + c.d_state) as u32,
            z_off: split.z as u32,
            z_stride: pw as u32,
            rank: c.dt_rank as u32,
            wdt_stride: (w.dt_proj.kp4() * 4),
            eps: c.eps,
            inner_norms: c.inner_norms as u32,
            x_off: split.x as u32,
            conv_k: c.d_conv as u32,
            xp_parts: 1,
            ..Default::default()
        };
        if k.cpu_adapter() {
            k.conv_step(
                rec,
                &ws.p,
                &w.conv,
                &st.conv,
                &ws.xc,
                ConvParams {
                    rows: 1,
                    d: di as u32,
                    k: c.d_conv as u32,
                    x_off: split.x as u32,
                    x_stride: pw as u32,
                    has_bias: 1,
                },
            )?;
            k.matmul(rec, &ws.xc, 0, di, &w.x_proj, None, &ws.xp, 0, xs, 1, false)?;
            k.scan_fused(
                rec,
                ScanInput::Conv(&ws.xc),
                &w.dt_proj,
                &ws.xp,
                &ws.p,
                &w.ssm_consts,
                &st.ssm,
                y,
                w.inner_norms_cat.as_ref(),
                sp,
            )?;
        } else {
            let xp = &sb.branch[l].xp;
            let mut xp_parts = 1;
            for _ in 0..self.reps(DecodeStage::XProj) {
                xp_parts = k.x_proj_conv(
                    rec, &ws.p, split.x, &w.x_proj, &w.conv, &st.conv, c.d_conv, xp,
                )?;
            }
            for _ in 0..self.reps(DecodeStage::Scan) {
                k.scan_fused(
                    rec,
                    ScanInput::ConvStep {
                        w: &w.conv,
                        state: &st.conv,
                        readable: &sb.part,
                    },
                    &w.dt_proj,
                    xp,
                    &ws.p,
                    &w.ssm_consts,
                    &st.ssm,
                    y,
                    w.inner_norms_cat.as_ref(),
                    ScanParams { xp_parts, ..sp },
                )?;
            }
            for _ in 0..self.reps(DecodeStage::AttentionCombine) {
                k.attention_combine(rec, &sb.part, att, ap)?;
            }
        }
        for _ in 0..self.reps(DecodeStage::OutProj) {
            k.gemv_pro(
                rec,
                att,
                0,
                di,
                &w.out_proj,
                Prologue::Merge {
                    w: &w.pre_avg,
                    x2: y,
                    eps: c.eps,
                },
                &ws.h,
                0,
                d,
                1,
                true,
            )?;
        }
        let i2 = 2 * c.intermediate;
        for _ in 0..self.reps(DecodeStage::GateUp) {
            k.gemv_pro(
                rec,
                &ws.h,
                0,
                d,
                &w.gate_up,
                Prologue::Norm(&w.pre_mlp_norm, c.eps),
                &ws.gu,
                0,
                i2,
                1,
                false,
            )?;
        }
        for _ in 0..self.reps(DecodeStage::Down) {
            k.gemv_pro(
                rec,
                &ws.gu,
                0,
                i2,
                &w.down,
                Prologue::Swiglu,
                &ws.h,
                0,
                d,
                1,
                true,
            )?;
        }
        Ok(())
    }

    async fn forward_traced(
        &self,
        ws: &Workspace,
        seq: &mut Sequence,
        pos0: usize,
        rows: usize,
        meta_rows: usize,
        tr: &mut Trace,
    ) -> Result<()> {
        let c = &self.cfg;
        let g = &*self.gpu;
        let n = c.n_layers;
        if tr.hidden.len() < n + 1 {
            tr.hidden.resize(n + 1, Vec::new());
            tr.attn_out.resize(n, Vec::new());
            tr.ssm_out.resize(n, Vec::new());
        }
        let mut rec = Recorder::new(g);
        self.kernels.embed(
            &mut rec,
            &seq.ids,
            0,
            &self.embed,
            &self.meta,
            meta_rows,
            &ws.h,
            rows,
        )?;
        rec.finish().run(g);
        for l in 0..n {
            tr.hidden[l].extend(g.read_f32(&ws.h, 0, (rows * c.hidden) as u64).await?);
            let mut rec = Recorder::new(g);
            if let Some((pp, parts)) =
                self.record_layer(&mut rec, ws, seq, l, pos0, rows, false, None)?
            {
                self.kernels.reduce_partials(&mut rec, parts, pp, &ws.h)?;
            }
            rec.finish().run(g);
            tr.attn_out[l].extend(g.read_f32(&ws.att, 0, (rows * c.d_inner) as u64).await?);
            tr.ssm_out[l].extend(g.read_f32(&ws.y, 0, (rows * c.d_inner) as u64).await?);
        }
        tr.hidden[n].extend(g.read_f32(&ws.h, 0, (rows * c.hidden) as u64).await?);
        let mut rec = Recorder::new(g);
        self.kernels.rmsnorm(
            &mut rec,
            Some((&ws.h, 0, c.hidden)),
            &self.final_norm,
            &ws.u,
            0,
            c.hidden,
            rows,
            c.hidden,
            c.eps,
        )?;
        rec.finish().run(g);
        tr.final_norm
            .extend(g.read_f32(&ws.u, 0, (rows * c.hidden) as u64).await?);
        Ok(())
    }

    fn sample_params(&self, sp: &SamplingParams) -> SampleParams {
        SampleParams {
            vocab: self.cfg.vocab_size as u32,
            mode: (!sp.is_greedy()) as u32,
            top_k: sp.top_k,
            seed: sp.seed32(),
            temperature: sp.temperature.max(1e-6),
            top_p: sp.top_p,
            penalty: sp.repetition_penalty,
            logits_off: 0,
        }
    }

    /// Samples from the logits of the last forward (row 0 of the logits buffer) on the GPU.
    pub fn record_sample(
        &self,
        seq: &Sequence,
        sp: &SamplingParams,
    ) -> Result<crate::gpu::Program> {
        let mut rec = Recorder::new(&self.gpu);
        self.kernels.sample(
            &mut rec,
            &self.step.logits,
            &seq.seen,
            &seq.tok_state,
            self.sample_params(sp),
        )?;
        Ok(rec.finish())
    }

    fn record_decode(
        &self,
        rec: &mut Recorder,
        seq: &Sequence,
        sp: &SamplingParams,
        sample: bool,
        backup: bool,
    ) -> Result<()> {
        let c = &self.cfg;
        if backup {
            // The recurrent state this step overwrites, copied first (the copies depend on
            // nothing in the step, so they run beside its first kernels); the KV slot it writes
            // needs no copy: undoing the step moves the position back, and the next step
            // writes the slot again.
            let bak = seq.backup.as_ref().ok_or_else(|| {
                Error::Invalid("decode step with a backup: no backup buffers".into())
            })?;
            for (l, (conv, ssm)) in seq.layers.iter().zip(bak) {
                self.kernels.state_copy(rec, &l.conv, conv, &l.ssm, ssm)?;
            }
        }
        if self.fused_decode {
            self.kernels.embed(
                rec,
                &seq.tok_state,
                0,
                &self.embed,
                &self.meta,
                0,
                &self.step.ws.h,
                1,
            )?;
            for l in 0..c.n_layers {
                self.record_layer_decode(rec, seq, l, seq.pos)?;
            }
            self.kernels.gemv_pro(
                rec,
                &self.step.ws.h,
                0,
                c.hidden,
                self.lm_head(),
                Prologue::Norm(&self.final_norm, c.eps),
                &self.step.logits,
                0,
                c.vocab_size,
                1,
                false,
            )?;
        } else {
            self.record_chunk(
                rec,
                &self.step.ws,
                seq,
                seq.pos,
                1,
                0,
                &seq.tok_state,
                0,
                true,
                Logits::Last,
            )?;
        }
        if sample {
            self.kernels.sample(
                rec,
                &self.step.logits,
                &seq.seen,
                &seq.tok_state,
                self.sample_params(sp),
            )?;
        }
        Ok(())
    }

    /// Sets the token that the next decode step consumes (teacher forcing, or the first step after a prefill).
    pub fn set_next_token(&self, seq: &mut Sequence, id: u32) -> Result<()> {
        self.check_ids(&[id])?;
        seq.undoable = None;
        self.gpu.write(&seq.tok_state, 0, &[id]);
        self.gpu.write(&seq.seen, id as u64 * 4, &[1u32]);
        Ok(())
    }

    /// Encodes one decode step for the token in the sequence's token slot: the whole
    /// model for one position (single-token window semantics), then, when `sample` is set,
    /// the GPU sampler, which writes the next token into the slot. Nothing is read back.
    pub fn submit_decode(
        &self,
        seq: &mut Sequence,
        sp: &SamplingParams,
        sample: bool,
    ) -> Result<()> {
        let step = self.prepare_decode(seq, sp, sample)?;
        self.submit_prepared(seq, step);
        Ok(())
    }

    /// Encodes the next decode step of `seq` without submitting it, so that the CPU work
    /// (parameters, command encoding) overlaps the GPU's work on the step before. The step
    /// consumes whatever token is in the slot when it runs; submit it with `submit_prepared`
    /// before any other decode step of this sequence, or drop it.
    pub fn prepare_decode(
        &self,
        seq: &mut Sequence,
        sp: &SamplingParams,
        sample: bool,
    ) -> Result<PreparedDecode> {
        self.prepare_decode_with(seq, sp, sample, false)
    }

    /// As `prepare_decode`; with `backup`, the step first copies the recurrent state it will
    /// overwrite, so that `undo_decode` can take it back once submitted (what `generate` uses
    /// to submit a step before it knows whether the token that step feeds ends the reply).
    pub fn prepare_decode_with(
        &self,
        seq: &mut Sequence,
        sp: &SamplingParams,
        sample: bool,
        backup: bool,
    ) -> Result<PreparedDecode> {
        self.check_room(seq, 1)?;
        if backup {
            seq.ensure_backup(&self.gpu)?;
        }
        // Decoding needs neither the prompt workspace nor the rings' prompt-chunk slack.
        self.release_prompt_workspace();
        seq.compact_rings(&self.gpu, &self.cfg)?;
        seq.ensure_capacity(
            &self.gpu,
            &self.cfg,
            seq.pos + 1,
            1,
            self.max_positions - self.cfg.n_meta,
        )?;
        let key = seq.layout_gen * 4 + sample as u64 * 2 + backup as u64;
        let reuse = matches!(&seq.decode, Some((_, k)) if *k == key);
        let params = if reuse {
            let mut rec = Recorder::params_only(&self.gpu);
            self.record_decode(&mut rec, seq, sp, sample, backup)?;
            Some(rec.into_params())
        } else {
            let mut rec = Recorder::new(&self.gpu);
            self.record_decode(&mut rec, seq, sp, sample, backup)?;
            seq.decode = Some((rec.finish(), key));
            None
        };
        let (prog, _) = seq.decode.as_ref().unwrap();
        Ok(PreparedDecode {
            commands: prog.commands(&self.gpu),
            params,
            pos: seq.pos,
            sample,
            backup,
        })
    }

    /// Submits a step from `prepare_decode` (its parameters are written to the queue first,
    /// so they never reach a step already submitted).
    pub fn submit_prepared(&self, seq: &mut Sequence, step: PreparedDecode) {
        self.submit_prepared_then(seq, step, None);
    }

    /// As `submit_prepared`, with `then` (e.g. a read-back copy) in the same submission;
    /// returns the submission's index.
    pub fn submit_prepared_then(
        &self,
        seq: &mut Sequence,
        step: PreparedDecode,
        then: Option<wgpu::CommandBuffer>,
    ) -> wgpu::SubmissionIndex {
        assert_eq!(step.pos, seq.pos, "a prepared decode step is stale");
        let (prog, _) = seq.decode.as_ref().expect("prepared step has a program");
        if let Some(bytes) = &step.params {
            prog.update_params(&self.gpu, bytes);
        }
        let index = self
            .gpu
            .queue
            .submit(std::iter::once(step.commands).chain(then));
        seq.pos += 1;
        if step.sample {
            seq.sampled += 1;
        }
        seq.undoable = step.backup.then_some(step.sample);
        index
    }

    /// Undoes the last submitted decode step, which must have been prepared with a backup
    /// (`prepare_decode_with`) and be the last thing submitted for `seq`: restores the recurrent
    /// state it overwrote (copies queued after it), moves the position back and, where it sampled, puts
    /// back the token slot (`before`: words 0..3 of the slot as they were before the step: the
    /// token it fed, the count of tokens sampled, that token's earlier repetition-penalty flag)
    /// and the flag of the token it chose. The KV entry it wrote is simply written again by the
    /// next step.
    pub async fn undo_decode(&self, seq: &mut Sequence, before: [u32; 3]) -> Result<()> {
        let Some(sampled) = seq.undoable.take() else {
            return Err(Error::Invalid(
                "no decode step to undo: the last step was not prepared with a backup, or \
                 something else ran on the sequence since"
                    .into(),
            ));
        };
        let bak = seq
            .backup
            .as_ref()
            .ok_or_else(|| Error::Invalid("undo_decode: no backup buffers".into()))?;
        let mut enc = self.gpu.device.create_command_encoder(&Default::default());
        for (l, (conv, ssm)) in seq.layers.iter().zip(bak) {
            enc.copy_buffer_to_buffer(conv, 0, &l.conv, 0, l.conv.size());
            enc.copy_buffer_to_buffer(ssm, 0, &l.ssm, 0, l.ssm.size());
        }
        self.gpu.queue.submit([enc.finish()]);
        if sampled {
            // The slot as the step left it: its chosen token and that token's earlier flag.
            let after = self.gpu.read_u32(&seq.tok_state, 0, 3).await?;
            self.gpu.write(&seq.tok_state, 0, &before);
            if after[2] == 0 {
                self.gpu.write(&seq.seen, after[0] as u64 * 4, &[0u32]);
            }
            seq.sampled -= 1;
        }
        seq.pos -= 1;
        Ok(())
    }

    /// Profiles one decode step (GPU time per dispatch, from timestamps), without advancing
    /// the sequence. Returns (kernel name, total ns, dispatch count) sorted by time.
    pub async fn profile_decode(
        &self,
        seq: &Sequence,
        sp: &SamplingParams,
    ) -> Result<Option<Vec<(String, f64, usize)>>> {
        let mut rec = Recorder::new(&self.gpu);
        self.record_decode(&mut rec, seq, sp, true, false)?;
        let prog = rec.finish();
        Ok(prog.profile(&self.gpu).await?.map(aggregate))
    }

    /// Profiles the prefill of one chunk of `ids` at the end of `seq` (the sequence is advanced).
    pub async fn profile_prefill(
        &self,
        seq: &mut Sequence,
        ids: &[u32],
    ) -> Result<Option<Vec<(String, f64, usize)>>> {
        let rows = ids.len().min(self.chunk);
        self.check_room(seq, rows)?;
        seq.ensure_capacity(
            &self.gpu,
            &self.cfg,
            seq.pos + rows,
            rows,
            self.max_positions - self.cfg.n_meta,
        )?;
        let ws = self.workspace_for(rows)?;
        self.gpu.write(&seq.ids, 0, &ids[..rows]);
        seq.undoable = None;
        let mut rec = Recorder::new(&self.gpu);
        self.record_chunk(
            &mut rec,
            &ws,
            seq,
            seq.pos,
            rows,
            0,
            &seq.ids.clone(),
            0,
            false,
            Logits::Last,
        )?;
        let prog = rec.finish();
        let r = prog.profile(&self.gpu).await?.map(aggregate);
        seq.pos += rows;
        seq.tokens.extend_from_slice(&ids[..rows]);
        Ok(r)
    }

    /// Reads the token id in the sequence's token slot.
    pub async fn read_token(&self, seq: &Sequence) -> Result<u32> {
        Ok(self.gpu.read_u32(&seq.tok_state, 0, 1).await?[0])
    }

    /// Reads the last logits row computed.
    pub async fn read_logits(&self) -> Result<Vec<f32>> {
        self.gpu
            .read_f32(&self.step.logits, 0, self.cfg.vocab_size as u64)
            .await
    }

    /// Teacher-forced decode step: feeds `id`, returns the logits for the next position.
    pub async fn decode_logits(&self, seq: &mut Sequence, id: u32) -> Result<Vec<f32>> {
        self.set_next_token(seq, id)?;
        self.submit_decode(seq, &SamplingParams::greedy(), false)?;
        seq.tokens.push(id);
        self.read_logits().await
    }

    /// Reads back a layer's KV cache as [n_kv_heads, positions, d] f32 with positions in order
    /// (only positions still held are returned: `first_pos..seq.pos`); an f16 cache is widened
    /// exactly.
    pub async fn read_kv(
        &self,
        seq: &Sequence,
        layer: usize,
    ) -> Result<Option<(Vec<f32>, Vec<f32>, usize)>> {
        let c = &self.cfg;
        let Some(kv) = seq.layers[layer].kv.as_ref() else {
            return Ok(None);
        };
        let cap = kv.cap(c.n_meta);
        let (kall, vall) = match kv.dtype {
            KvDtype::F32 => (
                self.gpu
                    .read_f32(&kv.k, 0, (c.n_kv_heads * cap * c.d_qk) as u64)
                    .await?,
                self.gpu
                    .read_f32(&kv.v, 0, (c.n_kv_heads * cap * c.d_v) as u64)
                    .await?,
            ),
            KvDtype::F16 => (
                unpack_f16_words(
                    &self
                        .gpu
                        .read_u32(&kv.k, 0, (c.n_kv_heads * cap * c.d_qk / 2) as u64)
                        .await?,
                ),
                unpack_f16_words(
                    &self
                        .gpu
                        .read_u32(&kv.v, 0, (c.n_kv_heads * cap * c.d_v / 2) as u64)
                        .await?,
                ),
            ),
        };
        let first_text = seq.pos.saturating_sub(kv.ring).max(c.n_meta);
        let positions: Vec<usize> = (0..c.n_meta.min(seq.pos))
            .chain(first_text..seq.pos)
            .collect();
        let mut ko = Vec::new();
        let mut vo = Vec::new();
        for h in 0..c.n_kv_heads {
            for &p in &positions {
                let s = if p < c.n_meta {
                    p
                } else {
                    c.n_meta + (p - c.n_meta) % kv.ring
                };
                ko.extend_from_slice(&kall[(h * cap + s) * c.d_qk..(h * cap + s + 1) * c.d_qk]);
                vo.extend_from_slice(&vall[(h * cap + s) * c.d_v..(h * cap + s + 1) * c.d_v]);
            }
        }
        Ok(Some((ko, vo, first_text)))
    }

    /// Reads back the GPU sampler's state: the token slot (chosen / fed token, tokens sampled,
    /// the chosen token's earlier flag, unused) and the repetition-penalty flags [vocab].
    pub async fn read_sampler_state(&self, seq: &Sequence) -> Result<(Vec<u32>, Vec<u32>)> {
        Ok((
            self.gpu.read_u32(&seq.tok_state, 0, 4).await?,
            self.gpu
                .read_u32(&seq.seen, 0, self.cfg.vocab_size as u64)
                .await?,
        ))
    }

    /// Reads back a layer's conv and SSM states.
    pub async fn read_ssm_state(
        &self,
        seq: &Sequence,
        layer: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let c = &self.cfg;
        let st = &seq.layers[layer];
        Ok((
            self.gpu
                .read_f32(&st.conv, 0, (c.d_inner * c.d_conv) as u64)
                .await?,
            self.gpu
                .read_f32(&st.ssm, 0, (c.d_inner * c.d_state) as u64)
                .await?,
        ))
    }
}
