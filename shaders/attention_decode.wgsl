// Attention for one decode step, split over the keys (flash-decoding), with RoPE on q and the
// KV store fused in.
//
// Default entry (split): one workgroup of 256 threads per (query head, block of 64 visible keys). The visible
// keys are the meta slots plus the text positions [lo, q] (lo from the sliding window; the
// reference decode window is W - 1). In a KV-owning layer (self_kv = 1) the current position's
// key and value come straight from the in_proj output (key rotated here) and the first query
// head of each KV group writes them to the cache slot of q, which no other workgroup reads (the
// ring is longer than the window). Each workgroup writes a partial result for its block:
// part[h, s] = (block max m, sum l of exp(score - m), sum of exp(score - m) * v).
// Grid: (n_heads, n_splits, 1); splits past the last visible key write nothing.
// Define CPU_SPLIT: the split entry for CPU adapters (64 threads, one key per thread).
// Define KV_F16 (with any split entry): the cache holds f16, two per u32 word; keys and values
// are widened to f32 as they are loaded (f32 accumulation), the store rounds to nearest, and
// this step's own key and value are rounded the same way before use, so the step sees them as
// the cache will hold them.
// Define COMBINE: merges the partials of each head into the attention output.
// Grid: (n_heads, 1, 1).

struct Params {
    n_heads: u32,
    n_kv_heads: u32,
    d_qk: u32,
    d_v: u32,
    q_stride: u32,   // in_proj output row width (q at column 0)
    k_col: u32,      // column of k in the in_proj row
    v_col: u32,      // column of v
    self_kv: u32,    // 1 when this layer owns its KV
    pos: u32,        // absolute position of the query
    n_meta: u32,
    ring: u32,
    cap: u32,        // slots per KV head
    window: u32,     // max q - k for text keys; 0xffffffff = global
    scale: f32,
    n_splits: u32,   // splits in the grid (partials stride)
}

@group(0) @binding(0) var<uniform> p: Params;
// part: [n_heads, n_splits, 2 + d_v] f32 partial results.
#ifdef COMBINE
@group(0) @binding(1) var<storage, read> part: array<f32>;
// out: [n_heads * d_v] f32 attention output, heads concatenated.
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
#else
@group(0) @binding(1) var<storage, read_write> part: array<f32>;
// pbuf: [1, q_stride] f32 in_proj output row of this step.
@group(0) @binding(2) var<storage, read> pbuf: array<f32>;
// cs: [positions, d_qk / 2, 2] f32 RoPE (cos, sin).
@group(0) @binding(3) var<storage, read> cs: array<f32>;
#ifdef KV_F16
// kc: [n_kv_heads, cap, d_qk / 4] vec2<u32> keys (post-RoPE); d_qk % 4 == 0. In memory
// [n_kv_heads, cap, d_qk / 2] u32, two f16 per word (element 2i in the low half).
@group(0) @binding(4) var<storage, read_write> kc: array<vec2<u32>>;
// vc: [n_kv_heads, cap, d_v / 4] vec2<u32> values ([n_kv_heads, cap, d_v / 2] u32, two f16 per
// word); d_v % 4 == 0.
@group(0) @binding(5) var<storage, read_write> vc: array<vec2<u32>>;
fn f16x4(w: vec2<u32>) -> vec4<f32> { return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)); }
fn kld(i: u32) -> vec4<f32> { return f16x4(kc[i]); }
fn vld(i: u32) -> vec4<f32> { return f16x4(vc[i]); }
// Two values as one word of f16, clamped to the f16 range first (WGSL leaves pack2x16float of
// larger values undefined).
fn pack_f16(v: vec2<f32>) -> u32 { return pack2x16float(clamp(v, vec2<f32>(-65504.0), vec2<f32>(65504.0))); }
fn kst(i: u32, v: vec4<f32>) { kc[i] = vec2<u32>(pack_f16(v.xy), pack_f16(v.zw)); }
fn vst(i: u32, v: vec4<f32>) { vc[i] = vec2<u32>(pack_f16(v.xy), pack_f16(v.zw)); }
// This step's key and value as the cache holds them (rounded to f16), so that a step reads its
// own key and value exactly as later steps and the prompt attention will.
// The rounding is done on the bits, not as unpack2x16float(pack2x16float(x)): NVIDIA's compiler
// folds that round trip away (measured on an H200: the step then used its unrounded key and
// value). Round to nearest even to 10 mantissa bits for f16's normal range, to a multiple of
// 2^-24 below it (f16 subnormals), after clamping to +-65504: what pack2x16float stores.
fn kvr(x: f32) -> f32 {
    let c = clamp(x, -65504.0, 65504.0);
    if (abs(c) < 6.103515625e-5) { return round(c * 16777216.0) / 16777216.0; }
    let b = bitcast<u32>(c);
    return bitcast<f32>((b + 0x0fffu + ((b >> 13u) & 1u)) & 0xffffe000u);
}
fn kvr4(v: vec4<f32>) -> vec4<f32> { return vec4<f32>(kvr(v.x), kvr(v.y), kvr(v.z), kvr(v.w)); }
#else
// kc: [n_kv_heads, cap, d_qk / 4] vec4<f32> keys (post-RoPE); d_qk % 4 == 0.
@group(0) @binding(4) var<storage, read_write> kc: array<vec4<f32>>;
// vc: [n_kv_heads, cap, d_v / 4] vec4<f32> values; d_v % 4 == 0.
@group(0) @binding(5) var<storage, read_write> vc: array<vec4<f32>>;
fn kld(i: u32) -> vec4<f32> { return kc[i]; }
fn vld(i: u32) -> vec4<f32> { return vc[i]; }
fn kst(i: u32, v: vec4<f32>) { kc[i] = v; }
fn vst(i: u32, v: vec4<f32>) { vc[i] = v; }
fn kvr(x: f32) -> f32 { return x; }
fn kvr4(v: vec4<f32>) -> vec4<f32> { return v; }
#endif
#endif

