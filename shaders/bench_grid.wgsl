// Grid-barrier probe for hymba-bench (`--grid-probe`): how fast a chain of dependent decode
// GEMVs runs as one dispatch per GEMV (what the engine does) against one persistent dispatch
// whose workgroups wait for each other between GEMVs (a grid barrier on an atomic counter).
// Not used by the engine: WGSL promises neither that all workgroups of a dispatch run at once
// (a workgroup spinning on the counter could wait for one that never starts) nor that plain
// stores of one workgroup become visible to another within a dispatch, so this only measures
// what such a kernel would gain, and checks its outputs against the dispatch-per-GEMV chain.
//
// The chain per layer, Hymba-1.5B's four decode GEMVs with f16 weights and f32 activations:
//   in_proj  P[8960]  = W_in  . h[1600]
//   out_proj O[1600]  = W_out . P[0..3200]
//   gate|up  G[11008] = W_gu  . O
//   down     h[1600]  = W_dn  . (silu(G[0..5504]) * G[5504..11008])
// Each row of W is one subgroup's (eight weights per 16-byte load, lane j taking loads j,
// j + subgroup size, ...; X staged in workgroup memory as vec4), reduced with subgroupAdd:
// both forms compute every row the same way, so their outputs are equal bit for bit when the
// barrier works. (A form with K across the workgroup and X in registers, as the engine's
// gemv_wide, ran at 35 us per GEMV on the H200 here: its register arrays, indexed in loops,
// went to local memory.)
//
// Each stage normalizes its input to unit RMS while staging it (as the model's norms do), so
// the values stay in range over the chain.
//
// Variants (defines): GRID (the persistent form; activations are atomics, read with atomicLoad
// and written with atomicStore so that no workgroup reads a stale cached copy), PLAIN (with
// GRID: activations read with plain loads, which may be stale; the output check says whether
// they were), EMPTY (with GRID: the barriers alone, no GEMV: what one grid barrier costs).

struct Params {
    layers: u32,   // layers in the chain
    phase: u32,    // dispatch-per-GEMV form: the GEMV (4 * layer + stage)
    groups: u32,   // GRID: workgroups of the dispatch (all resident at once)
    base: u32,     // GRID: the barrier counter's value when this dispatch starts
}

@group(0) @binding(0) var<uniform> p: Params;
// w: every layer's four matrices, row-major [m, k] f16 packed two per u32, layer after layer
// (in_proj, out_proj, gate|up, down), as vec4<u32> (eight weights).
@group(0) @binding(1) var<storage, read_write> w: array<vec4<u32>>;
#ifdef GRID
// act: activations as f32 bits: h at 0, P at 2048, O at 11264, G at 12928 (atomics: see top).
@group(0) @binding(2) var<storage, read_write> act: array<atomic<u32>>;
#ifdef PLAIN
// The same buffer as act, read with plain loads.
@group(0) @binding(4) var<storage, read_write> act_plain: array<u32>;
#endif
// sync: [0] the grid barrier's arrival counter.
@group(0) @binding(3) var<storage, read_write> sync: array<atomic<u32>>;
#else
@group(0) @binding(2) var<storage, read_write> act: array<f32>;
#endif

const D: u32 = 1600u;
const PW: u32 = 8960u;
const DI: u32 = 3200u;
const FF: u32 = 5504u;
const H_AT: u32 = 0u;
const P_AT: u32 = 2048u;
const O_AT: u32 = 11264u;
const G_AT: u32 = 12928u;
// vec4<u32> per layer: (8960 * 1600 + 1600 * 3200 + 11008 * 1600 + 1600 * 5504) / 8.
const LAYER_W: u32 = 5734400u;

fn act_load(i: u32) -> f32 {
#ifdef PLAIN
    return bitcast<f32>(act_plain[i]);
#else
#ifdef GRID
    return bitcast<f32>(atomicLoad(&act[i]));
#else
    return act[i];
#endif
#endif
}

fn act_store(i: u32, v: f32) {
#ifdef GRID
    atomicStore(&act[i], bitcast<u32>(v));
#else
    act[i] = v;
#endif
}

// Stage (m, k, weight offset, input offset, output offset, swiglu input) of GEMV `g`.
struct Gemv {
    m: u32,
    k: u32,
    w_at: u32,
    x_at: u32,
    y_at: u32,
    swiglu: bool,
}

fn gemv_of(g: u32) -> Gemv {
    let layer = g / 4u;
    let base = layer * LAYER_W;
    switch g % 4u {
        case 0u: { return Gemv(PW, D, base, H_AT, P_AT, false); }
        case 1u: { return Gemv(D, DI, base + PW * D / 8u, P_AT, O_AT, false); }
        case 2u: { return Gemv(2u * FF, D, base + (PW * D + D * DI) / 8u, O_AT, G_AT, false); }
        default: { return Gemv(D, FF, base + (PW * D + D * DI + 2u * FF * D) / 8u, G_AT, H_AT, true); }
    }
}

// X of the GEMV being computed, after its RMS scale: [k / 4] vec4<f32>.
var<workgroup> xs: array<vec4<f32>, 1376>;
// Per subgroup: the RMS reduction's partial sums.
var<workgroup> red: array<f32, 64>;

// Eight weights (one 16-byte load) times inputs 8c .. 8c + 7.
fn dot8(wv: vec4<u32>, c: u32) -> f32 {
    let a = vec4<f32>(unpack2x16float(wv.x), unpack2x16float(wv.y));
    let b = vec4<f32>(unpack2x16float(wv.z), unpack2x16float(wv.w));
    return dot(a, xs[2u * c]) + dot(b, xs[2u * c + 1u]);
}

