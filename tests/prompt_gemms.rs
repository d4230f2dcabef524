//! The prompt GEMM paths that only models at real widths reach, checked at the model level:
//! `gemm_coop2` over the whole of K (products with at least 4096 outputs: in_proj, gate|up) and
//! split over K (narrow products with K >= 1024: out_proj, down). The golden fixtures are too
//! small for either. A random checkpoint with those widths runs the same prompt on the
//! tensor-core kernels and on the f32-FMA GEMM (a device opened without cooperative matrices);
//! the logits of every position must agree within the rounding of X to f16 that the
//! tensor-core path adds. Skipped, with the reason printed, where the adapter has no
//! cooperative matrices.

use hymba_engine::gpu::{Gpu, GpuOptions};
use hymba_engine::kernels::{Kernels, COOP_WIDE_MIN_M};
use hymba_engine::loader::Checkpoint;
use hymba_engine::model::{DtypeChoice, Logits, Model, ModelOptions};
use hymba_tests::{gpu, repo_root};
use std::sync::Arc;

/// The real Hymba-1.5B config narrowed to 3 layers (global, producer, consumer) at widths that
/// still take both paths, with a 64-token window so that a 300-token prompt wraps it.
fn config() -> String {
    let path = repo_root().join("tests/configs/hymba-1.5b-config.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut c: serde_json::Value = serde_json::from_str(&text).unwrap();
    let layers = 3;
    let set = |c: &mut serde_json::Value, k: &str, v: serde_json::Value| {
        c[k] = v;
    };
    set(&mut c, "hidden_size", 1024.into());
    set(&mut c, "intermediate_size", 2048.into());
    set(&mut c, "num_hidden_layers", layers.into());
    set(&mut c, "num_attention_heads", 16.into());
    set(&mut c, "num_key_value_heads", 4.into());
    set(&mut c, "global_attn_idx", serde_json::json!([0]));
    set(&mut c, "kv_reuse_group", serde_json::json!([[1, 2]]));
    set(&mut c, "layer_type", serde_json::json!(vec!["h"; layers]));
    let conv: serde_json::Map<String, serde_json::Value> =
        (0..layers).map(|i| (i.to_string(), 2048.into())).collect();
    set(&mut c, "conv_dim", conv.into());
    set(&mut c, "mamba_dt_rank", 64.into());
    set(&mut c, "num_memory_tokens", 16.into());
    set(&mut c, "sliding_window", 64.into());
    set(&mut c, "vocab_size", 512.into());
    c.to_string()
}

fn logits(gpu: Arc<Gpu>, kernels: Arc<Kernels>, ck: &Checkpoint, ids: &[u32]) -> Vec<f32> {
    let model = pollster::block_on(Model::load(
        gpu,
        kernels,
        ck,
        &ModelOptions {
            dtype: DtypeChoice::F16,
            ..Default::default()
        },
        |_, _| {},
    ))
    .unwrap();
    let mut seq = model.new_sequence().unwrap();
    pollster::block_on(model.forward(&mut seq, ids, Logits::All, None)).unwrap()
}

#[test]
fn tensor_core_prompt_gemms_agree_with_the_fma_gemm_at_real_widths() {
    let (coop_gpu, coop_kernels) = gpu();
    if !coop_gpu.coop_f16 {
        println!(
            "skipped: {} has no cooperative matrices (the paths under test need them)",
            coop_gpu.info.name
        );
        return;
    }
    let ck = Checkpoint::random(&config(), 7).unwrap();
    let c = &ck.config;
    // the shapes this test is for
    assert!(c.in_proj_rows(1) >= COOP_WIDE_MIN_M && 2 * c.intermediate >= COOP_WIDE_MIN_M);
    assert!(c.hidden < COOP_WIDE_MIN_M && c.d_inner >= 2048 && c.intermediate >= 2048);
    // 300 positions: a full 256-row chunk (whole 128-row tiles) and a 44-row one (edge tiles)
    let ids: Vec<u32> = (0..300).map(|i| 3 + (i * 37 + i * i) % 500).collect();
    let got = logits(coop_gpu.clone(), coop_kernels, &ck, &ids);

    let mut opts = GpuOptions {
        allow_coop_matrix: false,
        ..Default::default()
    };
    if let Ok(b) = std::env::var("HYMBA_BACKEND") {
        opts.backends = hymba_engine::gpu::parse_backends(&b).unwrap();
    }
    let fma_gpu = pollster::block_on(Gpu::new(&opts)).unwrap();
    assert!(!fma_gpu.coop_f16);
    let fma_kernels = Arc::new(Kernels::new(&fma_gpu).unwrap());
    let want = logits(Arc::new(fma_gpu), fma_kernels, &ck, &ids);

    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (mut worst, mut at) = (0f32, 0);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(g.is_finite(), "logit {i} is {g}");
        if (g - w).abs() > worst {
            worst = (g - w).abs();
            at = i;
        }
    }
    let vocab = c.vocab_size;
    let agree = (0..ids.len())
        .filter(|&t| {
            let row = |v: &[f32]| hymba_tests::argmax(&v[t * vocab..(t + 1) * vocab]);
            row(&got) == row(&want)
        })
        .count();
    println!(
        "tensor cores vs FMA GEMM: max |logit diff| {worst:.3e} at {} (row {}), logit scale {scale:.3}, top-1 agreement {agree}/{}",
        at % vocab,
        at / vocab,
        ids.len()
    );
    assert!(
        worst <= 2e-2 * scale.max(1.0),
        "logits differ by {worst} (scale {scale}) at position {} token {}",
        at / vocab,
        at % vocab
    );
}