const WG: u32 = 64u;  // threads of the combine and CPU_SPLIT entries
const KB: u32 = 64u;  // keys per split block
const NEG: f32 = -3.0e38;
var<workgroup> red: array<f32, 64>;

fn visible(q: u32) -> vec3<u32> {
    // (meta keys visible, first text position, number of keys)
    let n_meta_vis = min(p.n_meta, q + 1u);
    var lo = p.n_meta;
    if (p.window != 0xffffffffu && q > p.window) { lo = max(p.n_meta, q - p.window); }
    var n_text = 0u;
    if (q >= lo) { n_text = q + 1u - lo; }
    return vec3<u32>(n_meta_vis, lo, n_meta_vis + n_text);
}

#ifdef COMBINE
var<workgroup> wsplit: array<f32, 256>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wid.x;
    let vis = visible(p.pos);
    let used = min((vis.z + KB - 1u) / KB, 256u);
    let stride = 2u + p.d_v;
    let base = h * p.n_splits * stride;
    var m = NEG;
    for (var s = li; s < used; s += WG) { m = max(m, part[base + s * stride]); }
    red[li] = m;
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st = st >> 1u) {
        if (li < st) { red[li] = max(red[li], red[li + st]); }
        workgroupBarrier();
    }
    let gm = red[0];
    workgroupBarrier();
    var l = 0.0;
    for (var s = li; s < used; s += WG) {
        let w = exp(part[base + s * stride] - gm);
        wsplit[s] = w;
        l += w * part[base + s * stride + 1u];
    }
    red[li] = l;
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st = st >> 1u) {
        if (li < st) { red[li] = red[li] + red[li + st]; }
        workgroupBarrier();
    }
    let gl = red[0];
    for (var e = li; e < p.d_v; e += WG) {
        var a0 = 0.0;
        var a1 = 0.0;
        var a2 = 0.0;
        var a3 = 0.0;
        var s = 0u;
        for (; s + 3u < used; s += 4u) {
            a0 += wsplit[s] * part[base + s * stride + 2u + e];
            a1 += wsplit[s + 1u] * part[base + (s + 1u) * stride + 2u + e];
            a2 += wsplit[s + 2u] * part[base + (s + 2u) * stride + 2u + e];
            a3 += wsplit[s + 3u] * part[base + (s + 3u) * stride + 2u + e];
        }
        for (; s < used; s++) { a0 += wsplit[s] * part[base + s * stride + 2u + e]; }
        out[h * p.d_v + e] = ((a0 + a1) + (a2 + a3)) / gl;
    }
}
#else
// Shared by both split entries: q of head h (and, in a KV-owning layer, this step's key)
// rotated into workgroup memory; the first query head of a KV group writes this step's key and
// value to the cache slot of q (once, split 0). `threads` is the workgroup size. Contains a
// barrier: call from uniform control flow.
var<workgroup> qs: array<f32, 256>;
var<workgroup> ks: array<f32, 256>;

fn slot(pos: u32) -> u32 {
    if (pos < p.n_meta) { return pos; }
    return p.n_meta + (pos - p.n_meta) % p.ring;
}

