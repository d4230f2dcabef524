//! What the engine reports as its GPU memory (weights + activation buffers + a sequence's
//! cache, each measured from its buffers) must account for what the GPU allocator holds: a
//! buffer left out of the report would show as a gap.

use hymba_engine::loader::Checkpoint;
use hymba_engine::model::{DtypeChoice, Logits};
use hymba_tests::{gpu, load_model, repo_root};

#[test]
fn reported_gpu_bytes_account_for_the_allocator() {
    let dir = repo_root().join("models/tiny-shakespeare");
    let ck = Checkpoint::open_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let (gpu, _) = gpu();
    let Some(before) = gpu.device.generate_allocator_report() else {
        println!("skipped: this backend has no allocator report");
        return;
    };
    let before = before.total_allocated_bytes;
    let model = load_model(&ck, DtypeChoice::F16).unwrap();
    let mut seq = model.new_sequence().unwrap();
    let ids: Vec<u32> = (0..40).map(|i| 3 + (i * 7) % 60).collect();
    // (The forward reads its logits back, so its GPU work has finished.)
    pollster::block_on(model.forward(&mut seq, &ids, Logits::Last, None)).unwrap();
    let after = gpu
        .device
        .generate_allocator_report()
        .unwrap()
        .total_allocated_bytes;
    let reported = model.weight_bytes() + model.activation_bytes() + seq.cache_bytes();
    // The meta-token prefix lives in host memory: the conv and SSM states of every layer and
    // the meta-token slots of each KV owner's keys and values, nothing more.
    let c = &model.cfg;
    let kv_owners = c.layers.iter().filter(|l| l.owns_kv()).count();
    let kv_elem = seq.kv_dtype().map(|d| d.bytes()).unwrap_or(0);
    let prefix = c.n_layers * c.d_inner * (c.d_conv + c.d_state) * 4
        + kv_owners * c.n_kv_heads * c.n_meta * (c.d_qk + c.d_v) * kv_elem;
    assert!(c.n_meta > 0, "the test model has meta tokens");
    assert_eq!(model.prefix_host_bytes(), prefix, "meta-token prefix bytes");
    let held = after - before;
    println!(
        "allocator +{held} B; reported {reported} B (weights {}, activations {}, cache {})",
        model.weight_bytes(),
        model.activation_bytes(),
        seq.cache_bytes()
    );
    assert!(
        reported <= held,
        "reported {reported} B, more than the allocator's {held} B"
    );
    // What is left is the kernels' parameter uniforms and the sampler's small buffers (18 KB
    // on lavapipe); any workspace or cache buffer left out of the report would be more.
    let gap = held - reported;
    assert!(
        gap < 256 * 1024 && gap * 100 < held,
        "the allocator holds {gap} B the report does not account for"
    );

    // The first decode step gives back the prompt workspace and the sliding-window rings'
    // chunk slack: the allocator must hold that much less, and the report still add up.
    assert!(
        model.prompt_workspace_rows() > 0,
        "the prompt left its workspace"
    );
    let (act0, cache0) = (model.activation_bytes(), seq.cache_bytes());
    pollster::block_on(model.decode_logits(&mut seq, 7)).unwrap();
    pollster::block_on(model.gpu.finish()).unwrap();
    let held2 = gpu
        .device
        .generate_allocator_report()
        .unwrap()
        .total_allocated_bytes
        - before;
    let (act1, cache1) = (model.activation_bytes(), seq.cache_bytes());
    println!(
        "after a decode step: allocator +{held2} B; activations {act0} -> {act1} B, cache {cache0} -> {cache1} B"
    );
    assert_eq!(model.prompt_workspace_rows(), 0);
    assert!(act1 < act0 && cache1 < cache0, "nothing was given back");
    let freed = (act0 - act1) + (cache0 - cache1);
    assert!(
        held2 + freed <= held + 64 * 1024,
        "the report says {freed} B were given back; the allocator went from {held} to {held2} B"
    );
    let reported2 = model.weight_bytes() + act1 + cache1;
    assert!(reported2 <= held2 && held2 - reported2 < 256 * 1024);
}
