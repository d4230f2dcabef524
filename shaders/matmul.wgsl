// Matrix products against a weight matrix: Y[t, m] (+)= sum_k X[t, k] * W[m, k] (+ bias[m]).
//
// Entry points:
//   gemv  - few rows (decode): one workgroup of 256 threads = 8 rows of W x 32 threads per row,
//           grid (ceil(m / 8), rows).
//   gemm  - prompt chunks: 64x64 output tiles, 16-deep k steps through workgroup memory,
//           4x4 outputs per thread, grid (ceil(m / 64), ceil(rows / 64)).
// Variants (defines): W_F32 (f32 weights), W_Q8 / W_Q4 (block-quantized int8 / 4-bit weights with
// one f16 scale per 32 weights along K, dequantized in the weight readers), or f16 weights, read
// as native f16 when SHADER_F16 is set and as packed u32 pairs (unpack2x16float) otherwise.
// Accumulation is always f32.
// Fused prologues of the decode GEMV (X is transformed while it is read, so the elementwise
// step needs no dispatch of its own):
//   PRO_NORM   x' = aux * (x * rsqrt(mean(x^2) + eps))              (input / pre-MLP / final RMSNorm)
//   PRO_MERGE  x' = (aux[:k] * norm(x) + aux[k:] * norm(x2)) / 2    (hybrid-head merge before out_proj)
//   PRO_SWIGLU x' = silu(x[:, :k]) * x[:, k:2k]                      (SwiGLU before down_proj)

struct Params {
    rows: u32,       // T: rows of X and Y
    m: u32,          // output features = rows of W
    k: u32,          // input features
    kp4: u32,        // row stride of W in vec4 units (K padded to a multiple of 8, zero-filled)
    x_off: u32,      // element offset of X[0, 0]
    x_stride: u32,   // elements between rows of X
    y_off: u32,      // element offset of Y[0, 0]
    y_stride: u32,   // elements between rows of Y
    accumulate: u32, // 1: Y += result (residual add), 0: Y = result
    has_bias: u32,   // 1: add bias[m]
    eps: f32,        // RMSNorm epsilon of the PRO_NORM / PRO_MERGE prologues
    passes: u32,     // gemv: groups of 8 rows each workgroup computes (rows per workgroup / 8)
}