fn rope_and_store_kv(h: u32, split: u32, li: u32, threads: u32) {
    let q = p.pos;
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let half = p.d_qk / 2u;
    let self_slot = slot(q);
    let dq4 = p.d_qk / 4u;
    let dv4 = p.d_v / 4u;
    for (var e = li; e < half; e += threads) {
        let c = cs[(q * half + e) * 2u];
        let sn = cs[(q * half + e) * 2u + 1u];
        let a = pbuf[h * p.d_qk + e];
        let b = pbuf[h * p.d_qk + e + half];
        qs[e] = a * c - b * sn;
        qs[e + half] = b * c + a * sn;
        if (p.self_kv != 0u) {
            let ka = pbuf[p.k_col + kvh * p.d_qk + e];
            let kb2 = pbuf[p.k_col + kvh * p.d_qk + e + half];
            ks[e] = kvr(ka * c - kb2 * sn);
            ks[e + half] = kvr(kb2 * c + ka * sn);
        }
    }
    workgroupBarrier();
    // The first query head of a KV group stores this step's key and value (once, split 0).
    if (p.self_kv != 0u && split == 0u && h % (p.n_heads / p.n_kv_heads) == 0u) {
        for (var e4 = li; e4 < dq4; e4 += threads) {
            kst((kvh * p.cap + self_slot) * dq4 + e4, vec4<f32>(ks[4u * e4], ks[4u * e4 + 1u], ks[4u * e4 + 2u], ks[4u * e4 + 3u]));
        }
        for (var e4 = li; e4 < dv4; e4 += threads) {
            let vb = p.v_col + kvh * p.d_v + 4u * e4;
            vst((kvh * p.cap + self_slot) * dv4 + e4, vec4<f32>(pbuf[vb], pbuf[vb + 1u], pbuf[vb + 2u], pbuf[vb + 3u]));
        }
    }
}

// Position of visible key j (meta keys first, then text positions from vis.y).
fn key_pos(vis: vec3<u32>, j: u32) -> u32 {
    if (j >= vis.x) { return vis.y + (j - vis.x); }
    return j;
}

const SWG: u32 = 256u;  // threads of the GPU split entries

fn kload(b: u32, e4: u32, dq4: u32) -> vec4<f32> {
    return select(vec4<f32>(0.0), kld(b + min(e4, dq4 - 1u)), e4 < dq4);
}

// Value vec4 e4 of block key j (clamped to the block's last key; callers mask past nk).
fn vload(vis: vec3<u32>, kb: u32, nk: u32, j: u32, vrow: u32, e4: u32) -> vec4<f32> {
    return vld((vrow + slot(key_pos(vis, kb + min(j, nk - 1u)))) * (p.d_v / 4u) + e4);
}

// What a GPU split entry loads of its block of KB keys (KV head kvh), all before any barrier.
// Keys: lane (key jl = li / 4, quarter qd = li % 4) holds the vec4s qd, qd + 4, qd + 8, qd + 12 of
// its key (d_qk <= 64; the rest are read later). Values: lane e4 of group g (256 / (d_v / 4)
// groups) holds vec4 e4 of the keys g, g + groups, ..., g + 7 groups (the whole block when
// d_v <= 128; the rest are read later), and of this step's value, which replaces the cache
// slot's for the key q itself.
struct BlockLoads {
    nk: u32,      // keys in the block
    self_j: u32,  // index of this step's key (the last visible one) in a KV-owning layer, else none
    jl: u32,
    kj: u32,      // this lane's key (clamped to the block)
    qd: u32,
    kbase: u32,
    k0: vec4<f32>, k1: vec4<f32>, k2: vec4<f32>, k3: vec4<f32>,
    groups: u32,
    g: u32,
    e4: u32,
    vrow: u32,
    vself: vec4<f32>,
    v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>,
    v4: vec4<f32>, v5: vec4<f32>, v6: vec4<f32>, v7: vec4<f32>,
}

fn load_block(li: u32, kvh: u32, vis: vec3<u32>, kb: u32) -> BlockLoads {
    let dq4 = p.d_qk / 4u;
    let dv4 = p.d_v / 4u;
    let nk = min(KB, vis.z - kb);
    var b: BlockLoads;
    b.nk = nk;
    b.self_j = 0xffffffffu;
    if (p.self_kv != 0u) { b.self_j = vis.z - 1u; }
    b.jl = li / 4u;
    b.qd = li % 4u;
    b.kj = kb + min(b.jl, nk - 1u);
    b.kbase = (kvh * p.cap + slot(key_pos(vis, b.kj))) * dq4;
    b.k0 = kload(b.kbase, b.qd, dq4);
    b.k1 = kload(b.kbase, b.qd + 4u, dq4);
    b.k2 = kload(b.kbase, b.qd + 8u, dq4);
    b.k3 = kload(b.kbase, b.qd + 12u, dq4);
    b.groups = max(SWG / max(dv4, 1u), 1u);
    b.g = li / max(dv4, 1u);
    b.e4 = min(li % max(dv4, 1u), dv4 - 1u);
    b.vrow = kvh * p.cap;
    let vb = p.v_col + kvh * p.d_v + 4u * b.e4;
    b.vself = kvr4(vec4<f32>(pbuf[vb], pbuf[vb + 1u], pbuf[vb + 2u], pbuf[vb + 3u]));
    let gs = b.groups;
    b.v0 = vload(vis, kb, nk, b.g, b.vrow, b.e4);
    b.v1 = vload(vis, kb, nk, b.g + gs, b.vrow, b.e4);
    b.v2 = vload(vis, kb, nk, b.g + 2u * gs, b.vrow, b.e4);
    b.v3 = vload(vis, kb, nk, b.g + 3u * gs, b.vrow, b.e4);
    b.v4 = vload(vis, kb, nk, b.g + 4u * gs, b.vrow, b.e4);
    b.v5 = vload(vis, kb, nk, b.g + 5u * gs, b.vrow, b.e4);
    b.v6 = vload(vis, kb, nk, b.g + 6u * gs, b.vrow, b.e4);
    b.v7 = vload(vis, kb, nk, b.g + 7u * gs, b.vrow, b.e4);
    return b;
}

