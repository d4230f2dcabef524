//! Pre-quantized checkpoints (`hymba quantize`, `Checkpoint::save_quantized`): loading one gives
//! the same weights on the GPU, hence bit-identical logits, as quantizing the full-precision
//! checkpoint at load, from a folder and from in-memory bytes (the web path); inconsistent files
//! are refused with errors naming the file and tensor.

use hymba_engine::kernels::WeightDtype;
use hymba_engine::loader::{Checkpoint, QUANT_METADATA_KEY};
use hymba_engine::model::{DtypeChoice, Logits, Model};
use hymba_tests::*;
use safetensors::tensor::TensorView;
use std::path::{Path, PathBuf};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hymba-prequant-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// All prompt logits, then logits of `steps` teacher-forced decode steps.
fn logits(m: &Model, prompt: &[u32], steps: &[u32]) -> Vec<f32> {
    let mut seq = m.new_sequence().unwrap();
    let mut out = pollster::block_on(m.forward(&mut seq, prompt, Logits::All, None)).unwrap();
    for &id in steps {
        out.extend(pollster::block_on(m.decode_logits(&mut seq, id)).unwrap());
    }
    out
}

/// Writes `src` quantized to `dt` into a new folder (config.json + model.safetensors).
fn quantized_copy(src: &Path, dt: WeightDtype, name: &str) -> PathBuf {
    let ck = Checkpoint::open_dir(src).unwrap();
    let d = tmpdir(name);
    std::fs::copy(src.join("config.json"), d.join("config.json")).unwrap();
    ck.save_quantized(&d.join("model.safetensors"), dt).unwrap();
    d
}

fn check_model(src: &Path, prompt: &[u32], steps: &[u32], label: &str) {
    let full = Checkpoint::open_dir(src).unwrap();
    for (dt, choice) in [
        (WeightDtype::Q8, DtypeChoice::Q8),
        (WeightDtype::Q4, DtypeChoice::Q4),
    ] {
        let at_load = load_model(&full, choice).unwrap();
        let want = logits(&at_load, prompt, steps);
        let dir = quantized_copy(src, dt, &format!("{label}-{}", dt.name()));
        // From the folder, with dtype auto and with the matching dtype.
        let ck = Checkpoint::open_dir(&dir).unwrap();
        assert_eq!(ck.quantization(), Some(dt));
        for c in [DtypeChoice::Auto, choice] {
            let m = load_model(&ck, c).unwrap();
            assert_eq!(m.dtype, dt);
            let got = logits(&m, prompt, steps);
            let (worst, ok, at) = compare(&got, &want, 0.0, 0.0);
            assert!(ok, "{label} {dt:?} {c:?}: logit {at} differs by {worst}");
            assert_eq!(
                m.weight_report(),
                at_load.weight_report(),
                "{label} {dt:?}: GPU storage"
            );
        }
        // From bytes, as the web build loads.
        let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let ck = Checkpoint::from_bytes(&cfg, vec![("model.safetensors".into(), bytes)]).unwrap();
        let got = logits(&load_model(&ck, DtypeChoice::Auto).unwrap(), prompt, steps);
        let (worst, ok, _) = compare(&got, &want, 0.0, 0.0);
        assert!(ok, "{label} {dt:?} from bytes: differs by {worst}");
        // Smaller than the source, and the weights read back on the CPU are the dequantized ones.
        let n = "model.layers.0.mamba.in_proj.weight";
        let shape = full.shape(n).unwrap().to_vec();
        let deq = hymba_engine::kernels::dequantize(
            &hymba_engine::kernels::quantize(&full.f32(n).unwrap(), shape[0], shape[1], dt),
            shape[0],
            shape[1],
            dt,
        );
        assert_eq!(ck.f32(n).unwrap(), deq, "{label} {dt:?}: dequantized {n}");
        assert!(ck.stored_bytes() < full.stored_bytes());
        // A dtype other than the stored one is refused, naming both.
        for other in [DtypeChoice::F32, DtypeChoice::F16] {
            let e = load_model(&ck, other)
                .err()
                .expect("conflicting dtype loads")
                .to_string();
            assert!(
                e.contains(dt.name()) && e.contains("pre-quantized") && e.contains("--dtype"),
                "{e}"
            );
        }
        std::fs::remove_dir_all(dir).ok();
    }
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn prequantized_golden_fixture_matches_quantize_at_load() {
    let dir = repo_root().join("tests/fixtures/c2_swa_reuse");
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let gen = ids(&case["generated_ids"]);
    check_model(
        &dir,
        &ids(&case["prompt_ids"]),
        &gen[..gen.len().min(6)],
        "c2",
    );
}

#[test]
fn prequantized_tiny_shakespeare_matches_quantize_at_load() {
    let dir = repo_root().join("models/tiny-shakespeare");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let p = &golden["prompts"][0];
    let gen = ids(&p["generated_ids"]);
    check_model(&dir, &ids(&p["prompt_ids"]), &gen[..6], "tiny");
}

/// Rewrites `dir`/model.safetensors: `edit` may change each tensor (name, dtype, shape, bytes; None
/// drops it) and the quantization metadata JSON.
fn rewrite(
    dir: &Path,
    edit: impl Fn(
        &str,
        safetensors::Dtype,
        Vec<usize>,
        Vec<u8>,
    ) -> Option<(safetensors::Dtype, Vec<usize>, Vec<u8>)>,
    edit_meta: impl Fn(&mut serde_json::Value),
) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut md = header.metadata().clone().unwrap();
    let mut q: serde_json::Value = serde_json::from_str(&md[QUANT_METADATA_KEY]).unwrap();
    edit_meta(&mut q);
    md.insert(QUANT_METADATA_KEY.into(), q.to_string());
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let items: Vec<_> = st
        .tensors()
        .into_iter()
        .filter_map(|(n, v)| {
            edit(&n, v.dtype(), v.shape().to_vec(), v.data().to_vec()).map(|(d, s, b)| (n, d, s, b))
        })
        .collect();
    let views: Vec<(String, TensorView)> = items
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(&path, safetensors::serialize(views, Some(md)).unwrap()).unwrap();
}