// Input element c of `gv` (SwiGLU applied for down), before the RMS scale.
fn x_at(gv: Gemv, c: u32) -> f32 {
    if gv.swiglu {
        let g = act_load(gv.x_at + c);
        let u = act_load(gv.x_at + FF + c);
        return g / (1.0 + exp(-g)) * u;
    }
    return act_load(gv.x_at + c);
}

// Stages X of `gv` in workgroup memory, scaled to unit RMS. Contains barriers.
fn stage(gv: Gemv, li: u32, lane: u32, sgs: u32) {
    var ss = 0.0;
    for (var q = li; q < gv.k / 4u; q += 256u) {
        let e = 4u * q;
        let v = vec4<f32>(x_at(gv, e), x_at(gv, e + 1u), x_at(gv, e + 2u), x_at(gv, e + 3u));
        xs[q] = v;
        ss += dot(v, v);
    }
    let s = subgroupAdd(ss);
    if lane == 0u { red[li / sgs] = s; }
    workgroupBarrier();
    var t = 0.0;
    for (var i = 0u; i < 256u / sgs; i++) { t += red[i]; }
    let scale = inverseSqrt(t / f32(gv.k) + 1e-6);
    for (var q = li; q < gv.k / 4u; q += 256u) {
        xs[q] *= scale;
    }
    workgroupBarrier();
}

// Rows first, first + stride, ... of `gv`: one subgroup per row (lane j taking the 16-byte
// chunks j, j + sgs, ...), two rows per iteration with all their loads issued before the sums.
fn rows(gv: Gemv, first: u32, stride: u32, lane: u32, sgs: u32) {
    let kc = gv.k / 8u;
    var row = first;
    loop {
        if row >= gv.m { break; }
        let row2 = row + stride;
        let two = row2 < gv.m;
        let wr = gv.w_at + row * kc;
        let wr2 = gv.w_at + select(row, row2, two) * kc;
        var acc = 0.0;
        var acc2 = 0.0;
        for (var c = lane; c < kc; c += sgs) {
            let a = w[wr + c];
            let b = w[wr2 + c];
            acc += dot8(a, c);
            acc2 += dot8(b, c);
        }
        let s = subgroupAdd(acc);
        let s2 = subgroupAdd(acc2);
        if lane == 0u {
            act_store(gv.y_at + row, s);
            if two { act_store(gv.y_at + row2, s2); }
        }
        row += 2u * stride;
    }
}

#ifdef GRID
// Every workgroup of the dispatch arrives, then waits until all have: the n-th barrier of the
// dispatch releases when the counter reaches base + n * groups.
fn grid_barrier(n: u32, li: u32) {
    storageBarrier();
    workgroupBarrier();
    if li == 0u {
        atomicAdd(&sync[0], 1u);
        let goal = p.base + n * p.groups;
        loop {
            if atomicLoad(&sync[0]) >= goal { break; }
        }
    }
    workgroupBarrier();
    storageBarrier();
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32,
        @builtin(subgroup_invocation_id) lane: u32, @builtin(subgroup_size) sgs: u32) {
    let nsg = 256u / sgs;
    let n = 4u * p.layers;
    for (var g = 0u; g < n; g++) {
#ifndef EMPTY
        let gv = gemv_of(g);
        stage(gv, li, lane, sgs);
        rows(gv, wid.x * nsg + li / sgs, p.groups * nsg, lane, sgs);
#endif
        if g + 1u < n {
            grid_barrier(g + 1u, li);
        }
    }
}
#else
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32,
        @builtin(subgroup_invocation_id) lane: u32, @builtin(subgroup_size) sgs: u32) {
    let gv = gemv_of(p.phase);
    let nsg = 256u / sgs;
    stage(gv, li, lane, sgs);
    rows(gv, wid.x * nsg + li / sgs, p.groups * nsg, lane, sgs);
}

// Fills the weights with a hash in [-a, a] with a = 1.7 / sqrt(k) per matrix (about unit-variance
// outputs for unit-variance inputs), and the activations' h with values in [-1, 1].
@compute @workgroup_size(256)
fn fill(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = gid.x + gid.y * nw.x * 256u;
    let total = p.layers * LAYER_W;
    if i < total {
        let inl = i % LAYER_W;
        var k = D;
        if inl >= PW * D / 8u && inl < (PW * D + D * DI) / 8u { k = DI; }
        if inl >= (PW * D + D * DI + 2u * FF * D) / 8u { k = FF; }
        let a = 1.7 / sqrt(f32(k));
        var h = i * 2654435761u + 12345u;
        var q: array<u32, 4>;
        for (var e = 0u; e < 4u; e++) {
            h ^= h >> 15u; h *= 2246822519u; h ^= h >> 13u; h *= 3266489917u; h ^= h >> 16u;
            let v0 = (f32(h & 0xffffu) / 32767.5 - 1.0) * a;
            let v1 = (f32(h >> 16u) / 32767.5 - 1.0) * a;
            q[e] = pack2x16float(vec2<f32>(v0, v1));
        }
        w[i] = vec4<u32>(q[0], q[1], q[2], q[3]);
    }
    if i < D {
        act[H_AT + i] = f32((i * 37u) % 201u) / 100.0 - 1.0;
    }
}
#endif
