//! The KV cache's storage: f32 for models with f32 weights (the exact path), f16 (two per u32
//! word) for f16 / q8 / q4 weights. Its buffers must be half the f32 size, measured from the
//! allocated buffers (`Sequence::cache_bytes`), also after a global layer's buffer grew, and
//! what they hold must be the f32 cache rounded to f16.

use hymba_engine::kernels::KvDtype;
use hymba_engine::loader::Checkpoint;
use hymba_engine::model::{DtypeChoice, Logits, Model, ModelOptions};
use hymba_tests::{gpu, repo_root};

fn load(ck: &Checkpoint, dtype: DtypeChoice, kv_dtype: Option<KvDtype>) -> Model {
    let (gpu, kernels) = gpu();
    pollster::block_on(Model::load(
        gpu,
        kernels,
        ck,
        &ModelOptions {
            dtype,
            // Small chunks: the global layers start at 256 text slots and a 300-token prompt
            // makes them grow.
            chunk: Some(64),
            kv_dtype,
            ..Default::default()
        },
        |_, _| {},
    ))
    .unwrap()
}

fn builtin() -> Checkpoint {
    let dir = repo_root().join("models/tiny-shakespeare");
    Checkpoint::open_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

#[test]
fn kv_storage_follows_the_weight_storage() {
    let ck = builtin();
    for (dtype, want) in [
        (DtypeChoice::F32, KvDtype::F32),
        (DtypeChoice::F16, KvDtype::F16),
        (DtypeChoice::Q8, KvDtype::F16),
        (DtypeChoice::Q4, KvDtype::F16),
    ] {
        let m = load(&ck, dtype, None);
        assert_eq!(m.kv_dtype, want, "{dtype:?} weights");
        assert_eq!(m.new_sequence().unwrap().kv_dtype(), Some(want));
    }
    // The choice can be overridden (f32 weights with the f16 cache, and the other way round).
    assert_eq!(
        load(&ck, DtypeChoice::F32, Some(KvDtype::F16)).kv_dtype,
        KvDtype::F16
    );
    assert_eq!(
        load(&ck, DtypeChoice::F16, Some(KvDtype::F32)).kv_dtype,
        KvDtype::F32
    );
}

#[test]
fn f16_kv_buffers_are_half_the_f32_ones() {
    let ck = builtin();
    let f32m = load(&ck, DtypeChoice::F32, None);
    let f16m = load(&ck, DtypeChoice::F16, None);
    let v = f32m.cfg.vocab_size as u32;
    let prompt: Vec<u32> = (0..300u32).map(|i| (i * 37 + 5) % v).collect();
    let mut a = f32m.new_sequence().unwrap();
    let mut b = f16m.new_sequence().unwrap();
    let check = |a: &hymba_engine::cache::Sequence, b: &hymba_engine::cache::Sequence, when| {
        assert!(a.kv_bytes() > 0, "{when}: no KV buffers");
        assert_eq!(
            b.kv_bytes() * 2,
            a.kv_bytes(),
            "{when}: f16 KV bytes {} vs f32 {}",
            b.kv_bytes(),
            a.kv_bytes()
        );
        // Everything else in the cache (conv and SSM states) is the same size.
        assert_eq!(
            a.cache_bytes() - b.cache_bytes(),
            b.kv_bytes(),
            "{when}: cache bytes f32 {} vs f16 {}",
            a.cache_bytes(),
            b.cache_bytes()
        );
    };
    check(&a, &b, "new sequence");
    let before = a.kv_bytes();
    pollster::block_on(f32m.forward(&mut a, &prompt, Logits::Last, None)).unwrap();
    pollster::block_on(f16m.forward(&mut b, &prompt, Logits::Last, None)).unwrap();
    assert!(
        a.kv_bytes() > before,
        "the global layers' buffers did not grow"
    );
    check(&a, &b, "after growing to 300 tokens");
}

#[test]
fn f16_kv_cache_holds_the_f32_cache_rounded() {
    // Same f32 weights, f32 and f16 caches. Layer 0's keys and values depend only on the
    // embedding (identical in both), so the f16 cache must hold the f32 one rounded to nearest
    // f16 (keys within one f16 ulp: the f16 store rounds its own f32 RoPE result), in the meta
    // slots (the prefix copied into a new sequence), and after the global buffer grew (copied
    // word by word into the larger one) and a few decode steps.
    let ck = builtin();
    let a_m = load(&ck, DtypeChoice::F32, Some(KvDtype::F32));
    let b_m = load(&ck, DtypeChoice::F32, Some(KvDtype::F16));
    let v = a_m.cfg.vocab_size as u32;
    let prompt: Vec<u32> = (0..300u32).map(|i| (i * 53 + 7) % v).collect();
    let mut a = a_m.new_sequence().unwrap();
    let mut b = b_m.new_sequence().unwrap();
    pollster::block_on(a_m.forward(&mut a, &prompt, Logits::Last, None)).unwrap();
    pollster::block_on(b_m.forward(&mut b, &prompt, Logits::Last, None)).unwrap();
    for id in [3, 9, 27] {
        pollster::block_on(a_m.decode_logits(&mut a, id)).unwrap();
        pollster::block_on(b_m.decode_logits(&mut b, id)).unwrap();
    }
    let (ka, va, fa) = pollster::block_on(a_m.read_kv(&a, 0)).unwrap().unwrap();
    let (kb, vb, fb) = pollster::block_on(b_m.read_kv(&b, 0)).unwrap().unwrap();
    assert_eq!((fa, ka.len(), va.len()), (fb, kb.len(), vb.len()));
    assert_eq!(a.position(), a_m.cfg.n_meta + 303);
    let f16 = |x: f32| half::f16::from_f32(x).to_f32();
    for (i, (&x, &y)) in va.iter().zip(&vb).enumerate() {
        assert_eq!(f16(x), y, "layer 0 value element {i}: f32 cache {x}");
    }
    for (i, (&x, &y)) in ka.iter().zip(&kb).enumerate() {
        let ulp = x.abs().max(6.1e-5) / 1024.0;
        assert!(
            (x - y).abs() <= ulp,
            "layer 0 key element {i}: f32 cache {x}, f16 cache {y}"
        );
    }
}