@group(0) @binding(0) var<uniform> p: Params;
// X: [rows, x_stride] f32, row-major, starting at x_off.
@group(0) @binding(1) var<storage, read> x: array<f32>;
// w4(i): elements 4i..4i+3 of W flattened; w8(i): elements 8i..8i+7 (16-byte loads for f16).
#ifdef W_F32
// W: [m, kp4] vec4<f32>, row-major (PyTorch Linear layout [out, in]).
@group(0) @binding(2) var<storage, read> w: array<vec4<f32>>;
fn w4(i: u32) -> vec4<f32> { return w[i]; }
fn w8a(i: u32) -> vec4<f32> { return w[2u * i]; }
fn w8b(i: u32) -> vec4<f32> { return w[2u * i + 1u]; }
#else
#ifdef W_Q8
// W: block-quantized int8 (layout: `quantize` in engine/src/kernels/mod.rs). Rows padded to
// kp = 4 * kp4 (a multiple of 32); quants [m * kp4] u32 (4 int8 per word, element 4i + j in
// byte j), then the f16 scales of the 32-weight blocks, two per word, from word m * kp4.
// Block of flattened element e: e / 32 (blocks never cross rows).
@group(0) @binding(2) var<storage, read> w: array<u32>;
fn wscale(b: u32) -> f32 {
    let v = unpack2x16float(w[p.m * p.kp4 + b / 2u]);
    return select(v.x, v.y, (b & 1u) == 1u);
}
fn dq8(v: u32) -> vec4<f32> {
    // sign-extend each byte: shift it to the top, arithmetic shift back down
    return vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(v << 24u, v << 16u, v << 8u, v)) >> vec4<u32>(24u));
}
fn w4(i: u32) -> vec4<f32> { return dq8(w[i]) * wscale(i / 8u); }
var<private> w8v: u32;
var<private> w8s: f32;
fn w8a(i: u32) -> vec4<f32> { w8s = wscale(i / 4u); w8v = w[2u * i + 1u]; return dq8(w[2u * i]) * w8s; }
fn w8b(i: u32) -> vec4<f32> { return dq8(w8v) * w8s; }
#else
#ifdef W_Q4
// W: block-quantized 4-bit (layout: `quantize` in engine/src/kernels/mod.rs). Rows padded to
// kp = 4 * kp4 (a multiple of 32); quants [m * kp4 / 2] u32 (8 weights per word, element 8i + j
// in bits 4j..4j+3, stored as q + 8), then the f16 block scales, two per word, from word
// m * kp4 / 2.
@group(0) @binding(2) var<storage, read> w: array<u32>;
fn wscale(b: u32) -> f32 {
    let v = unpack2x16float(w[p.m * (p.kp4 / 2u) + b / 2u]);
    return select(v.x, v.y, (b & 1u) == 1u);
}
fn dq4(v: u32) -> vec4<f32> {
    return vec4<f32>((vec4<u32>(v, v >> 4u, v >> 8u, v >> 12u) & vec4<u32>(15u))) - vec4<f32>(8.0);
}
fn w4(i: u32) -> vec4<f32> { return dq4(w[i / 2u] >> (16u * (i & 1u))) * wscale(i / 8u); }
var<private> w8v: u32;
var<private> w8s: f32;
fn w8a(i: u32) -> vec4<f32> { w8s = wscale(i / 4u); w8v = w[i]; return dq4(w8v) * w8s; }
fn w8b(i: u32) -> vec4<f32> { return dq4(w8v >> 16u) * w8s; }
#else
#ifdef SHADER_F16
// W: [m, kp4] vec4<f16>, row-major.
@group(0) @binding(2) var<storage, read> w: array<vec4<f16>>;
fn w4(i: u32) -> vec4<f32> { return vec4<f32>(w[i]); }
fn w8a(i: u32) -> vec4<f32> { return vec4<f32>(w[2u * i]); }
fn w8b(i: u32) -> vec4<f32> { return vec4<f32>(w[2u * i + 1u]); }
#else
// W: [m, kp4 / 2] eight halves packed in four u32, row-major (no shader-f16, or PACKED_F16:
// the host then leaves SHADER_F16 unset to get 16-byte loads).
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
fn w4(i: u32) -> vec4<f32> {
    let v = w[i / 2u];
    if ((i & 1u) == 0u) { return vec4<f32>(unpack2x16float(v.x), unpack2x16float(v.y)); }
    return vec4<f32>(unpack2x16float(v.z), unpack2x16float(v.w));
}
var<private> w8v: vec4<u32>;
fn w8a(i: u32) -> vec4<f32> { w8v = w[i]; return vec4<f32>(unpack2x16float(w8v.x), unpack2x16float(w8v.y)); }
fn w8b(i: u32) -> vec4<f32> { return vec4<f32>(unpack2x16float(w8v.z), unpack2x16float(w8v.w)); }
#endif
#endif
#endif
#endif
// bias: [m] f32 (bound to a dummy buffer when has_bias = 0).
@group(0) @binding(3) var<storage, read> bias: array<f32>;
// Y: [rows, y_stride] f32, row-major, starting at y_off.
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
#ifdef PRO_NORM
// aux: [k] f32 RMSNorm weight.
@group(0) @binding(5) var<storage, read> aux: array<f32>;
#endif
#ifdef PRO_MERGE
// aux: [2, k] f32: pre_avg_layernorm1 weight, then pre_avg_layernorm2 weight.
@group(0) @binding(5) var<storage, read> aux: array<f32>;
// x2: [rows, x_stride] f32 SSM-branch output (X is the attention-branch output).
@group(0) @binding(6) var<storage, read> x2: array<f32>;
#endif

fn store(t: u32, m: u32, v: f32) {
    var r = v;
    if (p.has_bias != 0u) { r += bias[m]; }
    let i = p.y_off + t * p.y_stride + m;
    if (p.accumulate != 0u) { r += y[i]; }
    y[i] = r;
}

const TPR: u32 = 32u;   // threads per row of W
const RPW: u32 = 8u;    // rows of W per workgroup
var<workgroup> red: array<f32, 256>;
var<workgroup> red2: array<f32, 256>;
var<workgroup> scal: array<f32, 2>;

// Sums v (and v2) over the workgroup into scal[0] (and scal[1]) as rsqrt(mean + eps).
fn norm_scales(li: u32, v: f32, v2: f32) {
    red[li] = v;
    red2[li] = v2;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s = s >> 1u) {
        if (li < s) {
            red[li] += red[li + s];
            red2[li] += red2[li + s];
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        scal[0] = inverseSqrt(red[0] / f32(p.k) + p.eps);
        scal[1] = inverseSqrt(red2[0] / f32(p.k) + p.eps);
    }
    workgroupBarrier();
}

// X[t, k] after the prologue; xb = offset of row t.
fn xv(xb: u32, k: u32) -> f32 {
    if (k >= p.k) { return 0.0; }
#ifdef PRO_NORM
    return aux[k] * (x[xb + k] * scal[0]);
#else
#ifdef PRO_MERGE
    return (aux[k] * (x[xb + k] * scal[0]) + aux[p.k + k] * (x2[xb + k] * scal[1])) / 2.0;
#else
#ifdef PRO_SWIGLU
    let g = x[xb + k];
    return (g / (1.0 + exp(-g))) * x[xb + p.k + k];
#else
    return x[xb + k];
#endif
#endif
#endif
}

