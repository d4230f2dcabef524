//! The golden fixtures (tests/fixtures/c1..c5) run in a browser through
//! wasm-bindgen-test, with the same checks and tolerances as the native golden
//! test for f32 weights:
//!  (a) prompt logits at every position (`nocache.logits`): one forward over the
//!      prompt from an empty sequence (meta tokens inline), `Logits::All`;
//!  (c) teacher-forced decoding: prefill from the meta-token prefix, then feed
//!      `gen.ids` one by one through the cached decode path and compare each step's
//!      logits with `gen.logits`; the greedy token must equal `gen.ids[k]` wherever
//!      the reference's top-2 margin exceeds 1e-3.
//! The bf16 case (c4) is compared with its float32 targets (`f32.*`).
//!
//! Run: see scripts/test-all.sh (wasm-bindgen-test-runner + chromedriver, headless
//! Chromium with WebGPU on SwiftShader).
#![cfg(target_arch = "wasm32")]

use hymba_engine::gpu::{Gpu, GpuOptions};
use hymba_engine::kernels::Kernels;
use hymba_engine::loader::Checkpoint;
use hymba_engine::model::{DtypeChoice, Logits, Model, ModelOptions};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

struct Case {
    name: &'static str,
    config: &'static str,
    model: &'static [u8],
    expected: &'static [u8],
    case: &'static str,
}

macro_rules! case {
    ($dir:literal) => {
        Case {
            name: $dir,
            config: include_str!(concat!("../../tests/fixtures/", $dir, "/config.json")),
            model: include_bytes!(concat!("../../tests/fixtures/", $dir, "/model.safetensors")),
            expected: include_bytes!(concat!(
                "../../tests/fixtures/",
                $dir,
                "/expected.safetensors"
            )),
            case: include_str!(concat!("../../tests/fixtures/", $dir, "/case.json")),
        }
    };
}

thread_local! {
    static GPU: RefCell<Option<(Arc<Gpu>, Arc<Kernels>)>> = const { RefCell::new(None) };
}

async fn gpu() -> (Arc<Gpu>, Arc<Kernels>) {
    if let Some(g) = GPU.with(|g| g.borrow().clone()) {
        return g;
    }
    let gpu = Arc::new(
        Gpu::new(&GpuOptions::default())
            .await
            .expect("WebGPU adapter (run Chromium with --enable-unsafe-webgpu)"),
    );
    console_log!(
        "adapter: {} ({:?}), shader-f16 {}",
        gpu.info.name,
        gpu.info.backend,
        gpu.shader_f16
    );
    let kernels = Arc::new(Kernels::new(&gpu).expect("kernels"));
    GPU.with(|g| *g.borrow_mut() = Some((gpu.clone(), kernels.clone())));
    (gpu, kernels)
}

fn expected(bytes: &[u8]) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let mut t = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            continue;
        }
        let v: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        t.insert(name, (view.shape().to_vec(), v));
    }
    t
}

/// Largest |got - want| and whether every element is within atol + rtol·|want|.
fn compare(got: &[f32], want: &[f32], atol: f32, rtol: f32) -> (f32, Option<usize>) {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let mut worst = 0f32;
    let mut bad = None;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = (g - w).abs();
        if !(e <= atol + rtol * w.abs()) && bad.is_none() {
            bad = Some(i);
        }
        if e > worst || e.is_nan() {
            worst = if e.is_nan() { f32::INFINITY } else { e };
        }
    }
    (worst, bad)
}

fn argmax(v: &[f32]) -> usize {
    let mut b = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[b] {
            b = i;
        }
    }
    b
}

fn top2_margin(v: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &x in v {
        if x > a {
            b = a;
            a = x;
        } else if x > b {
            b = x;
        }
    }
    a - b
}

const ATOL: f32 = 2e-3;
const RTOL: f32 = 1e-3;

async fn run(c: Case) {
    let (gpu, kernels) = gpu().await;
    run_with(c, gpu, kernels).await;
}