#ifdef CPU_SPLIT
// Split entry for CPU adapters (lavapipe, SwiftShader), which run each workgroup barrier as a
// context switch per invocation: 64 threads, one key each, tree reductions. Same partials.
var<workgroup> pr: array<f32, 64>;
var<workgroup> sl: array<u32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wid.x;
    let split = wid.y;
    let q = p.pos;
    let vis = visible(q);
    let kb = split * KB;
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let dq4 = p.d_qk / 4u;
    let dv4 = p.d_v / 4u;
    if (kb >= vis.z) { return; }
    rope_and_store_kv(h, split, li, WG);
    let j = kb + li;
    var s = NEG;
    var sidx = 0u;
    if (j < vis.z) {
        var pos = j;
        if (j >= vis.x) { pos = vis.y + (j - vis.x); }
        var d = vec4<f32>(0.0);
        if (p.self_kv != 0u && pos == q) {
            sidx = 0xffffffffu;
            for (var e = 0u; e < p.d_qk; e += 4u) {
                d += vec4<f32>(qs[e], qs[e + 1u], qs[e + 2u], qs[e + 3u]) * vec4<f32>(ks[e], ks[e + 1u], ks[e + 2u], ks[e + 3u]);
            }
        } else {
            sidx = slot(pos);
            let b = (kvh * p.cap + sidx) * dq4;
            var e4 = 0u;
            for (; e4 + 1u < dq4; e4 += 2u) {
                let k0 = kld(b + e4);
                let k1 = kld(b + e4 + 1u);
                let e = 4u * e4;
                d += vec4<f32>(qs[e], qs[e + 1u], qs[e + 2u], qs[e + 3u]) * k0;
                d += vec4<f32>(qs[e + 4u], qs[e + 5u], qs[e + 6u], qs[e + 7u]) * k1;
            }
            if (e4 < dq4) {
                let e = 4u * e4;
                d += vec4<f32>(qs[e], qs[e + 1u], qs[e + 2u], qs[e + 3u]) * kld(b + e4);
            }
        }
        s = ((d.x + d.y) + (d.z + d.w)) * p.scale;
    }
    sl[li] = sidx;
    red[li] = s;
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st = st >> 1u) {
        if (li < st) { red[li] = max(red[li], red[li + st]); }
        workgroupBarrier();
    }
    let m = red[0];
    workgroupBarrier();
    var pj = 0.0;
    if (j < vis.z) { pj = exp(s - m); }
    pr[li] = pj;
    red[li] = pj;
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st = st >> 1u) {
        if (li < st) { red[li] = red[li] + red[li + st]; }
        workgroupBarrier();
    }
    let l = red[0];
    let nk = min(WG, vis.z - kb);
    let stride = 2u + p.d_v;
    let ob = (h * p.n_splits + split) * stride;
    if (li == 0u) {
        part[ob] = m;
        part[ob + 1u] = l;
    }
    // P·V: thread li owns dims 4*(li % dv4).. of keys with index ≡ li / dv4 (mod groups);
    // the groups' partial sums meet in workgroup memory.
    let groups = max(WG / max(dv4, 1u), 1u);
    let g = li / max(dv4, 1u);
    let e4 = li % max(dv4, 1u);
    var acc = vec4<f32>(0.0);
    if (g < groups && e4 < dv4) {
        for (var jj = g; jj < nk; jj += groups) {
            var v: vec4<f32>;
            if (sl[jj] == 0xffffffffu) {
                let vb = p.v_col + kvh * p.d_v + 4u * e4;
                v = kvr4(vec4<f32>(pbuf[vb], pbuf[vb + 1u], pbuf[vb + 2u], pbuf[vb + 3u]));
            } else {
                v = vld((kvh * p.cap + sl[jj]) * dv4 + e4);
            }
            acc += pr[jj] * v;
        }
    }
    workgroupBarrier();
    // Sum the groups: reuse qs/ks (256 + 256 floats) as scratch for [groups][d_v].
    if (g < groups && e4 < dv4 && g * p.d_v + 4u * e4 + 3u < 256u) {
        qs[g * p.d_v + 4u * e4] = acc.x;
        qs[g * p.d_v + 4u * e4 + 1u] = acc.y;
        qs[g * p.d_v + 4u * e4 + 2u] = acc.z;
        qs[g * p.d_v + 4u * e4 + 3u] = acc.w;
    }
    workgroupBarrier();
    for (var e = li; e < p.d_v; e += WG) {
        var a = 0.0;
        for (var gg = 0u; gg < groups && gg * p.d_v + e < 256u; gg++) { a += qs[gg * p.d_v + e]; }
        part[ob + 2u + e] = a;
    }
}
#else
#ifdef GQA
// Split entry for grouped queries (GPUs): one workgroup of 256 threads per (KV head, block of KB
// keys) serves all hpg = n_heads / n_kv_heads query heads of the group, so each key and value
// is read once per group instead of once per head (hpg <= 8, hpg * d_qk <= 512, d_v <= 128).
// Grid: (n_kv_heads, n_splits, 1). Loads as in the per-head entry below: all issued before the
// RoPE barrier. Scores: lane (key jl, quarter qd) for each head of the group, summed over the
// quarters; softmax: subgroup w takes head w; P.V: group g of lanes the keys g, g + groups, ...
// for every head, the groups meeting in workgroup memory. Partials as the per-head entry writes.
var<workgroup> gq: array<f32, 512>;                 // [hpg][d_qk] rotated queries
var<workgroup> gsc: array<f32, 512>;                // [hpg][KB] scaled scores
var<workgroup> gpr: array<f32, 512>;                // [hpg][KB] exp(score - block max)
var<workgroup> gsq: array<f32, 256>;                // quarter sums (no SUBGROUP32)
// GPV_HEADS (set by the host from the device's workgroup-storage limit, 1..8): heads whose P.V
// partial sums are reduced together, 4 KiB each.
#define GPV_HEADS 1
var<workgroup> gpv: array<vec4<f32>, 256 * GPV_HEADS>;  // [heads][groups][d_v / 4] partial P.V



