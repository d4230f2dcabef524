//! Bad input gets a clear error naming the file, tensor, shape or limit — never a panic.

use hymba_engine::gpu::{Gpu, GpuOptions};
use hymba_engine::kernels::{Kernels, WeightDtype};
use hymba_engine::loader::Checkpoint;
use hymba_engine::model::{Logits, Model, ModelOptions};
use hymba_tests::*;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn fixture() -> PathBuf {
    repo_root().join("tests/fixtures/c1_global_small")
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hymba-loading-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn copy_case(to: &Path) {
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture().join(f), to.join(f)).unwrap();
    }
}

/// Rewrites model.safetensors with `edit` applied to (name, dtype, shape, bytes).
/// The case with layer 1's in_proj one row short (shape and bytes agree; config.json refutes it).
fn copy_case_with_a_short_in_proj(to: &Path) {
    copy_case(to);
    rewrite(to, |n, dt, s, b| {
        if n == "model.layers.1.mamba.in_proj.weight" {
            let mut s2 = s.clone();
            s2[0] -= 1;
            let row = s[1] * 4;
            (dt, s2, b[..b.len() - row].to_vec())
        } else {
            (dt, s, b)
        }
    });
}

fn rewrite(
    dir: &Path,
    edit: impl Fn(&str, Dtype, Vec<usize>, Vec<u8>) -> (Dtype, Vec<usize>, Vec<u8>),
) {
    let bytes = std::fs::read(fixture().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let items: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let (d, s, b) = edit(&n, v.dtype(), v.shape().to_vec(), v.data().to_vec());
            (n, d, s, b)
        })
        .collect();
    let views: Vec<(String, TensorView)> = items
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(dir.join("model.safetensors"), out).unwrap();
}