fn err_of(dir: &Path) -> String {
    match Checkpoint::open_dir(dir) {
        Ok(_) => panic!("{} opened but should fail", dir.display()),
        Err(e) => {
            eprintln!("{}: {e}", dir.display());
            e.to_string()
        }
    }
}

#[test]
fn inconsistent_prequantized_files_are_refused() {
    let src = repo_root().join("tests/fixtures/c1_global_small");
    let base = quantized_copy(&src, WeightDtype::Q4, "base");
    let fresh = |name: &str| {
        let d = tmpdir(name);
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(base.join(f), d.join(f)).unwrap();
        }
        d
    };
    let keep = |_: &str, d, s, b| Some((d, s, b));
    let in_proj = "model.layers.0.mamba.in_proj.weight";

    // Truncated file.
    let d = fresh("trunc");
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() - 1000]).unwrap();
    let e = err_of(&d);
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );

    // A packed tensor shorter than its shape needs (metadata consistent with the short tensor).
    let d = fresh("short");
    rewrite(
        &d,
        |n, dt, s, mut b| {
            if n == in_proj {
                b.truncate(b.len() - 4);
                Some((dt, vec![s[0] - 4], b))
            } else {
                Some((dt, s, b))
            }
        },
        |q| {
            let t = &mut q["tensors"][in_proj];
            t["bytes"] = (t["bytes"].as_u64().unwrap() - 4).into();
        },
    );
    let e = err_of(&d);
    assert!(
        e.contains(in_proj) && e.contains("model.safetensors") && e.contains("U8"),
        "{e}"
    );

    // Logical shape in the metadata that does not match the packed size.
    let d = fresh("rows");
    rewrite(&d, keep, |q| {
        q["tensors"][in_proj]["shape"][0] = 400.into();
    });
    let e = err_of(&d);
    assert!(e.contains(in_proj) && e.contains("[400, 64]"), "{e}");

    // Same packed size (both pad to 64 columns) but not the shape config.json asks for.
    let d = fresh("cols");
    rewrite(&d, keep, |q| {
        q["tensors"][in_proj]["shape"][1] = 40.into();
    });
    let e = err_of(&d);
    assert!(e.contains(in_proj) && e.contains("[416, 40]"), "{e}");

    // Unknown format version.
    let d = fresh("version");
    rewrite(&d, keep, |q| q["version"] = 99.into());
    let e = err_of(&d);
    assert!(
        e.contains("version 99") && e.contains("model.safetensors"),
        "{e}"
    );

    // Another block size.
    let d = fresh("block");
    rewrite(&d, keep, |q| q["block_size"] = 64.into());
    let e = err_of(&d);
    assert!(e.contains("blocks of 64"), "{e}");

    // A listed tensor that is not in the file.
    let d = fresh("missing");
    rewrite(
        &d,
        |n, dt, s, b| (n != in_proj).then_some((dt, s, b)),
        |_| {},
    );
    let e = err_of(&d);
    assert!(e.contains(in_proj) && e.contains("not stored"), "{e}");

    // A tensor the engine keeps in f32 marked as quantized.
    let d = fresh("xproj");
    let xp = "model.layers.0.mamba.x_proj.0.weight";
    rewrite(&d, keep, |q| {
        q["tensors"][xp] = q["tensors"][in_proj].clone();
    });
    let e = err_of(&d);
    assert!(e.contains(xp) && e.contains("f32"), "{e}");

    // One large matrix left in full precision while the others are quantized.
    let d = fresh("mixed");
    let full = std::fs::read(src.join("model.safetensors")).unwrap();
    let full = safetensors::SafeTensors::deserialize(&full).unwrap();
    let orig = full.tensor(in_proj).unwrap();
    let (odt, oshape, odata) = (orig.dtype(), orig.shape().to_vec(), orig.data().to_vec());
    rewrite(
        &d,
        |n, dt, s, b| {
            if n == in_proj {
                Some((odt, oshape.clone(), odata.clone()))
            } else {
                Some((dt, s, b))
            }
        },
        |q| {
            q["tensors"].as_object_mut().unwrap().remove(in_proj);
        },
    );
    let e = err_of(&d);
    assert!(e.contains(in_proj) && e.contains("q4"), "{e}");

    // Garbage metadata JSON.
    let d = fresh("json");
    rewrite(&d, keep, |q| {
        *q = serde_json::json!({"format": "hymba-block-quant"})
    });
    let e = err_of(&d);
    assert!(
        e.contains(QUANT_METADATA_KEY) && e.contains("model.safetensors"),
        "{e}"
    );

    // The untouched copy still opens.
    assert_eq!(
        Checkpoint::open_dir(&base).unwrap().quantization(),
        Some(WeightDtype::Q4)
    );
    std::fs::remove_dir_all(base).ok();
}