fn gq4(o: u32) -> vec4<f32> { return vec4<f32>(gq[o], gq[o + 1u], gq[o + 2u], gq[o + 3u]); }

fn gpv_term(hh: u32, j: u32, v: vec4<f32>, vself: vec4<f32>, kb: u32, nk: u32, self_j: u32) -> vec4<f32> {
    return select(vec4<f32>(0.0), gpr[hh * KB + min(j, KB - 1u)] * select(v, vself, kb + j == self_j), j < nk);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let kvh = wid.x;
    let split = wid.y;
    let q = p.pos;
    let vis = visible(q);
    let kb = split * KB;
    let hpg = p.n_heads / p.n_kv_heads;
    let dq4 = p.d_qk / 4u;
    let dv4 = p.d_v / 4u;
    let half = p.d_qk / 2u;
    if (kb >= vis.z) { return; }
    // The block's keys and values (see load_block), loaded before any barrier.
    let bl = load_block(li, kvh, vis, kb);
    // RoPE on the group's queries (and this step's key), then the KV store (split 0).
    for (var i = li; i < hpg * half; i += SWG) {
        let hh = i / half;
        let e = i % half;
        let c = cs[(q * half + e) * 2u];
        let sn = cs[(q * half + e) * 2u + 1u];
        let qb = (kvh * hpg + hh) * p.d_qk;
        let a = pbuf[qb + e];
        let b = pbuf[qb + e + half];
        gq[hh * p.d_qk + e] = a * c - b * sn;
        gq[hh * p.d_qk + e + half] = b * c + a * sn;
    }
    if (p.self_kv != 0u) {
        for (var e = li; e < half; e += SWG) {
            let c = cs[(q * half + e) * 2u];
            let sn = cs[(q * half + e) * 2u + 1u];
            let ka = pbuf[p.k_col + kvh * p.d_qk + e];
            let kb2 = pbuf[p.k_col + kvh * p.d_qk + e + half];
            ks[e] = kvr(ka * c - kb2 * sn);
            ks[e + half] = kvr(kb2 * c + ka * sn);
        }
    }
    workgroupBarrier();
    if (p.self_kv != 0u && split == 0u) {
        let self_slot = slot(q);
        for (var f = li; f < dq4; f += SWG) {
            kst((kvh * p.cap + self_slot) * dq4 + f, vec4<f32>(ks[4u * f], ks[4u * f + 1u], ks[4u * f + 2u], ks[4u * f + 3u]));
        }
        for (var f = li; f < dv4; f += SWG) {
            let vb = p.v_col + kvh * p.d_v + 4u * f;
            vst((kvh * p.cap + self_slot) * dv4 + f, vec4<f32>(pbuf[vb], pbuf[vb + 1u], pbuf[vb + 2u], pbuf[vb + 3u]));
        }
    }
    // Scores of key jl for every head of the group.
    let live = bl.jl < bl.nk;
    let is_self = bl.kj == bl.self_j;
    for (var hh = 0u; hh < hpg; hh++) {
        let qo = hh * p.d_qk + 4u * bl.qd;
        var d: vec4<f32>;
        if (is_self) {
            d = vec4<f32>(0.0);
            for (var f = bl.qd; f < dq4; f += 4u) {
                let e = 4u * f;
                d += gq4(hh * p.d_qk + e) * vec4<f32>(ks[e], ks[e + 1u], ks[e + 2u], ks[e + 3u]);
            }
        } else {
            d = (bl.k0 * gq4(qo) + bl.k1 * gq4(qo + 16u)) + (bl.k2 * gq4(qo + 32u) + bl.k3 * gq4(qo + 48u));
            for (var f = bl.qd + 16u; f < dq4; f += 4u) { d += gq4(hh * p.d_qk + 4u * f) * kld(bl.kbase + f); }
        }
        let pd = (d.x + d.y) + (d.z + d.w);
#ifdef SUBGROUP32
        let s1 = pd + subgroupShuffleXor(pd, 1u);
        let sc = s1 + subgroupShuffleXor(s1, 2u);
        if (bl.qd == 0u) { gsc[hh * KB + bl.jl] = select(NEG, sc * p.scale, live); }
#else
        gsq[li] = pd;
        workgroupBarrier();
        if (bl.qd == 0u) {
            let sc = (gsq[li] + gsq[li + 1u]) + (gsq[li + 2u] + gsq[li + 3u]);
            gsc[hh * KB + bl.jl] = select(NEG, sc * p.scale, live);
        }
        workgroupBarrier();
#endif
    }
    workgroupBarrier();
    // Softmax statistics: subgroup w (32 lanes, 2 keys each) for head w.
    let stride = 2u + p.d_v;
#ifdef SUBGROUP32
    let w = li / 32u;
    let lane = li % 32u;
    if (w < hpg) {
        let a = gsc[w * KB + lane];
        let b = gsc[w * KB + lane + 32u];
        let m = subgroupMax(max(a, b));
        let pa = select(0.0, exp(a - m), lane < bl.nk);
        let pb = select(0.0, exp(b - m), lane + 32u < bl.nk);
        gpr[w * KB + lane] = pa;
        gpr[w * KB + lane + 32u] = pb;
        let l = subgroupAdd(pa + pb);
        if (lane == 0u) {
            let ob = ((kvh * hpg + w) * p.n_splits + split) * stride;
            part[ob] = m;
            part[ob + 1u] = l;
        }
    }
#else
    if (li < hpg) {
        var m = NEG;
        for (var j = 0u; j < bl.nk; j++) { m = max(m, gsc[li * KB + j]); }
        var l = 0.0;
        for (var j = 0u; j < KB; j++) {
            let pj = select(0.0, exp(gsc[li * KB + j] - m), j < bl.nk);
            gpr[li * KB + j] = pj;
            l += pj;
        }
        let ob = ((kvh * hpg + li) * p.n_splits + split) * stride;
        part[ob] = m;
        part[ob + 1u] = l;
    }
#endif
    workgroupBarrier();
    // P.V for every head from the prefetched values, GPV_HEADS heads at a time: the groups'
    // partial sums of one head take 4 KiB of workgroup memory, and all eight heads the kernel
    // allows would need 32 KiB, over the 16-32 KiB browsers allow; where the device allows
    // GPV_HEADS >= hpg (Hymba-1.5B: 5 heads in 29 KiB in all) there is one round.
    for (var h0 = 0u; h0 < hpg; h0 += GPV_HEADS) {
        let nh = min(GPV_HEADS, hpg - h0);
        if (bl.g < bl.groups && li % max(dv4, 1u) < dv4) {
            for (var i = 0u; i < nh; i++) {
                let hh = h0 + i;
                var acc = (gpv_term(hh, bl.g, bl.v0, bl.vself, kb, bl.nk, bl.self_j) + gpv_term(hh, bl.g + bl.groups, bl.v1, bl.vself, kb, bl.nk, bl.self_j))
                    + (gpv_term(hh, bl.g + 2u * bl.groups, bl.v2, bl.vself, kb, bl.nk, bl.self_j) + gpv_term(hh, bl.g + 3u * bl.groups, bl.v3, bl.vself, kb, bl.nk, bl.self_j));
                acc += (gpv_term(hh, bl.g + 4u * bl.groups, bl.v4, bl.vself, kb, bl.nk, bl.self_j) + gpv_term(hh, bl.g + 5u * bl.groups, bl.v5, bl.vself, kb, bl.nk, bl.self_j))
                    + (gpv_term(hh, bl.g + 6u * bl.groups, bl.v6, bl.vself, kb, bl.nk, bl.self_j) + gpv_term(hh, bl.g + 7u * bl.groups, bl.v7, bl.vself, kb, bl.nk, bl.self_j));
                for (var jj = bl.g + 8u * bl.groups; jj < bl.nk; jj += bl.groups) {
                    var v = vld((bl.vrow + slot(key_pos(vis, kb + jj))) * dv4 + bl.e4);
                    if (kb + jj == bl.self_j) { v = bl.vself; }
                    acc += gpr[hh * KB + jj] * v;
                }
                gpv[(i * bl.groups + bl.g) * dv4 + bl.e4] = acc;
            }
        }
        workgroupBarrier();
        for (var idx = li; idx < nh * dv4; idx += SWG) {
            let i = idx / dv4;
            let f = idx % dv4;
            var a = vec4<f32>(0.0);
            for (var gg = 0u; gg < bl.groups; gg++) { a += gpv[(i * bl.groups + gg) * dv4 + f]; }
            let ob = ((kvh * hpg + h0 + i) * p.n_splits + split) * stride;
            part[ob + 2u + 4u * f] = a.x;
            part[ob + 3u + 4u * f] = a.y;
            part[ob + 4u + 4u * f] = a.z;
            part[ob + 5u + 4u * f] = a.w;
        }
        workgroupBarrier();
    }
}
#else
// Split entry (GPUs): 256 threads per block of KB keys. Every global load of the block (its keys,
// its values, this step's value) is issued first, before the RoPE barrier, so the kernel waits
// for memory about once. Scores: 4 lanes per key, lane qd the vec4s qd, qd + 4, ... of the key
// (16 of them prefetched: d_qk <= 64, more in a loop), summed across the 4 lanes. P.V:
// 256 / (d_v / 4) groups of lanes, lane e4 one vec4 of the value, group g the keys g, g + groups,
// ... (8 prefetched: KB / groups <= 8 when d_v <= 128, more in a loop); the groups meet in
// workgroup memory. This step's key and value (pos == q in a KV-owning layer) replace the cache
// slot's stale contents after the loads. d_qk <= 256, d_v <= 1024.
var<workgroup> sq: array<f32, 256>;         // [KB keys][4] partial scores (no SUBGROUP32)
var<workgroup> pr: array<f32, 64>;          // [KB] exp(score - block max)
var<workgroup> wred: array<f32, 16>;        // per-subgroup max, then per-subgroup sum
var<workgroup> pv: array<vec4<f32>, 256>;   // [groups][d_v / 4] partial P.V