fn err_of(dir: &Path) -> String {
    match Checkpoint::open_dir(dir) {
        Ok(_) => panic!("{} loaded but should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_directory_and_files() {
    let e = err_of(Path::new("/nonexistent/hymba-model"));
    assert!(e.contains("/nonexistent/hymba-model"), "{e}");
    let d = tmpdir("nocfg");
    std::fs::copy(
        fixture().join("model.safetensors"),
        d.join("model.safetensors"),
    )
    .unwrap();
    let e = err_of(&d);
    assert!(e.contains("config.json"), "{e}");
    let d = tmpdir("noweights");
    std::fs::copy(fixture().join("config.json"), d.join("config.json")).unwrap();
    let e = err_of(&d);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn truncated_safetensors() {
    let d = tmpdir("trunc");
    copy_case(&d);
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let e = err_of(&d);
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    std::fs::write(d.join("model.safetensors"), &bytes[..5]).unwrap();
    let e = err_of(&d);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn wrong_shape_names_tensor_and_shapes() {
    let d = tmpdir("shape");
    copy_case_with_a_short_in_proj(&d);
    let e = err_of(&d);
    assert!(
        e.contains("model.layers.1.mamba.in_proj.weight")
            && e.contains("[415, 64]")
            && e.contains("[416, 64]"),
        "{e}"
    );
}

#[test]
fn wrong_dtype_names_tensor() {
    let d = tmpdir("dtype");
    copy_case(&d);
    rewrite(&d, |n, dt, s, b| {
        if n == "model.final_layernorm.weight" {
            (Dtype::I32, s, b)
        } else {
            (dt, s, b)
        }
    });
    let e = err_of(&d);
    assert!(
        e.contains("model.final_layernorm.weight") && e.contains("I32"),
        "{e}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let d = tmpdir("missing");
    copy_case(&d);
    let bytes = std::fs::read(fixture().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "model.layers.2.mamba.D.0")
        .collect();
    std::fs::write(
        d.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let e = err_of(&d);
    assert!(e.contains("model.layers.2.mamba.D.0"), "{e}");
}

#[test]
fn unsupported_config_is_named() {
    for (key, val, word) in [
        (
            "memory_tokens_interspersed_every",
            serde_json::json!(2),
            "memory_tokens_interspersed_every",
        ),
        ("kq_norm", serde_json::json!("rms"), "kq_norm"),
        ("num_experts", serde_json::json!(2), "num_experts"),
        ("global_attn_idx", serde_json::json!([1, 2]), "layer 0"),
    ] {
        let d = tmpdir(&format!("cfg-{key}"));
        copy_case(&d);
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
        cfg[key] = val;
        std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
        let e = err_of(&d);
        assert!(e.contains(word) && e.contains("config.json"), "{e}");
    }
    let d = tmpdir("cfg-garbage");
    copy_case(&d);
    std::fs::write(d.join("config.json"), "{ not json").unwrap();
    assert!(err_of(&d).contains("config.json"));
}

#[test]
fn prompt_longer_than_the_model_allows() {
    let (gpu, kernels) = gpu();
    let ck = Checkpoint::open_dir(&fixture()).unwrap();
    let opts = ModelOptions {
        max_positions: Some(40),
        ..Default::default()
    };
    let model = pollster::block_on(Model::load(gpu, kernels, &ck, &opts, |_, _| {})).unwrap();
    let mut seq = model.new_sequence().unwrap();
    let ids = vec![5u32; 33]; // 8 meta + 33 > 40
    let e = pollster::block_on(model.forward(&mut seq, &ids, Logits::Last, None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("41") && e.contains("40"), "{e}");
    let e = pollster::block_on(model.forward(&mut seq, &[9999], Logits::Last, None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("9999") && e.contains("512"), "{e}");
}

#[test]
fn sharded_checkpoint_loads_like_the_single_file() {
    // Split c1 into two shards with a model.safetensors.index.json, as the Hub stores large models.
    let d = tmpdir("sharded");
    std::fs::copy(fixture().join("config.json"), d.join("config.json")).unwrap();
    let bytes = std::fs::read(fixture().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut all = st.tensors();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let half = all.len() / 2;
    let mut map = serde_json::Map::new();
    for (i, part) in [&all[..half], &all[half..]].iter().enumerate() {
        let name = format!("model-0000{}-of-00002.safetensors", i + 1);
        let views: Vec<(String, TensorView)> =
            part.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        for (n, _) in &views {
            map.insert(n.clone(), serde_json::Value::String(name.clone()));
        }
        std::fs::write(d.join(&name), safetensors::serialize(views, None).unwrap()).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let sharded = Checkpoint::open_dir(&d).unwrap();
    let single = Checkpoint::open_dir(&fixture()).unwrap();
    for name in [
        "model.embed_tokens.weight",
        "model.layers.3.mamba.in_proj.weight",
        "model.final_layernorm.weight",
    ] {
        assert_eq!(
            sharded.f32(name).unwrap(),
            single.f32(name).unwrap(),
            "{name}"
        );
    }
    // A shard named in the index but missing is named in the error.
    std::fs::remove_file(d.join("model-00002-of-00002.safetensors")).unwrap();
    let e = err_of(&d);
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
}

#[test]
fn tensor_larger_than_a_gpu_binding_is_split_across_bindings() {
    // A one-layer model with Hymba-1.5B's vocabulary and width: the f32 embedding / tied head is
    // 32001 x 1600 x 4 B = 205 MB, above the 128 MiB storage-binding limit of software adapters
    // (and WebGPU's default). It is split by rows into parts that fit, and runs.
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/configs/hymba-1.5b-config.json")).unwrap(),
    )
    .unwrap();
    cfg["num_hidden_layers"] = 1.into();
    cfg["global_attn_idx"] = serde_json::json!([0]);
    cfg["kv_reuse_group"] = serde_json::Value::Null;
    cfg["intermediate_size"] = 64.into();
    cfg["layer_type"] = serde_json::json!(["h"]);
    cfg["conv_dim"] = serde_json::json!({"0": 3200});
    let ck = Checkpoint::random(&cfg.to_string(), 7).unwrap();
    let (gpu, kernels) = gpu();
    let limit = gpu.weight_binding_limit;
    let embed_bytes = 32001u64 * 1600 * 4;
    let opts = ModelOptions {
        dtype: hymba_engine::model::DtypeChoice::F32,
        max_positions: Some(256),
        chunk: Some(32),
        ..Default::default()
    };
    let model = pollster::block_on(Model::load(gpu, kernels, &ck, &opts, |_, _| {}))
        .unwrap_or_else(|e| panic!("a {embed_bytes}-byte embedding must load split: {e}"));
    let parts = model
        .split_matrices()
        .iter()
        .find(|s| s.0 == "model.embed_tokens.weight")
        .map(|s| s.1)
        .unwrap_or(1);
    assert_eq!(
        parts as u64,
        embed_bytes.div_ceil(limit),
        "parts at limit {limit}"
    );
    eprintln!("embedding of {embed_bytes} bytes in {parts} part(s) (limit {limit})");
    // Ids from both halves of the vocabulary, through prefill and one decode step.
    let mut seq = model.new_sequence().unwrap();
    let logits =
        pollster::block_on(model.forward(&mut seq, &[5, 31000, 17000], Logits::Last, None))
            .unwrap();
    assert_eq!(logits.len(), 32001);
    assert!(logits.iter().all(|v| v.is_finite()));
    let next = pollster::block_on(model.decode_logits(&mut seq, 30999)).unwrap();
    assert!(next.iter().all(|v| v.is_finite()));
}

#[test]
fn row_larger_than_a_gpu_binding_is_a_clear_error() {
    // Splitting is by rows: a limit below one row (64 f32 = 256 bytes here) cannot work.
    let mut opts = GpuOptions {
        weight_binding_cap: Some(128),
        ..GpuOptions::default()
    };
    if let Ok(b) = std::env::var("HYMBA_BACKEND") {
        opts.backends = hymba_engine::gpu::parse_backends(&b).expect("HYMBA_BACKEND");
    }
    let gpu = Arc::new(pollster::block_on(Gpu::new(&opts)).expect("GPU adapter"));
    let kernels = Arc::new(Kernels::new(&gpu).expect("kernels compile"));
    let ck = Checkpoint::open_dir(&fixture()).unwrap();
    let opts = ModelOptions {
        dtype: hymba_engine::model::DtypeChoice::F32,
        ..Default::default()
    };
    let e = pollster::block_on(Model::load(gpu, kernels, &ck, &opts, |_, _| {}))
        .err()
        .expect("a 256-byte row cannot be bound in 128 bytes")
        .to_string();
    assert!(
        e.contains("model.embed_tokens.weight")
            && e.contains("256")
            && e.contains("128")
            && e.contains("weight_binding_cap"),
        "{e}"
    );
}

/// Streams `bytes` (one safetensors file) in chunks of `chunk` bytes through a TensorStream
/// into a ModelBuilder, as the browser loads a download or a picked file.
fn stream_load(
    bytes: &[u8],
    chunk: usize,
    opts: &ModelOptions,
) -> hymba_engine::Result<(Model, usize)> {
    use hymba_engine::loader::{expected_tensors, TensorStream};
    use hymba_engine::model::ModelBuilder;
    let (gpu, kernels) = gpu();
    let cfg_text = std::fs::read_to_string(fixture().join("config.json")).unwrap();
    let cfg = hymba_engine::HymbaConfig::from_json_str(&cfg_text, "config.json")?;
    let expected: std::collections::HashMap<String, Vec<usize>> =
        expected_tensors(&cfg).into_iter().collect();
    let mut b = ModelBuilder::new(gpu, kernels, cfg, opts)?;
    let mut s = TensorStream::new("model.safetensors");
    let mut most_held = 0usize;
    for c in bytes.chunks(chunk) {
        s.push(
            c,
            &|n, shape| match expected.get(n) {
                Some(w) if w.as_slice() != shape => Err(hymba_engine::Error::Shape {
                    name: n.to_string(),
                    found: shape.to_vec(),
                    expected: w.clone(),
                }),
                w => Ok(w.is_some()),
            },
            &mut |t| match t.quantized() {
                Some(dt) => b.add_quantized(&t.name, &t.shape, dt, t.bytes),
                None => {
                    let data = t.to_f32();
                    b.add(&t.name, &t.shape, data)
                }
            },
        )?;
        most_held = most_held.max(s.buffered_bytes() as usize);
    }
    s.finish()?;
    Ok((pollster::block_on(b.finish())?, most_held))
}

#[test]
fn streamed_load_matches_the_memory_mapped_one() {
    let (gpu, kernels) = gpu();
    let opts = ModelOptions {
        dtype: hymba_engine::model::DtypeChoice::F32,
        ..Default::default()
    };
    let ck = Checkpoint::open_dir(&fixture()).unwrap();
    let model = pollster::block_on(Model::load(gpu, kernels, &ck, &opts, |_, _| {})).unwrap();
    let ids = [5u32, 77, 300, 12, 9];
    let want = {
        let mut seq = model.new_sequence().unwrap();
        pollster::block_on(model.forward(&mut seq, &ids, Logits::All, None)).unwrap()
    };
    let bytes = std::fs::read(fixture().join("model.safetensors")).unwrap();
    let largest = ck
        .config
        .raw
        .vocab_size
        .max(1)
        .saturating_mul(ck.config.hidden * 4);
    for chunk in [1, 7, 65536, bytes.len()] {
        let (m, held) = stream_load(&bytes, chunk, &opts).unwrap();
        let mut seq = m.new_sequence().unwrap();
        let got = pollster::block_on(m.forward(&mut seq, &ids, Logits::All, None)).unwrap();
        assert_eq!(got, want, "streamed in chunks of {chunk} bytes");
        // At most the header or one tensor is held, never the file.
        assert!(held <= largest.max(16384), "{held} bytes held");
    }
}

#[test]
fn streamed_pre_quantized_load_matches_the_memory_mapped_one() {
    // A `hymba quantize` file streamed as the browser streams it: its packed words reach the
    // GPU as they are (dtype auto picks the file's own), bit-identical to the native load.
    let (gpu, kernels) = gpu();
    let src = Checkpoint::open_dir(&fixture()).unwrap();
    let dir = std::env::temp_dir().join(format!("hymba-streamed-q4-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture().join("config.json"), dir.join("config.json")).unwrap();
    src.save_quantized(&dir.join("model.safetensors"), WeightDtype::Q4)
        .unwrap();
    let opts = ModelOptions::default();
    let ck = Checkpoint::open_dir(&dir).unwrap();
    let model = pollster::block_on(Model::load(gpu, kernels, &ck, &opts, |_, _| {})).unwrap();
    assert_eq!(model.dtype, WeightDtype::Q4);
    let ids = [5u32, 77, 300, 12, 9];
    let want = {
        let mut seq = model.new_sequence().unwrap();
        pollster::block_on(model.forward(&mut seq, &ids, Logits::All, None)).unwrap()
    };
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    for chunk in [7, bytes.len()] {
        let (m, _) = stream_load(&bytes, chunk, &opts).unwrap();
        assert_eq!(m.dtype, WeightDtype::Q4);
        let mut seq = m.new_sequence().unwrap();
        let got = pollster::block_on(m.forward(&mut seq, &ids, Logits::All, None)).unwrap();
        assert_eq!(got, want, "streamed in chunks of {chunk} bytes");
    }
    // Asking for another storage is a clear error, not a silent requantization.
    let f16 = ModelOptions {
        dtype: hymba_engine::model::DtypeChoice::F16,
        ..Default::default()
    };
    let e = stream_load(&bytes, bytes.len(), &f16)
        .err()
        .expect("q4 file as f16");
    assert!(e.to_string().contains("q4"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn streamed_load_errors_name_the_file_or_tensor() {
    let opts = ModelOptions::default();
    let bytes = std::fs::read(fixture().join("model.safetensors")).unwrap();
    // Cut short.
    let e = stream_load(&bytes[..bytes.len() - 100], 4096, &opts)
        .err()
        .expect("a truncated file must fail")
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("ended"),
        "{e}"
    );
    // A shape that config.json refutes is refused from the header, before any upload.
    let d = tmpdir("stream-shape");
    copy_case_with_a_short_in_proj(&d);
    let bad = std::fs::read(d.join("model.safetensors")).unwrap();
    let e = stream_load(&bad, 1 << 20, &opts)
        .err()
        .expect("a wrong shape must fail")
        .to_string();
    assert!(
        e.contains("model.layers.1.mamba.in_proj.weight") && e.contains("[415, 64]"),
        "{e}"
    );
    // Not a safetensors file at all.
    let e = stream_load(b"\xff\xff\xff\xff\xff\xff\xff\xffgarbage", 3, &opts)
        .err()
        .expect("garbage must fail")
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
}
