//! wasm-bindgen exports. Methods that run GPU work return Promises built from
//! futures holding an `Rc` of the state, so they never borrow across awaits.

use crate::chat::{next_turn_ids, render, split_system, Message, StopFilter, REPLY_STOPS};
use crate::{GenOptions, LoadOptions, REQUIRED_LIMITS};
use hymba_engine::cache::Sequence;
use hymba_engine::config::HymbaConfig;
use hymba_engine::generate::{GenerateOptions, Generation, StopReason};
use hymba_engine::gpu::{describe_adapter, Gpu, GpuOptions};
use hymba_engine::kernels::Kernels;
use hymba_engine::loader::{expected_tensors, shard_names, TensorStream};
use hymba_engine::model::{DtypeChoice, Model, ModelBuilder, ModelOptions};
use hymba_engine::sampling::SamplingParams;
use hymba_engine::tokenizer::Tokenizer;
use hymba_engine::Error;
use js_sys::{Function, Promise, Reflect};
use serde_json::{json, Value};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{future_to_promise, JsFuture};

#[wasm_bindgen(start)]
pub fn start() {
    std::panic::set_hook(Box::new(|info| {
        web_sys::console::error_1(&format!("hymba-web panicked: {info}").into());
    }));
}

/// A JS `Error` with a `name` the wrapper and pages can branch on.
fn js_error(name: &str, msg: &str) -> JsValue {
    let e = js_sys::Error::new(msg);
    e.set_name(name);
    e.into()
}

fn engine_error(e: Error) -> JsValue {
    let name = match &e {
        Error::NoAdapter(_) | Error::Device(_) => "WebGPUUnavailable",
        Error::GpuLimit { .. } => "LimitTooSmall",
        Error::ContextTooLong { .. } => "ContextTooLong",
        Error::Tokenizer(_) => "TokenizerError",
        Error::Config { .. }
        | Error::Unsupported(_)
        | Error::Safetensors { .. }
        | Error::MissingTensor { .. }
        | Error::Shape { .. }
        | Error::Dtype { .. }
        | Error::MissingFile { .. } => "ModelError",
        _ => "HymbaError",
    };
    let msg = match &e {
        // The engine's text names CLI flags; say it for the browser.
        Error::GpuLimit { what, needed, limit, limit_name } => format!(
            "GPU limit too small: {what} needs {needed} bytes but this WebGPU adapter allows {limit} ({}); try dtype \"f16\" or a smaller model (splitting large tensors across bindings is not implemented)",
            webgpu_limit_name(limit_name)
        ),
        _ => e.to_string(),
    };
    js_error(name, &msg)
}