async fn run_with(c: Case, gpu: Arc<Gpu>, kernels: Arc<Kernels>) {
    let case: serde_json::Value = serde_json::from_str(c.case).unwrap();
    let ids = |k: &str| -> Vec<u32> {
        case[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    let prompt = ids("prompt_ids");
    let gen_ids = ids("generated_ids");
    let bf16_run = case["run_dtype"].as_str() == Some("bfloat16");
    let (k_nocache, k_gen) = if bf16_run {
        ("f32.nocache.logits", "f32.gen.logits")
    } else {
        ("nocache.logits", "gen.logits")
    };
    let exp = expected(c.expected);
    let ck = Checkpoint::from_bytes(
        c.config,
        vec![("model.safetensors".to_string(), c.model.to_vec())],
    )
    .unwrap();
    let opts = ModelOptions {
        dtype: DtypeChoice::F32,
        ..Default::default()
    };
    let model = Model::load(gpu, kernels, &ck, &opts, |_, _| {})
        .await
        .unwrap();
    let v = model.cfg.vocab_size;
    let mut failures = Vec::new();

    // (a) no-cache prompt logits.
    let mut seq = model.empty_sequence().unwrap();
    let logits = model
        .forward(&mut seq, &prompt, Logits::All, None)
        .await
        .unwrap();
    let want = &exp[k_nocache].1;
    let (ea, bad) = compare(&logits, want, ATOL, RTOL);
    if let Some(i) = bad {
        failures.push(format!(
            "(a) {k_nocache}: max |err| {ea:.3e}; first bad element {i} (row {}): got {}, want {}",
            i / v,
            logits[i],
            want[i]
        ));
    }

    // (c) teacher-forced decode.
    let mut seq = model.new_sequence().unwrap();
    let mut steps = vec![model
        .forward(&mut seq, &prompt, Logits::Last, None)
        .await
        .unwrap()];
    for k in 1..gen_ids.len() {
        steps.push(model.decode_logits(&mut seq, gen_ids[k - 1]).await.unwrap());
    }
    let (shape, all) = &exp[k_gen];
    assert_eq!(shape[0], gen_ids.len());
    let mut ec = 0f32;
    let (mut greedy_ok, mut greedy_checked) = (0, 0);
    for (k, l) in steps.iter().enumerate() {
        let want = &all[k * v..(k + 1) * v];
        let (e, bad) = compare(l, want, ATOL, RTOL);
        ec = ec.max(e);
        if let Some(i) = bad {
            failures.push(format!(
                "(c) {k_gen} step {k}: max |err| {e:.3e}; first bad token {i}: got {}, want {}",
                l[i], want[i]
            ));
        }
        if top2_margin(want) > 1e-3 {
            greedy_checked += 1;
            if argmax(l) as u32 == gen_ids[k] {
                greedy_ok += 1;
            } else {
                failures.push(format!(
                    "(c) step {k}: greedy token {} but the reference chose {}",
                    argmax(l),
                    gen_ids[k]
                ));
            }
        }
    }
    console_log!(
        "{}: (a) prompt logits max|err| {ea:.2e}; (c) {} teacher-forced steps max|err| {ec:.2e}, greedy {greedy_ok}/{greedy_checked} (atol {ATOL}, rtol {RTOL})",
        c.name,
        gen_ids.len()
    );
    assert!(
        failures.is_empty(),
        "{}: {} checks failed:\n{}",
        c.name,
        failures.len(),
        failures.join("\n")
    );
}

#[wasm_bindgen_test]
async fn golden_c1_global_small() {
    run(case!("c1_global_small")).await;
}

#[wasm_bindgen_test]
async fn golden_c2_swa_reuse() {
    run(case!("c2_swa_reuse")).await;
}

#[wasm_bindgen_test]
async fn golden_c3_real_layout_mini() {
    run(case!("c3_real_layout_mini")).await;
}

#[wasm_bindgen_test]
async fn golden_c4_bf16() {
    run(case!("c4_bf16")).await;
}

#[wasm_bindgen_test]
async fn golden_c5_real_vocab_text() {
    run(case!("c5_real_vocab_text")).await;
}

/// The kernel family GPUs get (workgroup GEMVs, the GQA decode attention, the four-lane scan,
/// the per-layer branch buffers of the decode step), compiled and run in the browser: Chromium's
/// WGSL compiler (Tint) checks uniformity, which naga does not, and a browser on a GPU adapter
/// compiles these kernels. Same checks as the other golden tests, on c3 (GQA, sliding window,
/// KV reuse).
#[wasm_bindgen_test]
async fn golden_c3_with_the_gpu_kernel_family() {
    let (gpu, _) = gpu().await;
    let kernels = Arc::new(Kernels::new_with(&gpu, false).expect("GPU-family kernels compile"));
    assert!(!kernels.cpu_adapter());
    run_with(case!("c3_real_layout_mini"), gpu, kernels).await;
}
