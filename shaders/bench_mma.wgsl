// Tensor-core throughput probe for hymba-bench: cooperative-matrix multiply-adds (16x16x16, f16
// inputs, f32 accumulators) per second through wgpu's WGSL cooperative matrices, the ceiling the
// prompt GEMMs (matmul.wgsl gemm_coop, gemm_coop2) work under. Each subgroup keeps 8
// independent accumulators (2 x 4 fragments, gemm_coop2's subgroup tile) and does `iters` rounds
// of 8 multiply-adds. Where its 6 operand fragments come from each round:
//   (default)          registers: loaded once, before the loop (the multiply-add issue rate);
//   RELOAD with OPS=sh workgroup memory, reloaded every round (as the GEMMs' inner loops);
//   RELOAD with OPS=src the storage buffer (12 KB, cache-resident), reloaded every round (as a
//                      GEMM without staging would).
// Grid: (groups, 1, 1) of 4 subgroups of 32.

struct Params {
    iters: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// src: [4096] f16 operand tiles: fragment rows of 16 values at a stride of 24 (48 bytes, so that
// the rows a fragment load reads start in different banks), fragment j of round r at
// (r % 4 + j) * 384.
@group(0) @binding(1) var<storage, read> src: array<f16>;
// dst: [groups * 4 subgroups, 8 fragments, 256] f32: the accumulators, so that nothing is dead.
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

var<workgroup> sh: array<f16, 4096>;
var<workgroup> zero: array<f32, 256>;

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32) {
    for (var i = li; i < 4096u; i += 128u) { sh[i] = src[i]; }
    for (var i = li; i < 256u; i += 128u) { zero[i] = 0.0; }
    workgroupBarrier();
    var a0 = coopLoadT<coop_mat16x16<f16, A>>(&sh[0], 24u);
    var a1 = coopLoadT<coop_mat16x16<f16, A>>(&sh[384], 24u);
    var b0 = coopLoad<coop_mat16x16<f16, B>>(&sh[768], 24u);
    var b1 = coopLoad<coop_mat16x16<f16, B>>(&sh[1152], 24u);
    var b2 = coopLoad<coop_mat16x16<f16, B>>(&sh[1536], 24u);
    var b3 = coopLoad<coop_mat16x16<f16, B>>(&sh[1920], 24u);
    var c00 = coopLoadT<coop_mat16x16<f32, C>>(&zero[0], 16u);
    var c01 = c00;
    var c02 = c00;
    var c03 = c00;
    var c10 = c00;
    var c11 = c00;
    var c12 = c00;
    var c13 = c00;
    for (var i = 0u; i < p.iters; i++) {
#ifdef RELOAD
        let o = (i % 4u) * 384u;
        a0 = coopLoadT<coop_mat16x16<f16, A>>(&OPS[o], 24u);
        a1 = coopLoadT<coop_mat16x16<f16, A>>(&OPS[o + 384u], 24u);
        b0 = coopLoad<coop_mat16x16<f16, B>>(&OPS[o + 768u], 24u);
        b1 = coopLoad<coop_mat16x16<f16, B>>(&OPS[o + 1152u], 24u);
        b2 = coopLoad<coop_mat16x16<f16, B>>(&OPS[o + 1536u], 24u);
        b3 = coopLoad<coop_mat16x16<f16, B>>(&OPS[o + 1920u], 24u);
#endif
        c00 = coopMultiplyAdd(a0, b0, c00);
        c01 = coopMultiplyAdd(a0, b1, c01);
        c02 = coopMultiplyAdd(a0, b2, c02);
        c03 = coopMultiplyAdd(a0, b3, c03);
        c10 = coopMultiplyAdd(a1, b0, c10);
        c11 = coopMultiplyAdd(a1, b1, c11);
        c12 = coopMultiplyAdd(a1, b2, c12);
        c13 = coopMultiplyAdd(a1, b3, c13);
    }
    let d = (wid.x * 4u + sg) * 2048u;
    coopStoreT(c00, &dst[d], 16u);
    coopStoreT(c01, &dst[d + 256u], 16u);
    coopStoreT(c02, &dst[d + 512u], 16u);
    coopStoreT(c03, &dst[d + 768u], 16u);
    coopStoreT(c10, &dst[d + 1024u], 16u);
    coopStoreT(c11, &dst[d + 1280u], 16u);
    coopStoreT(c12, &dst[d + 1536u], 16u);
    coopStoreT(c13, &dst[d + 1792u], 16u);
}