fn webgpu_limit_name(wgpu_name: &str) -> String {
    // max_storage_buffer_binding_size -> maxStorageBufferBindingSize
    let mut out = String::new();
    let mut up = false;
    for c in wgpu_name.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn parse_json<T: serde::de::DeserializeOwned + Default>(
    s: Option<String>,
    what: &str,
) -> Result<T, JsValue> {
    match s.as_deref().map(str::trim) {
        None | Some("") | Some("null") | Some("undefined") => Ok(T::default()),
        Some(t) => serde_json::from_str(t)
            .map_err(|e| js_error("TypeError", &format!("invalid {what}: {e}"))),
    }
}

/// Resolves after a macrotask, letting the page (or the worker's message queue) run.
async fn yield_now() {
    let p = Promise::new(&mut |resolve, _| {
        let g = js_sys::global();
        if let Ok(f) = Reflect::get(&g, &"setTimeout".into()).and_then(|f| f.dyn_into::<Function>())
        {
            let _ = f.call2(&g, &resolve, &JsValue::from(0));
        } else {
            let _ = resolve.call0(&JsValue::NULL);
        }
    });
    let _ = JsFuture::from(p).await;
}

/// `navigator.gpu`, if this context has WebGPU.
fn navigator_gpu() -> Option<JsValue> {
    let nav = Reflect::get(&js_sys::global(), &"navigator".into()).ok()?;
    if nav.is_undefined() || nav.is_null() {
        return None;
    }
    let gpu = Reflect::get(&nav, &"gpu".into()).ok()?;
    (!gpu.is_undefined() && !gpu.is_null()).then_some(gpu)
}

/// Why WebGPU cannot be used here (empty string when `navigator.gpu` exists).
/// Does not request an adapter; `Engine.create` does.
#[wasm_bindgen(js_name = webgpuMissingReason)]
pub fn webgpu_missing_reason() -> String {
    if navigator_gpu().is_some() {
        return String::new();
    }
    let secure = Reflect::get(&js_sys::global(), &"isSecureContext".into())
        .ok()
        .and_then(|v| v.as_bool());
    if secure == Some(false) {
        "WebGPU is only available on secure pages (https:// or http://localhost); this page is not a secure context".into()
    } else {
        "this browser does not expose WebGPU (navigator.gpu is missing); use a recent Chrome or Edge (113+), Safari 26+, or Firefox 141+ on Windows".into()
    }
}

fn limit_value(l: &wgpu::Limits, name: &str) -> u64 {
    match name {
        "maxComputeInvocationsPerWorkgroup" => l.max_compute_invocations_per_workgroup as u64,
        "maxComputeWorkgroupSizeX" => l.max_compute_workgroup_size_x as u64,
        "maxComputeWorkgroupStorageSize" => l.max_compute_workgroup_storage_size as u64,
        "maxStorageBuffersPerShaderStage" => l.max_storage_buffers_per_shader_stage as u64,
        "maxComputeWorkgroupsPerDimension" => l.max_compute_workgroups_per_dimension as u64,
        _ => 0,
    }
}

struct EngineInner {
    gpu: Arc<Gpu>,
    kernels: Arc<Kernels>,
}

/// A WebGPU device with the engine's kernels compiled.
#[wasm_bindgen]
pub struct Engine {
    inner: Rc<EngineInner>,
}

#[wasm_bindgen]
impl Engine {
    /// Requests an adapter and a device with the adapter's limits, checks what the
    /// kernels need and compiles them. Rejects with `name` "WebGPUUnavailable" or
    /// "LimitTooSmall" and a message naming the cause.
    pub async fn create(options_json: Option<String>) -> Result<Engine, JsValue> {
        #[derive(Default, serde::Deserialize)]
        #[serde(default)]
        struct O {
            allow_shader_f16: Option<bool>,
            /// Caps of the device request (WebGPU names): e.g. the defaults, 134217728 and
            /// 268435456, to check that a model loads on any conforming adapter.
            #[serde(rename = "maxStorageBufferBindingSize")]
            max_storage_buffer_binding_size: Option<u64>,
            #[serde(rename = "maxBufferSize")]
            max_buffer_size: Option<u64>,
        }
        let o: O = parse_json(options_json, "engine options")?;
        if navigator_gpu().is_none() {
            return Err(js_error(
                "WebGPUUnavailable",
                &format!("WebGPU is not available: {}", webgpu_missing_reason()),
            ));
        }
        let opts = GpuOptions {
            allow_shader_f16: o.allow_shader_f16.unwrap_or(true),
            max_storage_buffer_binding_size: o.max_storage_buffer_binding_size,
            max_buffer_size: o.max_buffer_size,
            ..GpuOptions::default()
        };
        let gpu = Gpu::new(&opts).await.map_err(|e| match e {
            Error::NoAdapter(m) => js_error(
                "WebGPUUnavailable",
                &format!("WebGPU is present but gave no adapter ({m}). The browser may block this GPU or a software renderer (in Chrome, see chrome://gpu; chrome://flags/#enable-unsafe-webgpu allows blocklisted adapters), or WebGPU is disabled"),
            ),
            other => engine_error(other),
        })?;
        for (name, need) in REQUIRED_LIMITS {
            let have = limit_value(&gpu.limits, name);
            if have < need {
                return Err(js_error("LimitTooSmall", &format!("this WebGPU adapter ({}) has {name} = {have}; the Hymba kernels need at least {need}", gpu.info.name)));
            }
        }
        let kernels = Kernels::new(&gpu).map_err(engine_error)?;
        gpu.finish().await.map_err(engine_error)?;
        // The engine's API shares these as `Arc` (native callers may use threads); a browser
        // tab runs them on one thread, where wgpu's WebGPU types are neither Send nor Sync.
        #[allow(clippy::arc_with_non_send_sync)]
        Ok(Engine {
            inner: Rc::new(EngineInner {
                gpu: Arc::new(gpu),
                kernels: Arc::new(kernels),
            }),
        })
    }

    /// Adapter, features and limits as JSON.
    pub fn info(&self) -> String {
        let g = &self.inner.gpu;
        let l = &g.limits;
        json!({
            "adapter": describe_adapter(&g.info),
            "name": g.info.name,
            "backend": format!("{:?}", g.info.backend),
            "deviceType": format!("{:?}", g.info.device_type),
            "shaderF16": g.shader_f16,
            "limits": {
                "maxStorageBufferBindingSize": l.max_storage_buffer_binding_size,
                "maxBufferSize": l.max_buffer_size,
                "maxComputeWorkgroupStorageSize": l.max_compute_workgroup_storage_size,
                "maxComputeInvocationsPerWorkgroup": l.max_compute_invocations_per_workgroup,
                "maxStorageBuffersPerShaderStage": l.max_storage_buffers_per_shader_stage,
                "maxComputeWorkgroupsPerDimension": l.max_compute_workgroups_per_dimension,
            }
        })
        .to_string()
    }

    /// Starts loading a model whose safetensors files are then streamed through the returned
    /// [`ModelLoader`] (`beginFile`, `push` chunks, `endFile`, then `finish`). Each tensor is
    /// converted and uploaded as soon as its bytes are in and then dropped, so wasm memory holds
    /// about one tensor, never a whole file.
    #[wasm_bindgen(js_name = beginLoad)]
    pub fn begin_load(
        &self,
        config_json: String,
        tokenizer_json: Option<Vec<u8>>,
        tokenizer_config_json: Option<String>,
        options_json: Option<String>,
    ) -> Result<ModelLoader, JsValue> {
        let opts: LoadOptions = parse_json(options_json, "load options")?;
        let cfg = HymbaConfig::from_json_str(&config_json, "config.json").map_err(engine_error)?;
        let tokenizer = match tokenizer_json {
            Some(t) => Some(Tokenizer::from_bytes(&t).map_err(engine_error)?),
            None => None,
        };
        let chat_template = tokenizer_config_json
            .as_deref()
            .and_then(|t| serde_json::from_str::<Value>(t).ok())
            .and_then(|v| {
                v.get("chat_template")
                    .and_then(|c| c.as_str().map(|s| s.contains("extra_id_1")))
            })
            .unwrap_or(false);
        let dtype = match opts.dtype.as_deref().unwrap_or("auto") {
            "auto" => DtypeChoice::Auto,
            "f32" => DtypeChoice::F32,
            "f16" => DtypeChoice::F16,
            "q8" => DtypeChoice::Q8,
            "q4" => DtypeChoice::Q4,
            d => {
                return Err(js_error(
                    "TypeError",
                    &format!("unknown dtype {d:?} (expected auto, f32, f16, q8 or q4)"),
                ))
            }
        };
        let mut mopts = ModelOptions {
            dtype,
            ..ModelOptions::default()
        };
        mopts.chunk = opts.chunk;
        mopts.max_positions = opts.max_positions;
        let expected = expected_tensors(&cfg).into_iter().collect();
        let builder = ModelBuilder::new(
            self.inner.gpu.clone(),
            self.inner.kernels.clone(),
            cfg,
            &mopts,
        )
        .map_err(engine_error)?;
        Ok(ModelLoader {
            builder: Some(builder),
            expected,
            stream: None,
            tokenizer,
            chat_template,
            name: opts.name.unwrap_or_else(|| "model".into()),
        })
    }
}

/// A model being loaded from streamed safetensors files (see `Engine.beginLoad`).
#[wasm_bindgen]
pub struct ModelLoader {
    builder: Option<ModelBuilder>,
    /// Tensor name -> shape from config.json, for checking each file's header.
    expected: HashMap<String, Vec<usize>>,
    stream: Option<TensorStream>,
    tokenizer: Option<Tokenizer>,
    chat_template: bool,
    name: String,
}

impl ModelLoader {
    fn builder(&mut self) -> Result<&mut ModelBuilder, JsValue> {
        self.builder.as_mut().ok_or_else(|| {
            js_error(
                "InvalidStateError",
                "this loader has finished or failed; start a new load",
            )
        })
    }
}

#[wasm_bindgen]
impl ModelLoader {
    /// Starts the next safetensors file (files are streamed one after another).
    #[wasm_bindgen(js_name = beginFile)]
    pub fn begin_file(&mut self, name: String) -> Result<(), JsValue> {
        self.builder()?;
        if let Some(s) = &self.stream {
            return Err(js_error(
                "InvalidStateError",
                &format!("beginFile({name}) before endFile() of {}", s.file()),
            ));
        }
        self.stream = Some(TensorStream::new(&name));
        Ok(())
    }

    /// The next bytes of the current file. Every tensor they complete is converted,
    /// uploaded and dropped before this returns. Returns the bytes of tensors still held
    /// on the CPU (the current partial tensor and small pieces waiting for partners).
    pub fn push(&mut self, chunk: &[u8]) -> Result<f64, JsValue> {
        let mut builder = self
            .builder
            .take()
            .ok_or_else(|| js_error("InvalidStateError", "this loader has finished or failed"))?;
        let Some(stream) = self.stream.as_mut() else {
            self.builder = Some(builder);
            return Err(js_error("InvalidStateError", "push() before beginFile()"));
        };
        let expected = &self.expected;
        let wanted = |name: &str, shape: &[usize]| -> hymba_engine::Result<bool> {
            match expected.get(name) {
                Some(want) if want.as_slice() != shape => Err(Error::Shape {
                    name: name.to_string(),
                    found: shape.to_vec(),
                    expected: want.clone(),
                }),
                Some(_) => Ok(true),
                None => Ok(false),
            }
        };
        let r = stream.push(chunk, &wanted, &mut |t| match t.quantized() {
            // A pre-quantized file's packed words go to the GPU as they are.
            Some(dt) => builder.add_quantized(&t.name, &t.shape, dt, t.bytes),
            None => {
                let data = t.to_f32();
                drop(t.bytes);
                builder.add(&t.name, &t.shape, data)
            }
        });
        // A failed load keeps nothing: the builder (and its GPU buffers) is dropped.
        r.map_err(engine_error)?;
        let held = builder.pending_bytes() + stream.buffered_bytes();
        self.builder = Some(builder);
        Ok(held as f64)
    }

    /// Ends the current file; an error when it was cut short.
    #[wasm_bindgen(js_name = endFile)]
    pub fn end_file(&mut self) -> Result<(), JsValue> {
        let s = self
            .stream
            .take()
            .ok_or_else(|| js_error("InvalidStateError", "endFile() before beginFile()"))?;
        if let Err(e) = s.finish() {
            self.builder = None;
            return Err(engine_error(e));
        }
        Ok(())
    }

    /// Assembles the model once all files are in (an error names a missing tensor) and
    /// resolves to a `HymbaModel`.
    pub fn finish(&mut self) -> Promise {
        let builder = self.builder.take();
        let tokenizer = self.tokenizer.take();
        let chat_template = self.chat_template;
        let name = std::mem::take(&mut self.name);
        let open = self.stream.take().map(|s| s.file().to_string());
        future_to_promise(async move {
            if let Some(f) = open {
                return Err(js_error(
                    "InvalidStateError",
                    &format!("finish() before endFile() of {f}"),
                ));
            }
            let builder = builder.ok_or_else(|| {
                js_error("InvalidStateError", "this loader has finished or failed")
            })?;
            yield_now().await;
            let model = builder.finish().await.map_err(engine_error)?;
            Ok(HymbaModel {
                inner: Rc::new(ModelInner {
                    model: RefCell::new(Some(Rc::new(model))),
                    tokenizer,
                    chat_template,
                    name,
                    state: RefCell::new(State::default()),
                    busy: Cell::new(false),
                    cancel: Cell::new(false),
                }),
            }
            .into())
        })
    }
}

/// Bytes of this module's WebAssembly memory (it only grows, so this is the peak so far).
#[wasm_bindgen(js_name = wasmMemoryBytes)]
pub fn wasm_memory_bytes() -> f64 {
    (core::arch::wasm32::memory_size(0) * 65536) as f64
}

/// The safetensors shard file names listed by a `model.safetensors.index.json`.
#[wasm_bindgen(js_name = shardNames)]
pub fn shard_names_js(index_json: &str) -> Result<Vec<String>, JsValue> {
    shard_names(index_json, "model.safetensors.index.json").map_err(engine_error)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Completion,
    Chat,
}

struct Last {
    gen: Generation,
    mode: Mode,
}

#[derive(Default)]
struct State {
    seq: Option<Sequence>,
    last: Option<Last>,
    /// The chat (system, turns incl. the last reply) that the cache holds.
    history: Option<(Option<String>, Vec<Message>)>,
    stats: Option<Value>,
}

struct ModelInner {
    model: RefCell<Option<Rc<Model>>>,
    tokenizer: Option<Tokenizer>,
    chat_template: bool,
    name: String,
    state: RefCell<State>,
    busy: Cell<bool>,
    cancel: Cell<bool>,
}

impl ModelInner {
    fn model(&self) -> Result<Rc<Model>, JsValue> {
        self.model
            .borrow()
            .clone()
            .ok_or_else(|| js_error("InvalidStateError", "this model was disposed"))
    }
    fn tokenizer(&self) -> Result<&Tokenizer, JsValue> {
        self.tokenizer.as_ref().ok_or_else(|| {
            js_error(
                "TokenizerError",
                "this model was loaded without tokenizer.json; pass token ids instead of text",
            )
        })
    }
}

struct BusyGuard(Rc<ModelInner>);
impl BusyGuard {
    fn take(inner: &Rc<ModelInner>) -> Result<BusyGuard, JsValue> {
        if inner.busy.get() {
            return Err(js_error(
                "InvalidStateError",
                "the model is already generating; wait for it or cancel() first",
            ));
        }
        inner.busy.set(true);
        Ok(BusyGuard(inner.clone()))
    }
}
impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.busy.set(false);
    }
}

