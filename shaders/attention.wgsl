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
// kc: [n_kv_heads, cap, d_qk] f32 keys.
@group(0) @binding(2) var<storage, read> kc: array<f32>;
// vc: [n_kv_heads, cap, d_v] f32 values.
@group(0) @binding(3) var<storage, read> vc: array<f32>;
// out: [rows, out_stride] f32, heads concatenated (head h at h * d_v).
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const WG: u32 = 64u;
const NEG: f32 = -3.0e38;
var<workgroup> qs: array<f32, 256>;
var<workgroup> pr: array<f32, 64>;
var<workgroup> sl: array<u32, 64>;
var<workgroup> red: array<f32, 64>;

fn slot(pos: u32) -> u32 {
    if (pos < p.n_meta) { return pos; }
    return p.n_meta + (pos - p.n_meta) % p.ring;
}

fn reduce_max(li: u32, v: f32) -> f32 {
    red[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (li < s) { red[li] = max(red[li], red[li + s]); }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn reduce_sum(li: u32, v: f32) -> f32 {
    red[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (li < s) { red[li] = red[li] + red[li + s]; }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wid.x;
    let t = wid.y;
    let q = p.pos0 + t;
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let qb = p.q_off + t * p.q_stride + h * p.d_qk;
    for (var e = li; e < p.d_qk; e += WG) { qs[e] = pbuf[qb + e]; }
    workgroupBarrier();

    // Visible keys: meta [0, n_meta_vis) then text [lo, q].
    let n_meta_vis = min(p.n_meta, q + 1u);
    var lo = p.n_meta;
    if (p.window != 0xffffffffu && q > p.window) { lo = max(p.n_meta, q - p.window); }
    var n_text = 0u;
    if (q >= lo) { n_text = q + 1u - lo; }
    let n_keys = n_meta_vis + n_text;

    var m = NEG;
    var l = 0.0;
    var acc: array<f32, 4>;
    for (var i = 0u; i < 4u; i++) { acc[i] = 0.0; }
    for (var kb = 0u; kb < n_keys; kb += WG) {
        let j = kb + li;
        var s = NEG;
        var sidx = 0u;
        if (j < n_keys) {
            var pos = j;
            if (j >= n_meta_vis) { pos = lo + (j - n_meta_vis); }
            sidx = slot(pos);
            let kbase = (kvh * p.cap + sidx) * p.d_qk;
            var d = 0.0;
            for (var e = 0u; e < p.d_qk; e++) { d += qs[e] * kc[kbase + e]; }
            s = d * p.scale;
        }
        sl[li] = sidx;
        let bm = reduce_max(li, s);
        let nm = max(m, bm);
        let corr = exp(m - nm);
        var pj = 0.0;
        if (j < n_keys) { pj = exp(s - nm); }
        pr[li] = pj;
        let bs = reduce_sum(li, pj);
        l = l * corr + bs;
        let nk = min(WG, n_keys - kb);
        for (var i = 0u; i < 4u; i++) {
            let e = li + i * WG;
            if (e < p.d_v) {
                var a = acc[i] * corr;
                for (var jj = 0u; jj < nk; jj++) {
                    a += pr[jj] * vc[(kvh * p.cap + sl[jj]) * p.d_v + e];
                }
                acc[i] = a;
            }
        }
        m = nm;
        workgroupBarrier();
    }
    let ob = p.out_off + t * p.out_stride + h * p.d_v;
    for (var i = 0u; i < 4u; i++) {
        let e = li + i * WG;
        if (e < p.d_v) { out[ob + e] = acc[i] / l; }
    }
}
