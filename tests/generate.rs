//! `Model::generate` submits the step that feeds token i before it has read token i back, and
//! undoes that step when token i ends the reply. These tests check that stopping that way leaves
//! the sequence exactly as a generation that never submitted the step: the same position and
//! tokens, bit-identical conv and SSM states in every layer, the same sampler state (token slot,
//! repetition-penalty flags), and the same continuation with sampling.

use hymba_engine::cache::Sequence;
use hymba_engine::generate::{GenerateOptions, StopReason};
use hymba_engine::loader::Checkpoint;
use hymba_engine::model::{DtypeChoice, Model};
use hymba_engine::sampling::SamplingParams;
use hymba_tests::{load_model, repo_root};

fn sampling() -> SamplingParams {
    // Sampling with a repetition penalty, so the count of sampled tokens (the draw's step) and
    // the penalty flags matter to what comes next.
    SamplingParams {
        temperature: 0.9,
        top_k: 20,
        top_p: 0.95,
        repetition_penalty: 1.3,
        seed: 11,
    }
}

fn opts(max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        sampling: sampling(),
        stop_strings: Vec::new(),
        stop_at_eos: false,
    }
}

fn assert_same_sequence(model: &Model, a: &Sequence, b: &Sequence, what: &str) {
    assert_eq!(a.position(), b.position(), "{what}: position");
    assert_eq!(a.tokens(), b.tokens(), "{what}: tokens in the cache");
    for l in 0..model.cfg.n_layers {
        let sa = pollster::block_on(model.read_ssm_state(a, l)).unwrap();
        let sb = pollster::block_on(model.read_ssm_state(b, l)).unwrap();
        // Bit-identical: the same kernels ran on the same inputs.
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(
            bits(&sa.0) == bits(&sb.0),
            "{what}: layer {l} conv state differs"
        );
        assert!(
            bits(&sa.1) == bits(&sb.1),
            "{what}: layer {l} SSM state differs"
        );
    }
    let (ta, fa) = pollster::block_on(model.read_sampler_state(a)).unwrap();
    let (tb, fb) = pollster::block_on(model.read_sampler_state(b)).unwrap();
    assert_eq!(ta, tb, "{what}: token slot [token, sampled, flag, -]");
    let diff: Vec<usize> = (0..fa.len()).filter(|&i| fa[i] != fb[i]).collect();
    assert!(
        diff.is_empty(),
        "{what}: repetition-penalty flags differ at ids {diff:?}"
    );
}

#[test]
fn stopping_undoes_the_overlapped_step_exactly() {
    let dir = repo_root().join("models/tiny-shakespeare");
    let ck = Checkpoint::open_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let model = load_model(&ck, DtypeChoice::F32).unwrap();
    let v = model.cfg.vocab_size as u32;
    let prompt: Vec<u32> = (0..23u32).map(|i| (i * 37 + 5) % v).collect();
    for k in [1usize, 2, 7] {
        // A: cancelled from the callback at token k. The step feeding token k was already
        // submitted when the callback ran, so generate must undo it.
        let mut a = model.new_sequence().unwrap();
        let mut seen = 0usize;
        let ga = pollster::block_on(model.generate(&mut a, &prompt, &opts(100), None, |_| {
            seen += 1;
            seen < k
        }))
        .unwrap();
        assert_eq!(ga.stop, StopReason::Cancelled);
        assert_eq!(ga.ids.len(), k);
        // B: the same reply, ended by the token limit (no step is submitted after token k).
        let mut b = model.new_sequence().unwrap();
        let gb =
            pollster::block_on(model.generate(&mut b, &prompt, &opts(k), None, |_| true)).unwrap();
        assert_eq!(gb.stop, StopReason::MaxTokens);
        assert_eq!(
            ga.ids, gb.ids,
            "k = {k}: the replies differ before the stop"
        );
        assert_same_sequence(&model, &a, &b, &format!("cancelled at token {k}"));
        // The next turn (it starts by feeding the last token, which is not in the cache) goes on
        // the same way from both.
        let last = *ga.ids.last().unwrap();
        let ca =
            pollster::block_on(model.generate(&mut a, &[last], &opts(12), None, |_| true)).unwrap();
        let cb =
            pollster::block_on(model.generate(&mut b, &[last], &opts(12), None, |_| true)).unwrap();
        assert_eq!(ca.ids, cb.ids, "k = {k}: continuations differ");
        assert_same_sequence(&model, &a, &b, &format!("continued after token {k}"));
    }
}

#[test]
fn a_stop_string_undoes_the_overlapped_step_exactly() {
    // The same check through the stop-string path, with the demo model's own tokenizer: the
    // stop string is the text of the first k tokens of a reference reply, so it is found when
    // token k arrives, and the step feeding token k, already submitted, must be undone.
    let dir = repo_root().join("models/tiny-shakespeare");
    let ck = Checkpoint::open_dir(&dir).unwrap();
    let tok = hymba_engine::tokenizer::Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let model = load_model(&ck, DtypeChoice::F32).unwrap();
    let prompt = tok.encode("ROMEO:", false).unwrap();
    let mut r = model.new_sequence().unwrap();
    let mut pieces = Vec::new();
    let reference =
        pollster::block_on(model.generate(&mut r, &prompt, &opts(24), Some(&tok), |e| {
            pieces.push(e.text.to_string());
            true
        }))
        .unwrap();
    assert_eq!(reference.ids.len(), 24);
    let mut checked = 0;
    for k in [3usize, 9, 16] {
        let stop: String = pieces[..k].concat();
        // Only where the text first contains it at token k (a token may add no text).
        if stop.is_empty() || (1..k).any(|j| pieces[..j].concat().contains(&stop)) {
            continue;
        }
        let mut o = opts(100);
        o.stop_strings = vec![stop.clone()];
        let mut a = model.new_sequence().unwrap();
        let ga =
            pollster::block_on(model.generate(&mut a, &prompt, &o, Some(&tok), |_| true)).unwrap();
        assert_eq!(ga.stop, StopReason::StopString, "stop {stop:?}");
        assert_eq!(ga.ids, reference.ids[..k], "stop {stop:?}: ids");
        let mut b = model.new_sequence().unwrap();
        let gb =
            pollster::block_on(model.generate(&mut b, &prompt, &opts(k), Some(&tok), |_| true))
                .unwrap();
        assert_eq!(ga.ids, gb.ids);
        assert_same_sequence(&model, &a, &b, &format!("stop string at token {k}"));
        checked += 1;
    }
    eprintln!("{checked} stop strings checked");
    assert!(checked > 0, "no usable stop string in {pieces:?}");
}

#[test]
fn undo_without_an_undoable_step_is_a_clear_error() {
    let dir = repo_root().join("models/tiny-shakespeare");
    let ck = Checkpoint::open_dir(&dir).unwrap();
    let model = load_model(&ck, DtypeChoice::F32).unwrap();
    let mut s = model.new_sequence().unwrap();
    pollster::block_on(model.forward(&mut s, &[3, 4, 5], hymba_engine::model::Logits::Last, None))
        .unwrap();
    let e = pollster::block_on(model.undo_decode(&mut s, [0, 0, 0])).unwrap_err();
    assert!(e.to_string().contains("no decode step to undo"), "{e}");
}