fn stop_name(s: StopReason) -> &'static str {
    match s {
        StopReason::Eos => "eos",
        StopReason::StopString => "stop_string",
        StopReason::MaxTokens => "max_tokens",
        StopReason::Cancelled => "cancelled",
        StopReason::ContextFull => "context_full",
    }
}

fn finish_reason(s: StopReason) -> &'static str {
    match s {
        StopReason::Eos | StopReason::StopString => "stop",
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        StopReason::Cancelled => "cancelled",
    }
}

/// One generation on `seq`: streams filtered text pieces to `on_token(piece, id)`.
#[allow(clippy::too_many_arguments)]
async fn run_generation(
    inner: &Rc<ModelInner>,
    model: &Model,
    seq: &mut Sequence,
    ids: &[u32],
    o: &GenOptions,
    stops: Vec<String>,
    trim_leading: bool,
    on_token: Option<Function>,
) -> Result<(Generation, String), JsValue> {
    let seed = o
        .seed
        .unwrap_or_else(|| (js_sys::Math::random() * 4294967296.0) as u64);
    let gopts = GenerateOptions {
        max_new_tokens: o.max_tokens,
        sampling: SamplingParams {
            temperature: o.temperature,
            top_k: o.top_k,
            top_p: o.top_p,
            repetition_penalty: o.repetition_penalty,
            seed,
        },
        stop_strings: if inner.tokenizer.is_some() {
            stops.clone()
        } else {
            Vec::new()
        },
        stop_at_eos: !o.ignore_eos,
    };
    inner.cancel.set(false);
    let mut filter = StopFilter::new(&stops);
    let mut shown = String::new();
    let g = {
        let shown = &mut shown;
        let filter = &mut filter;
        let cb = |ev: hymba_engine::generate::TokenEvent<'_>| -> bool {
            let mut s = filter.push(ev.text);
            if trim_leading && shown.is_empty() {
                s = s.trim_start().to_string();
            }
            shown.push_str(&s);
            let mut go_on = true;
            if let Some(f) = &on_token {
                match f.call2(
                    &JsValue::NULL,
                    &JsValue::from_str(&s),
                    &JsValue::from(ev.id),
                ) {
                    Ok(v) => go_on = v.as_bool() != Some(false),
                    Err(e) => {
                        web_sys::console::error_2(
                            &"hymba-web: the token callback threw; cancelling:".into(),
                            &e,
                        );
                        go_on = false;
                    }
                }
            }
            go_on && !inner.cancel.get()
        };
        model
            .generate(seq, ids, &gopts, inner.tokenizer.as_ref(), cb)
            .await
            .map_err(engine_error)?
    };
    if g.stop != StopReason::StopString {
        let rest = filter.flush();
        if !rest.is_empty() {
            shown.push_str(&rest);
            if let Some(f) = &on_token {
                let _ = f.call2(
                    &JsValue::NULL,
                    &JsValue::from_str(&rest),
                    &JsValue::from(-1),
                );
            }
        }
    }
    Ok((g, shown))
}

