// Hybrid-head attention branch: causal GQA attention of each query over the KV cache,
// with the sliding-window mask and always-visible meta tokens:
//   key k visible to query q  iff  k <= q  and (k < n_meta  or  q - k <= window)
// (window = 0xffffffff for global layers). Prefill uses window = W, a reference decode step W - 1.
// Online softmax over blocks of 64 keys (flash style): no [T, T] score matrix exists.
// KV consumers pass their producer's cache. One workgroup per (query head, query row).
// Grid: (n_heads, rows, 1).
// Single-token decode steps use attention_decode.wgsl (split over the keys).

struct Params {
    rows: u32,
    n_heads: u32,
    n_kv_heads: u32,
    d_qk: u32,
    d_v: u32,
    q_off: u32,      // element offset of q of row 0 in the in_proj output
    q_stride: u32,   // in_proj output row width
    out_off: u32,
    out_stride: u32, // attention output row width (n_heads * d_v)
    pos0: u32,       // absolute position of row 0
    n_meta: u32,
    ring: u32,       // text slots of the cache (ring length)
    cap: u32,        // slots per KV head = n_meta + ring
    window: u32,     // max q - k for text keys; 0xffffffff = global
    scale: f32,      // 1 / sqrt(d_qk)
    k_col: u32,      // unused here (layout shared with the Rust AttentionParams)
    v_col: u32,      // unused
    self_kv: u32,    // unused
}

@group(0) @binding(0) var<uniform> p: Params;
// pbuf: [rows, q_stride] f32 in_proj output, RoPE already applied to q.
@group(0) @binding(1) var<storage, read> pbuf: array<f32>;
// kc: [n_kv_heads, cap, d_qk / 4] vec4<f32> keys (d_qk % 4 == 0).
@group(0) @binding(2) var<storage, read> kc: array<vec4<f32>>;
// vc: [n_kv_heads, cap, d_v / 4] vec4<f32> values (d_v % 4 == 0).
@group(0) @binding(3) var<storage, read> vc: array<vec4<f32>>;
// out: [rows, out_stride] f32, heads concatenated (head h at h * d_v).
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

// 256 threads per (head, query row). Per block of KB keys: scores with 4 lanes per key (each a
// strided quarter of q.k, vec4 loads); the block max and sum read by every thread from
// workgroup memory (no reduction trees); P.V by 256 / (d_v / 4) groups of lanes, each lane one
// vec4 of the value and a share of the block's keys, with a running (rescaled) accumulator per
// lane; the groups meet once at the end. d_qk <= 256, d_v <= 1024.
const WG: u32 = 256u;
const KB: u32 = 64u;
const NEG: f32 = -3.0e38;
var<workgroup> qs: array<vec4<f32>, 64>;
var<workgroup> sq: array<f32, 256>;         // [KB keys][4] partial scores
var<workgroup> pr: array<f32, 64>;          // [KB] exp(score - running max)
var<workgroup> sl: array<u32, 64>;          // [KB] cache slot of each key
var<workgroup> pv: array<vec4<f32>, 256>;   // [groups][d_v / 4] partial outputs