// Key j of the block weighted by its probability (zero past the block's nk keys); this step's
// value replaces the cache slot's for the key self_j.
fn pv_term(j: u32, v: vec4<f32>, vself: vec4<f32>, kb: u32, nk: u32, self_j: u32) -> vec4<f32> {
    return select(vec4<f32>(0.0), pr[min(j, KB - 1u)] * select(v, vself, kb + j == self_j), j < nk);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wid.x;
    let split = wid.y;
    let q = p.pos;
    let vis = visible(q);
    let kb = split * KB;
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let dq4 = p.d_qk / 4u;
    let dv4 = p.d_v / 4u;
    if (kb >= vis.z) { return; }
    // The block's keys and values (see load_block), loaded before any barrier.
    let bl = load_block(li, kvh, vis, kb);
    rope_and_store_kv(h, split, li, SWG);
    // Scores.
    var d = vec4<f32>(0.0);
    if (bl.kj == bl.self_j) {
        for (var f = bl.qd; f < dq4; f += 4u) {
            let e = 4u * f;
            d += vec4<f32>(qs[e], qs[e + 1u], qs[e + 2u], qs[e + 3u]) * vec4<f32>(ks[e], ks[e + 1u], ks[e + 2u], ks[e + 3u]);
        }
    } else {
        d = (bl.k0 * vec4<f32>(qs[4u * bl.qd], qs[4u * bl.qd + 1u], qs[4u * bl.qd + 2u], qs[4u * bl.qd + 3u])
            + bl.k1 * vec4<f32>(qs[4u * bl.qd + 16u], qs[4u * bl.qd + 17u], qs[4u * bl.qd + 18u], qs[4u * bl.qd + 19u]))
            + (bl.k2 * vec4<f32>(qs[4u * bl.qd + 32u], qs[4u * bl.qd + 33u], qs[4u * bl.qd + 34u], qs[4u * bl.qd + 35u])
            + bl.k3 * vec4<f32>(qs[4u * bl.qd + 48u], qs[4u * bl.qd + 49u], qs[4u * bl.qd + 50u], qs[4u * bl.qd + 51u]));
        for (var f = bl.qd + 16u; f < dq4; f += 4u) {
            let e = 4u * f;
            d += vec4<f32>(qs[e], qs[e + 1u], qs[e + 2u], qs[e + 3u]) * kld(bl.kbase + f);
        }
    }
    let part_dot = (d.x + d.y) + (d.z + d.w);
    let live = bl.jl < bl.nk;
#ifdef SUBGROUP32
    // The 4 lanes of a key, then the 8 keys of a subgroup, then the 8 subgroups.
    let s1 = part_dot + subgroupShuffleXor(part_dot, 1u);
    let sc = select(-3.0e38, (s1 + subgroupShuffleXor(s1, 2u)) * p.scale, live);
    let wmax = subgroupMax(sc);
    if (li % 32u == 0u) { wred[li / 32u] = wmax; }
    workgroupBarrier();
    var m = wred[0];
    for (var i = 1u; i < 8u; i++) { m = max(m, wred[i]); }
    let pj = select(0.0, exp(sc - m), live);
    if (bl.qd == 0u) { pr[bl.jl] = pj; }
    let wsum = subgroupAdd(select(0.0, pj, bl.qd == 0u));
    if (li % 32u == 0u) { wred[8u + li / 32u] = wsum; }
    workgroupBarrier();
    var l = 0.0;
    for (var i = 8u; i < 16u; i++) { l += wred[i]; }
#else
    sq[li] = part_dot;
    workgroupBarrier();
    var m = NEG;
    for (var jj = 0u; jj < bl.nk; jj++) {
        m = max(m, ((sq[4u * jj] + sq[4u * jj + 1u]) + (sq[4u * jj + 2u] + sq[4u * jj + 3u])) * p.scale);
    }
    if (li < KB) {
        var pj = 0.0;
        if (li < bl.nk) {
            pj = exp(((sq[4u * li] + sq[4u * li + 1u]) + (sq[4u * li + 2u] + sq[4u * li + 3u])) * p.scale - m);
        }
        pr[li] = pj;
    }
    workgroupBarrier();
    var l = 0.0;
    for (var jj = 0u; jj < bl.nk; jj++) { l += pr[jj]; }
#endif
    let stride = 2u + p.d_v;
    let ob = (h * p.n_splits + split) * stride;
    if (li == 0u) {
        part[ob] = m;
        part[ob + 1u] = l;
    }
    // P.V from the prefetched values (keys past nk have pr = 0; the clamped loads are finite).
    var acc = vec4<f32>(0.0);
    if (bl.g < bl.groups && li % max(dv4, 1u) < dv4) {
        acc = (pv_term(bl.g, bl.v0, bl.vself, kb, bl.nk, bl.self_j) + pv_term(bl.g + bl.groups, bl.v1, bl.vself, kb, bl.nk, bl.self_j))
            + (pv_term(bl.g + 2u * bl.groups, bl.v2, bl.vself, kb, bl.nk, bl.self_j) + pv_term(bl.g + 3u * bl.groups, bl.v3, bl.vself, kb, bl.nk, bl.self_j));
        acc += (pv_term(bl.g + 4u * bl.groups, bl.v4, bl.vself, kb, bl.nk, bl.self_j) + pv_term(bl.g + 5u * bl.groups, bl.v5, bl.vself, kb, bl.nk, bl.self_j))
            + (pv_term(bl.g + 6u * bl.groups, bl.v6, bl.vself, kb, bl.nk, bl.self_j) + pv_term(bl.g + 7u * bl.groups, bl.v7, bl.vself, kb, bl.nk, bl.self_j));
        for (var jj = bl.g + 8u * bl.groups; jj < bl.nk; jj += bl.groups) {
            var v = vld((bl.vrow + slot(key_pos(vis, kb + jj))) * dv4 + bl.e4);
            if (kb + jj == bl.self_j) { v = bl.vself; }
            acc += pr[jj] * v;
        }
        pv[bl.g * dv4 + bl.e4] = acc;
    }
    workgroupBarrier();
    for (var f = li; f < dv4; f += SWG) {
        var a = vec4<f32>(0.0);
        for (var gg = 0u; gg < bl.groups; gg++) { a += pv[gg * dv4 + f]; }
        part[ob + 2u + 4u * f] = a.x;
        part[ob + 3u + 4u * f] = a.y;
        part[ob + 4u + 4u * f] = a.z;
        part[ob + 5u + 4u * f] = a.w;
    }
}
#endif
#endif
#endif