fn stats_json(model: &Model, seq: &Sequence, g: &Generation, prefill_tokens: usize) -> Value {
    json!({
        "prefill_tokens": prefill_tokens,
        "prefill_secs": g.prefill_secs,
        "prefill_tok_s": g.prefill_tok_s(),
        "generated_tokens": g.ids.len(),
        "decode_secs": g.decode_secs,
        "decode_tok_s": g.decode_tok_s(),
        "cache_bytes": g.cache_bytes,
        "kv_dtype": model.kv_dtype.name(),
        "weight_bytes": model.weight_bytes(),
        "weights": hymba_engine::model::group_weight_report(model.weight_report()),
        "activation_bytes": model.activation_bytes(),
        "gpu_bytes": g.cache_bytes + model.weight_bytes() + model.activation_bytes(),
        "position": seq.position(),
        "max_positions": model.max_positions,
        "stop_reason": stop_name(g.stop),
    })
}

fn ids_from_js(v: &JsValue) -> Option<Vec<u32>> {
    if let Some(a) = v.dyn_ref::<js_sys::Uint32Array>() {
        return Some(a.to_vec());
    }
    if js_sys::Array::is_array(v) {
        let a: &js_sys::Array = v.unchecked_ref();
        return a.iter().map(|x| x.as_f64().map(|f| f as u32)).collect();
    }
    None
}