fn slot(pos: u32) -> u32 {
    if (pos < p.n_meta) { return pos; }
    return p.n_meta + (pos - p.n_meta) % p.ring;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wid.x;
    let t = wid.y;
    let q = p.pos0 + t;
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let dq4 = p.d_qk / 4u;
    let dv4 = p.d_v / 4u;
    let qb = p.q_off + t * p.q_stride + h * p.d_qk;
    for (var e4 = li; e4 < dq4; e4 += WG) {
        qs[e4] = vec4<f32>(pbuf[qb + 4u * e4], pbuf[qb + 4u * e4 + 1u], pbuf[qb + 4u * e4 + 2u], pbuf[qb + 4u * e4 + 3u]);
    }
    workgroupBarrier();

    // Visible keys: meta [0, n_meta_vis) then text [lo, q].
    let n_meta_vis = min(p.n_meta, q + 1u);
    var lo = p.n_meta;
    if (p.window != 0xffffffffu && q > p.window) { lo = max(p.n_meta, q - p.window); }
    var n_text = 0u;
    if (q >= lo) { n_text = q + 1u - lo; }
    let n_keys = n_meta_vis + n_text;

    let jl = li / 4u;
    let qd = li % 4u;
    let groups = max(WG / max(dv4, 1u), 1u);
    let g = li / max(dv4, 1u);
    let e4 = li % max(dv4, 1u);
    var m = NEG;
    var l = 0.0;
    var acc = vec4<f32>(0.0);
    for (var kb = 0u; kb < n_keys; kb += KB) {
        let j = kb + jl;
        var d = vec4<f32>(0.0);
        var sidx = 0u;
        if (j < n_keys) {
            var pos = j;
            if (j >= n_meta_vis) { pos = lo + (j - n_meta_vis); }
            sidx = slot(pos);
            let b = (kvh * p.cap + sidx) * dq4;
            var f = qd;
            for (; f + 4u < dq4; f += 8u) {
                let k0 = kc[b + f];
                let k1 = kc[b + f + 4u];
                d += qs[f] * k0 + qs[f + 4u] * k1;
            }
            if (f < dq4) { d += qs[f] * kc[b + f]; }
        }
        sq[li] = (d.x + d.y) + (d.z + d.w);
        if (qd == 0u) { sl[jl] = sidx; }
        workgroupBarrier();
        let nk = min(KB, n_keys - kb);
        var bm = NEG;
        for (var jj = 0u; jj < nk; jj++) {
            bm = max(bm, ((sq[4u * jj] + sq[4u * jj + 1u]) + (sq[4u * jj + 2u] + sq[4u * jj + 3u])) * p.scale);
        }
        let nm = max(m, bm);
        let corr = exp(m - nm);
        if (li < KB) {
            var pj = 0.0;
            if (li < nk) {
                pj = exp(((sq[4u * li] + sq[4u * li + 1u]) + (sq[4u * li + 2u] + sq[4u * li + 3u])) * p.scale - nm);
            }
            pr[li] = pj;
        }
        workgroupBarrier();
        var bs = 0.0;
        for (var jj = 0u; jj < nk; jj++) { bs += pr[jj]; }
        l = l * corr + bs;
        m = nm;
        if (g < groups && e4 < dv4) {
            var a = acc * corr;
            let vb = kvh * p.cap;
            var jj = g;
            for (; jj + 3u * groups < nk; jj += 4u * groups) {
                let v0 = vc[(vb + sl[jj]) * dv4 + e4];
                let v1 = vc[(vb + sl[jj + groups]) * dv4 + e4];
                let v2 = vc[(vb + sl[jj + 2u * groups]) * dv4 + e4];
                let v3 = vc[(vb + sl[jj + 3u * groups]) * dv4 + e4];
                a += (pr[jj] * v0 + pr[jj + groups] * v1) + (pr[jj + 2u * groups] * v2 + pr[jj + 3u * groups] * v3);
            }
            for (; jj < nk; jj += groups) { a += pr[jj] * vc[(vb + sl[jj]) * dv4 + e4]; }
            acc = a;
        }
        workgroupBarrier();
    }
    if (g < groups && e4 < dv4) { pv[g * dv4 + e4] = acc; }
    workgroupBarrier();
    let ob = p.out_off + t * p.out_stride + h * p.d_v;
    for (var f = li; f < dv4; f += WG) {
        var a = vec4<f32>(0.0);
        for (var gg = 0u; gg < groups; gg++) { a += pv[gg * dv4 + f]; }
        a = a / l;
        out[ob + 4u * f] = a.x;
        out[ob + 4u * f + 1u] = a.y;
        out[ob + 4u * f + 2u] = a.z;
        out[ob + 4u * f + 3u] = a.w;
    }
}