// The transformed X row is staged in workgroup memory (XSH floats, a multiple of 8, chosen per
// pipeline by the host so that small K keeps the footprint small); K larger than XSH reads X
// directly. Reduction across the 32 lanes of a row: subgroupAdd where the host sets SUBGROUP32
// (subgroups of exactly 32), else a workgroup-memory tree.
#define XSH 2048
var<workgroup> xsh: array<vec4<f32>, XSH / 4>;

fn lane_sum(li: u32, lane: u32, v: f32) -> f32 {
#ifdef SUBGROUP32
    return subgroupAdd(v);
#else
    red[li] = v;
    workgroupBarrier();
    for (var s = TPR / 2u; s > 0u; s = s >> 1u) {
        if (lane < s) { red[li] += red[li + s]; }
        workgroupBarrier();
    }
    let r = red[li - lane];
    workgroupBarrier();
    return r;
#endif
}

@compute @workgroup_size(256)
fn gemv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let r = li / TPR;
    let lane = li % TPR;
    let t = wid.y;
    let xb = p.x_off + t * p.x_stride;
#ifdef PRO_NORM
    var s1 = 0.0;
    for (var k = li; k < p.k; k += 256u) { let v = x[xb + k]; s1 += v * v; }
    norm_scales(li, s1, 0.0);
#endif
#ifdef PRO_MERGE
    var sa = 0.0;
    var sb = 0.0;
    for (var k = li; k < p.k; k += 256u) {
        let a = x[xb + k];
        let b = x2[xb + k];
        sa += a * a;
        sb += b * b;
    }
    norm_scales(li, sa, sb);
#endif
    let n8 = (p.k + 7u) / 8u;
    let staged = n8 * 8u <= XSH;
    if (staged) {
        for (var c = li; c < n8 * 2u; c += 256u) {
            let k = c * 4u;
            xsh[c] = vec4<f32>(xv(xb, k), xv(xb, k + 1u), xv(xb, k + 2u), xv(xb, k + 3u));
        }
    }
    workgroupBarrier();
    for (var ps = 0u; ps < p.passes; ps++) {
        let row = (wid.x * p.passes + ps) * RPW + r;
        var acc = 0.0;
        if (row < p.m) {
            let wb = row * (p.kp4 / 2u);
            if (staged) {
                var c = lane;
                // Two chunks per iteration, both weight loads issued before the math.
                for (; c + TPR < n8; c += 2u * TPR) {
                    let wa0 = w8a(wb + c);
                    let wb0 = w8b(wb + c);
                    let wa1 = w8a(wb + c + TPR);
                    let wb1 = w8b(wb + c + TPR);
                    acc += dot(wa0, xsh[2u * c]) + dot(wb0, xsh[2u * c + 1u]);
                    acc += dot(wa1, xsh[2u * (c + TPR)]) + dot(wb1, xsh[2u * (c + TPR) + 1u]);
                }
                if (c < n8) {
                    let wa0 = w8a(wb + c);
                    let wb0 = w8b(wb + c);
                    acc += dot(wa0, xsh[2u * c]) + dot(wb0, xsh[2u * c + 1u]);
                }
            } else {
                for (var c = lane; c < n8; c += TPR) {
                    let kk = c * 8u;
                    let wa = w8a(wb + c);
                    let wbv = w8b(wb + c);
                    let xa = vec4<f32>(xv(xb, kk), xv(xb, kk + 1u), xv(xb, kk + 2u), xv(xb, kk + 3u));
                    let xc = vec4<f32>(xv(xb, kk + 4u), xv(xb, kk + 5u), xv(xb, kk + 6u), xv(xb, kk + 7u));
                    acc += dot(wa, xa) + dot(wbv, xc);
                }
            }
        }
        let total = lane_sum(li, lane, acc);
        if (lane == 0u && row < p.m) { store(t, row, total); }
    }
}

const BT: u32 = 64u;
const BM: u32 = 64u;
const BK: u32 = 16u;
var<workgroup> xs: array<f32, 1024>; // [BK][BT]
var<workgroup> ws: array<f32, 1024>; // [BK][BM]