/// A loaded model with one conversation (sequence) and its tokenizer.
#[wasm_bindgen]
pub struct HymbaModel {
    inner: Rc<ModelInner>,
}

#[wasm_bindgen]
impl HymbaModel {
    /// Config and memory facts as JSON.
    pub fn info(&self) -> String {
        let m = self.inner.model.borrow();
        let Some(m) = m.as_ref() else {
            return json!({"disposed": true}).to_string();
        };
        let c = &m.cfg;
        json!({
            "name": self.inner.name,
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden,
            "layers": c.n_layers,
            "meta_tokens": c.n_meta,
            "parameters": c.parameter_count(),
            "dtype": m.dtype.name(),
            "weight_bytes": m.weight_bytes(),
            "max_positions": m.max_positions,
            "eos_token_ids": c.eos_token_ids,
            "has_tokenizer": self.inner.tokenizer.is_some(),
            "chat_template": self.inner.chat_template,
        })
        .to_string()
    }

    /// Text to token ids (`add_special` adds BOS like the Hugging Face tokenizer).
    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>, JsValue> {
        self.inner
            .tokenizer()?
            .encode(text, add_special)
            .map_err(engine_error)
    }

    /// Token ids to text (special tokens skipped).
    pub fn decode(&self, ids: Vec<u32>) -> Result<String, JsValue> {
        self.inner
            .tokenizer()?
            .decode(&ids, true)
            .map_err(engine_error)
    }

