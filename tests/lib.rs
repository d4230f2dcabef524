//! Shared helpers for the integration tests: one GPU device per test binary,
//! fixture discovery (the project's copy plus `$HYMBA_EXTRA_FIXTURES`), and
//! tolerance comparison that reports the worst element.

use hymba_engine::gpu::{Gpu, GpuOptions};
use hymba_engine::kernels::Kernels;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

pub fn gpu() -> (Arc<Gpu>, Arc<Kernels>) {
    static ENV: OnceLock<(Arc<Gpu>, Arc<Kernels>)> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut opts = GpuOptions::default();
        if let Ok(b) = std::env::var("HYMBA_BACKEND") {
            opts.backends = hymba_engine::gpu::parse_backends(&b)
                .expect("HYMBA_BACKEND: vulkan|metal|dx12|gl|auto");
        }
        let gpu = pollster::block_on(Gpu::new(&opts))
            .unwrap_or_else(|e| panic!("these tests need a GPU adapter: {e}"));
        eprintln!(
            "adapter: {}",
            hymba_engine::gpu::describe_adapter(&gpu.info)
        );
        let k = Kernels::new(&gpu).expect("kernels compile");
        (Arc::new(gpu), Arc::new(k))
    })
    .clone()
}

/// Loads `ck` on the shared test GPU ([`gpu`]) with its weights stored as `dtype`.
pub fn load_model(
    ck: &hymba_engine::loader::Checkpoint,
    dtype: hymba_engine::model::DtypeChoice,
) -> hymba_engine::Result<hymba_engine::model::Model> {
    let (gpu, kernels) = gpu();
    pollster::block_on(hymba_engine::model::Model::load(
        gpu,
        kernels,
        ck,
        &hymba_engine::model::ModelOptions {
            dtype,
            ..Default::default()
        },
        |_, _| {},
    ))
}

/// The checkout's root: `$HYMBA_REPO_ROOT` when set (test binaries run elsewhere), else from the build.
pub fn repo_root() -> PathBuf {
    if let Ok(r) = std::env::var("HYMBA_REPO_ROOT") {
        return PathBuf::from(r);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Case folders (holding case.json): tests/fixtures/*, then the cases of the shared reference
/// folder beside the checkout (../shared/fixtures/*) not already copied here, then
/// $HYMBA_EXTRA_FIXTURES/*.
pub fn fixture_cases() -> Vec<PathBuf> {
    let mut roots = vec![repo_root().join("tests/fixtures")];
    let shared = repo_root().join("../shared/fixtures");
    if shared.is_dir() {
        roots.push(shared);
    }
    if let Ok(extra) = std::env::var("HYMBA_EXTRA_FIXTURES") {
        if !extra.is_empty() {
            let p = PathBuf::from(&extra);
            assert!(p.is_dir(), "HYMBA_EXTRA_FIXTURES={extra} is not a folder");
            roots.push(p);
        }
    }
    let mut cases = Vec::new();
    for root in roots {
        let mut here: Vec<PathBuf> = std::fs::read_dir(&root)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.join("case.json").is_file())
            .collect();
        if root.join("case.json").is_file() {
            here.push(root.clone());
        }
        here.sort();
        for c in here {
            // A shared case already in the project's copy runs once (the copy).
            let dup = cases.iter().any(|k: &PathBuf| {
                k.file_name() == c.file_name()
                    && k.parent() == Some(&repo_root().join("tests/fixtures"))
            });
            let from_shared = c
                .parent()
                .map(|p| p.ends_with("shared/fixtures"))
                .unwrap_or(false);
            if !(dup && from_shared) {
                cases.push(c);
            }
        }
    }
    cases
}

/// The real Hymba tokenizer.json, when present beside the checkout.
pub fn real_tokenizer_json() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("HYMBA_TOKENIZER_JSON") {
        return Some(PathBuf::from(p));
    }
    let p = repo_root().join("../shared/fixtures/c5_real_vocab_text/tokenizer.json");
    p.is_file().then_some(p)
}

/// Max absolute error and whether every element is within atol + rtol·|want|.
pub fn compare(got: &[f32], want: &[f32], atol: f32, rtol: f32) -> (f32, bool, usize) {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let mut worst = 0f32;
    let mut ok = true;
    let mut at = 0;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let e = (g - w).abs();
        if !g.is_finite() || e > atol + rtol * w.abs() {
            if ok {
                at = i;
            }
            ok = false;
        }
        if e > worst || !e.is_finite() {
            worst = if e.is_finite() { e } else { f32::INFINITY };
        }
    }
    (worst, ok, at)
}

pub fn argmax(v: &[f32]) -> usize {
    let mut b = 0;
    for i in 1..v.len() {
        if v[i] > v[b] {
            b = i;
        }
    }
    b
}

pub fn top2_margin(v: &[f32]) -> f32 {
    let a = argmax(v);
    let second = v
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != a)
        .map(|(_, &x)| x)
        .fold(f32::MIN, f32::max);
    v[a] - second
}
