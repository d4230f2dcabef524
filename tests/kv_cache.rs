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

/// A conversation: a prompt, decode steps, a second prompt, more decode steps. The first decode
/// step shrinks the sliding-window rings to the window + 1 (the prompt chunk's slack given
/// back) and gives back the prompt workspace; the second prompt grows the rings again (they
/// have wrapped by then). Decode steps see one position less of the window than prompt rows
/// (the reference's rule), so the check is the same conversation with 16-position chunks,
/// whose rings move between other sizes (16 + 64 and 65 text slots against 64 + 64 and 65):
/// every logit row must agree. (Both runs move their rings the same way; what a move keeps
/// is checked slot by slot in `cache::tests`, and against the official outputs by the golden
/// decode tests, whose c2 prompt is longer than its window.)
#[test]
fn rings_shrink_for_decode_and_grow_for_the_next_prompt() {
    let ck = builtin();
    let m = load(&ck, DtypeChoice::F32, None);
    let (gpu, kernels) = gpu();
    let r = pollster::block_on(Model::load(
        gpu,
        kernels,
        &ck,
        &ModelOptions {
            dtype: DtypeChoice::F32,
            chunk: Some(16),
            ..Default::default()
        },
        |_, _| {},
    ))
    .unwrap();
    let v = m.cfg.vocab_size as u32;
    let window = m
        .cfg
        .layers
        .iter()
        .find_map(|l| match l.attention {
            hymba_engine::config::AttentionKind::SlidingWindow { window } => Some(window),
            _ => None,
        })
        .expect("the built-in model has sliding-window layers");
    let ids = |n: u32, seed: u32| -> Vec<u32> { (0..n).map(|i| (i * 37 + seed) % v).collect() };
    let (a, steps1, b, steps2) = (ids(120, 5), ids(7, 11), ids(100, 17), ids(5, 23));
    let (mut s, mut rs) = (m.new_sequence().unwrap(), r.new_sequence().unwrap());
    let mut worst = 0f32;
    let mut check = |got: &[f32], want: &[f32], what: &str| {
        let c = hymba_tests::compare(got, want, 2e-4, 1e-4);
        assert!(c.1, "{what}: max error {} at {}", c.0, c.2);
        worst = worst.max(c.0);
    };
    let got = pollster::block_on(m.forward(&mut s, &a, Logits::Last, None)).unwrap();
    let want = pollster::block_on(r.forward(&mut rs, &a, Logits::Last, None)).unwrap();
    check(&got, &want, "first prompt");
    assert!(
        m.prompt_workspace_rows() > 0,
        "a 120-token prompt has a prompt workspace"
    );
    let kv_prompt = s.kv_bytes();
    for &id in &steps1 {
        let got = pollster::block_on(m.decode_logits(&mut s, id)).unwrap();
        let want = pollster::block_on(r.decode_logits(&mut rs, id)).unwrap();
        check(&got, &want, "decode after the first prompt");
    }
    assert_eq!(
        m.prompt_workspace_rows(),
        0,
        "decoding gave the prompt workspace back"
    );
    let kv_decode = s.kv_bytes();
    assert!(
        kv_decode < kv_prompt,
        "rings shrank for decoding: {kv_prompt} -> {kv_decode} B"
    );
    assert_eq!(
        kv_decode,
        rs.kv_bytes(),
        "both decode with window + 1 slots"
    );
    let got = pollster::block_on(m.forward(&mut s, &b, Logits::All, None)).unwrap();
    let want = pollster::block_on(r.forward(&mut rs, &b, Logits::All, None)).unwrap();
    check(&got, &want, "second prompt, every row");
    assert_eq!(
        s.kv_bytes(),
        kv_prompt,
        "the second prompt grew the rings back"
    );
    for &id in &steps2 {
        let got = pollster::block_on(m.decode_logits(&mut s, id)).unwrap();
        let want = pollster::block_on(r.decode_logits(&mut rs, id)).unwrap();
        check(&got, &want, "decode after the second prompt");
    }
    assert_eq!(s.kv_bytes(), kv_decode);
    let at = s.position() - m.cfg.n_meta;
    assert!(
        at > 3 * window,
        "the rings wrapped: {at} positions, window {window}"
    );
    println!("every logit row within {worst:.2e} of the 16-position-chunk run's");
}