    /// Raw completion of `prompt` (a string, or token ids). Options (JSON): max_tokens,
    /// temperature, top_k, top_p, repetition_penalty, seed, stop, ignore_eos, continue,
    /// add_special_tokens. `on_token(piece, id)` streams; returning false cancels.
    /// Resolves to a JSON string {text, ids, finish_reason, usage, stats}.
    pub fn generate(
        &self,
        prompt: JsValue,
        options_json: Option<String>,
        on_token: Option<Function>,
    ) -> Promise {
        let inner = self.inner.clone();
        future_to_promise(async move {
            let o: GenOptions = parse_json(options_json, "generation options")?;
            let _busy = BusyGuard::take(&inner)?;
            let model = inner.model()?;
            let (mut seq, last) = {
                let mut st = inner.state.borrow_mut();
                st.history = None;
                (st.seq.take(), st.last.take())
            };
            let continuing = o.continue_ && seq.is_some();
            let mut ids = Vec::new();
            if continuing {
                if let Some(l) = &last {
                    if l.gen.stop != StopReason::Eos {
                        if let Some(&t) = l.gen.ids.last() {
                            ids.push(t);
                        }
                    }
                }
            } else {
                seq = None;
            }
            let mut seq = match seq {
                Some(s) => s,
                None => model.new_sequence().map_err(engine_error)?,
            };
            if let Some(text) = prompt.as_string() {
                if !text.is_empty() {
                    let add = o.add_special_tokens.unwrap_or(!continuing);
                    ids.extend(
                        inner
                            .tokenizer()?
                            .encode(&text, add)
                            .map_err(engine_error)?,
                    );
                }
            } else if let Some(v) = ids_from_js(&prompt) {
                ids.extend(v);
            } else if !prompt.is_undefined() && !prompt.is_null() {
                return Err(js_error(
                    "TypeError",
                    "prompt must be a string, an array of token ids or a Uint32Array",
                ));
            }
            let cached = seq.position();
            let res = run_generation(
                &inner,
                &model,
                &mut seq,
                &ids,
                &o,
                o.stop.clone(),
                false,
                on_token,
            )
            .await;
            let mut st = inner.state.borrow_mut();
            let (g, text) = match res {
                Ok(x) => x,
                Err(e) => {
                    st.last = None;
                    return Err(e);
                }
            };
            let stats = stats_json(&model, &seq, &g, ids.len());
            let out = json!({
                "text": text,
                "ids": g.ids,
                "finish_reason": finish_reason(g.stop),
                "usage": {"prompt_tokens": ids.len(), "completion_tokens": g.ids.len(), "cached_positions": cached},
                "stats": stats,
            });
            st.stats = Some(stats);
            st.seq = Some(seq);
            st.last = Some(Last {
                gen: g,
                mode: Mode::Completion,
            });
            Ok(JsValue::from_str(&out.to_string()))
        })
    }