@compute @workgroup_size(16, 16)
fn gemm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let m0 = wid.x * BM;
    let t0 = wid.y * BT;
    var acc: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) { acc[i] = 0.0; }
    let kw = p.kp4 * 4u;
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        for (var i = 0u; i < 4u; i++) {
            let e = li + i * 256u;
            let r = e / BK;
            let kk = e % BK;
            let t = t0 + r;
            let k = k0 + kk;
            var v = 0.0;
            if (t < p.rows && k < p.k) { v = x[p.x_off + t * p.x_stride + k]; }
            xs[kk * BT + r] = v;
        }
        {
            let r = li / 4u;
            let c = li % 4u;
            let m = m0 + r;
            let k = k0 + c * 4u;
            var v = vec4<f32>(0.0);
            if (m < p.m && k < kw) { v = w4(m * p.kp4 + k / 4u); }
            ws[(c * 4u) * BM + r] = v.x;
            ws[(c * 4u + 1u) * BM + r] = v.y;
            ws[(c * 4u + 2u) * BM + r] = v.z;
            ws[(c * 4u + 3u) * BM + r] = v.w;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let a = vec4<f32>(xs[kk * BT + lid.y * 4u], xs[kk * BT + lid.y * 4u + 1u], xs[kk * BT + lid.y * 4u + 2u], xs[kk * BT + lid.y * 4u + 3u]);
            let b = vec4<f32>(ws[kk * BM + lid.x * 4u], ws[kk * BM + lid.x * 4u + 1u], ws[kk * BM + lid.x * 4u + 2u], ws[kk * BM + lid.x * 4u + 3u]);
            for (var i = 0u; i < 4u; i++) {
                acc[i * 4u] += a[i] * b.x;
                acc[i * 4u + 1u] += a[i] * b.y;
                acc[i * 4u + 2u] += a[i] * b.z;
                acc[i * 4u + 3u] += a[i] * b.w;
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let t = t0 + lid.y * 4u + i;
        for (var j = 0u; j < 4u; j++) {
            let m = m0 + lid.x * 4u + j;
            if (t < p.rows && m < p.m) { store(t, m, acc[i * 4u + j]); }
        }
    }
}

// gemv_row: one thread per output row and no workgroup barriers, for CPU adapters (lavapipe,
// SwiftShader), where barriers cost a context switch per invocation. Each thread computes the
// prologue's RMS scales itself. Same bindings and parameters as gemv; 8 * passes rows per
// workgroup of 32. Grid: (ceil(m / (8 * passes)), rows). Weights are read through w8a / w8b, so
// every storage variant works (W_F32, f16, W_Q8, W_Q4; the q8 / q4 readers' private state is
// per invocation).
fn xv_row(xb: u32, k: u32, sa: f32, sb: f32) -> f32 {
    if (k >= p.k) { return 0.0; }
#ifdef PRO_NORM
    return aux[k] * (x[xb + k] * sa);
#else
#ifdef PRO_MERGE
    return (aux[k] * (x[xb + k] * sa) + aux[p.k + k] * (x2[xb + k] * sb)) / 2.0;
#else
#ifdef PRO_SWIGLU
    let g = x[xb + k];
    return (g / (1.0 + exp(-g))) * x[xb + p.k + k];
#else
    return x[xb + k];
#endif
#endif
#endif
}

@compute @workgroup_size(32)
fn gemv_row(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let rpw = 8u * p.passes;
    let row = wid.x * rpw + li;
    let t = wid.y;
    if (li >= rpw || row >= p.m) { return; }
    let xb = p.x_off + t * p.x_stride;
    var sa = 1.0;
    var sb = 1.0;
#ifdef PRO_NORM
    var s1 = 0.0;
    for (var k = 0u; k < p.k; k++) { let v = x[xb + k]; s1 += v * v; }
    sa = inverseSqrt(s1 / f32(p.k) + p.eps);
#endif
#ifdef PRO_MERGE
    var s1 = 0.0;
    var s2 = 0.0;
    for (var k = 0u; k < p.k; k++) {
        let a = x[xb + k];
        let b = x2[xb + k];
        s1 += a * a;
        s2 += b * b;
    }
    sa = inverseSqrt(s1 / f32(p.k) + p.eps);
    sb = inverseSqrt(s2 / f32(p.k) + p.eps);
#endif
    let n8 = (p.k + 7u) / 8u;
    let wb = row * (p.kp4 / 2u);
    var acc = vec4<f32>(0.0);
    for (var c = 0u; c < n8; c++) {
        let kk = c * 8u;
        let wa = w8a(wb + c);
        let wbv = w8b(wb + c);
        acc += wa * vec4<f32>(xv_row(xb, kk, sa, sb), xv_row(xb, kk + 1u, sa, sb), xv_row(xb, kk + 2u, sa, sb), xv_row(xb, kk + 3u, sa, sb));
        acc += wbv * vec4<f32>(xv_row(xb, kk + 4u, sa, sb), xv_row(xb, kk + 5u, sa, sb), xv_row(xb, kk + 6u, sa, sb), xv_row(xb, kk + 7u, sa, sb));
    }
    store(t, row, (acc.x + acc.y) + (acc.z + acc.w));
}