    /// One assistant reply to an OpenAI-style message list (JSON [{role, content}]),
    /// rendered with the Hymba Instruct template. When the list extends the
    /// conversation the cache holds (same system text and turns, with the last reply
    /// as returned), only the new user turn is prefilled.
    pub fn chat(
        &self,
        messages_json: String,
        options_json: Option<String>,
        on_token: Option<Function>,
    ) -> Promise {
        let inner = self.inner.clone();
        future_to_promise(async move {
            let o: GenOptions = parse_json(options_json, "generation options")?;
            let messages: Vec<Message> = serde_json::from_str(&messages_json)
                .map_err(|e| js_error("TypeError", &format!("invalid messages: {e}")))?;
            let _busy = BusyGuard::take(&inner)?;
            let model = inner.model()?;
            let tok = inner.tokenizer()?;
            let (system, turns) = split_system(&messages);
            let Some(user) = turns
                .last()
                .filter(|m| m.role == "user")
                .map(|m| m.content.clone())
            else {
                return Err(js_error(
                    "TypeError",
                    "the last message must have role \"user\"",
                ));
            };
            let (seq, last, history) = {
                let mut st = inner.state.borrow_mut();
                (st.seq.take(), st.last.take(), st.history.take())
            };
            let prior = (system.clone(), turns[..turns.len() - 1].to_vec());
            let (mut seq, ids, continued) = match (seq, last, history) {
                (Some(seq), Some(last), Some(h))
                    if last.mode == Mode::Chat && h == prior && !prior.1.is_empty() =>
                {
                    let ids = next_turn_ids(tok, &last.gen, &last.gen.text, &user)
                        .map_err(engine_error)?;
                    (seq, ids, true)
                }
                _ => {
                    let text =
                        render(system.as_deref(), &turns).map_err(|e| js_error("TypeError", &e))?;
                    let ids = tok.encode(&text, false).map_err(engine_error)?;
                    (model.new_sequence().map_err(engine_error)?, ids, false)
                }
            };
            let mut stops: Vec<String> = REPLY_STOPS.iter().map(|s| s.to_string()).collect();
            stops.extend(o.stop.iter().cloned());
            let cached = seq.position();
            let res =
                run_generation(&inner, &model, &mut seq, &ids, &o, stops, true, on_token).await;
            let (g, text) = res?;
            let reply = text.trim_end().to_string();
            let stats = stats_json(&model, &seq, &g, ids.len());
            let out = json!({
                "text": reply,
                "ids": g.ids,
                "finish_reason": finish_reason(g.stop),
                "continued": continued,
                "usage": {"prompt_tokens": ids.len(), "completion_tokens": g.ids.len(), "cached_positions": cached},
                "stats": stats,
            });
            let mut st = inner.state.borrow_mut();
            let mut h = turns;
            h.push(Message {
                role: "assistant".into(),
                content: reply,
            });
            st.history = Some((system, h));
            st.stats = Some(stats);
            st.seq = Some(seq);
            st.last = Some(Last {
                gen: g,
                mode: Mode::Chat,
            });
            Ok(JsValue::from_str(&out.to_string()))
        })
    }

    /// Stops the running generation after the current token.
    pub fn cancel(&self) {
        self.inner.cancel.set(true);
    }

    /// True while a generate/chat call runs.
    pub fn busy(&self) -> bool {
        self.inner.busy.get()
    }

    /// Forgets the conversation (the next call starts from the meta-token prefix).
    pub fn reset(&self) -> Result<(), JsValue> {
        if self.inner.busy.get() {
            return Err(js_error(
                "InvalidStateError",
                "cannot reset while generating; cancel() first",
            ));
        }
        let mut st = self.inner.state.borrow_mut();
        st.seq = None;
        st.last = None;
        st.history = None;
        Ok(())
    }

    /// Statistics of the last call as JSON (null before the first).
    pub fn stats(&self) -> String {
        self.inner
            .state
            .borrow()
            .stats
            .clone()
            .unwrap_or(Value::Null)
            .to_string()
    }

    /// Releases the GPU buffers (weights when no call is running, and the cache).
    pub fn dispose(&self) {
        self.inner.cancel.set(true);
        if !self.inner.busy.get() {
            let mut st = self.inner.state.borrow_mut();
            st.seq = None;
            st.last = None;
        }
        self.inner.model.borrow_mut().take();
    }
}
