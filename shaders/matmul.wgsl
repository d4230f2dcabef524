// Matrix products against a weight matrix: Y[t, m] (+)= sum_k X[t, k] * W[m, k] (+ bias[m]).
//
// Entry points:
//   gemv  - few rows (decode): one workgroup of 256 threads = 8 rows of W x 32 threads per row
//           per pass, `passes` passes (8 * passes rows), grid (ceil(m / (8 * passes)), rows,
//           K slices).
//   gemv_wide - (define WIDE) few rows, K <= 2048: K across the workgroup's 256 threads, eight
//           rows of W at a time.
//   gemm  - prompt chunks: 64x64 output tiles, 16-deep k steps through workgroup memory,
//           4x4 outputs per thread, grid (ceil(m / 64), ceil(rows / 64), K slices); split over
//           K (grid z, partial results a slice apart in Y) for narrow outputs (x_proj)...
//   gemm_coop - (define COOP) the same tiles on cooperative matrices (tensor cores), f16 inputs.
//   gemm_coop2 - (define COOP2 with COOP) 128 x 128 tiles of 8 subgroups on cooperative
//           matrices, optionally split over K (grid z, partial results a slice apart in Y)...
//   gemm_reduce - (define REDUCE) ...and the sum of the partial results of either into Y.
// The cooperative-matrix entries take no bias (has_bias = 0; the host never sends one).
//   gemv_row  - one thread per output row, no barriers (CPU adapters).
// Variants (defines): W_F32 (f32 weights), W_Q8 / W_Q4 (block-quantized int8 / 4-bit weights with
// one f16 scale per 32 weights along K, dequantized in the weight readers), or f16 weights, read
// as native f16 when SHADER_F16 is set and as packed u32 pairs (unpack2x16float) otherwise.
// Accumulation is always f32.
// Fused prologues of the decode GEMV (X is transformed while it is read, so the elementwise
// step needs no dispatch of its own):
//   PRO_NORM   x' = aux * (x * rsqrt(mean(x^2) + eps))              (input / pre-MLP / final RMSNorm)
//   PRO_MERGE  x' = (aux[:k] * norm(x) + aux[k:] * norm(x2)) / 2    (hybrid-head merge before out_proj)
//   PRO_SWIGLU x' = silu(x[:, :k]) * x[:, k:2k]                      (SwiGLU before down_proj)
//   PRO_CONV   x' = silu(conv1d(state ++ x))                          (Mamba conv before x_proj,
//              one decode step; the state itself is shifted later by the fused scan)

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
    passes: u32,     // gemv: groups of 8 rows each workgroup computes; gemv_wide: groups of 4;
                     // gemm_reduce: K slices to sum
    aux_n: u32,      // PRO_CONV: conv kernel width
    kslice: u32,     // gemv, gemm, gemm_coop2: K columns per slice (grid z = slice; = k without
                     // a split)
    ypart: u32,      // gemv, gemm, gemm_coop2, gemm_reduce: offset between the slices' partial
                     // results (0 without a split)
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
#ifdef XV4
// xq: X again, as vec4 [rows, x_stride / 4] (gemm_coop2, which has no bias; the host keeps x_off
// and x_stride multiples of 4): one 16-byte load per four k of a staged row.
@group(0) @binding(3) var<storage, read> xq: array<vec4<f32>>;
#else
// bias: [m] f32 (bound to a dummy buffer when has_bias = 0).
@group(0) @binding(3) var<storage, read> bias: array<f32>;
#endif
// Y: [rows, y_stride] f32, row-major, starting at y_off.
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
#ifdef PRO_NORM
// aux: [k] f32 RMSNorm weight.
@group(0) @binding(5) var<storage, read> aux: array<f32>;
#endif
#ifdef PRO_CONV
// aux: [k, aux_n] f32 conv1d weights, then [k] f32 bias.
@group(0) @binding(5) var<storage, read> aux: array<f32>;
// x2: [k, aux_n] f32 conv state before this step (the last aux_n inputs, oldest first).
@group(0) @binding(6) var<storage, read> x2: array<f32>;
fn conv_x(xb: u32, k: u32) -> f32 {
    let w = p.aux_n;
    var acc = aux[p.k * w + k];
    for (var j = 0u; j + 1u < w; j++) { acc += aux[k * w + j] * x2[k * w + j + 1u]; }
    acc += aux[k * w + w - 1u] * x[xb + k];
    return acc / (1.0 + exp(-acc));
}
#endif
#ifdef PRO_MERGE
// aux: [2, k] f32: pre_avg_layernorm1 weight, then pre_avg_layernorm2 weight.
@group(0) @binding(5) var<storage, read> aux: array<f32>;
// x2: [rows, x_stride] f32 SSM-branch output (X is the attention-branch output).
@group(0) @binding(6) var<storage, read> x2: array<f32>;
#endif

// Offset of this workgroup's K slice's partial results in Y (gemv / gemm / gemm_coop2 split over
// K).
var<private> yslice: u32;

fn store(t: u32, m: u32, v: f32) {
    var r = v;
#ifndef XV4
    if (p.has_bias != 0u) { r += bias[m]; }
#endif
    let i = p.y_off + yslice + t * p.y_stride + m;
    if (p.accumulate != 0u) { r += y[i]; }
    y[i] = r;
}

const TPR: u32 = 32u;   // threads per row of W
const RPW: u32 = 8u;    // rows of W per workgroup pass (one per 32-lane group)
var<workgroup> red: array<f32, 256>;
var<workgroup> red2: array<f32, 256>;

// Sums (v, v2) over the 256 threads of the workgroup; every thread gets the totals. With
// SUBGROUP32 one subgroupAdd per 32 lanes and a single barrier, else a workgroup-memory tree.
// Contains barriers: call from uniform control flow.
fn wg_sum2(li: u32, v: f32, v2: f32) -> vec2<f32> {
#ifdef SUBGROUP32
    let a = subgroupAdd(v);
    let b = subgroupAdd(v2);
    if (li % 32u == 0u) {
        red[li / 32u] = a;
        red2[li / 32u] = b;
    }
    workgroupBarrier();
    var r = vec2<f32>(0.0);
    for (var i = 0u; i < 8u; i++) { r += vec2<f32>(red[i], red2[i]); }
    workgroupBarrier();
    return r;
#else
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
    let r = vec2<f32>(red[0], red2[0]);
    workgroupBarrier();
    return r;
#endif
}

fn xraw(xb: u32, k: u32) -> f32 {
    if (k >= p.k) { return 0.0; }
    return x[xb + k];
}

#ifdef PRO_NORM
fn auxk(k: u32) -> f32 {
    if (k >= p.k) { return 0.0; }
    return aux[k];
}
#endif

// X[t, k] after the prologue, except that PRO_NORM leaves out the row's RMS scale `sc.x`
// (the dot product is scaled instead, so staging need not wait for the reduction);
// PRO_MERGE uses both scales sc = (attention branch, SSM branch). xb = offset of row t.
fn xv(xb: u32, k: u32, sc: vec2<f32>) -> f32 {
    if (k >= p.k) { return 0.0; }
#ifdef PRO_NORM
    return aux[k] * x[xb + k];
#else
#ifdef PRO_MERGE
    return (aux[k] * (x[xb + k] * sc.x) + aux[p.k + k] * (x2[xb + k] * sc.y)) / 2.0;
#else
#ifdef PRO_SWIGLU
    let g = x[xb + k];
    return (g / (1.0 + exp(-g))) * x[xb + p.k + k];
#else
#ifdef PRO_CONV
    return conv_x(xb, k);
#else
    return x[xb + k];
#endif
#endif
#endif
#endif
}

fn xraw4(xb: u32, k: u32) -> vec4<f32> {
    return vec4<f32>(xraw(xb, k), xraw(xb, k + 1u), xraw(xb, k + 2u), xraw(xb, k + 3u));
}

#ifdef PRO_NORM
fn aux4(k: u32) -> vec4<f32> { return vec4<f32>(auxk(k), auxk(k + 1u), auxk(k + 2u), auxk(k + 3u)); }
#endif

#ifdef PRO_MERGE
fn x2raw(xb: u32, k: u32) -> f32 {
    if (k >= p.k) { return 0.0; }
    return x2[xb + k];
}
fn x2raw4(xb: u32, k: u32) -> vec4<f32> {
    return vec4<f32>(x2raw(xb, k), x2raw(xb, k + 1u), x2raw(xb, k + 2u), x2raw(xb, k + 3u));
}
// The two norm weights at k..k + 3: [0] attention branch, [1] SSM branch (zeros past K).
fn merge_aux1(k: u32) -> vec2<f32> {
    if (k >= p.k) { return vec2<f32>(0.0); }
    return vec2<f32>(aux[k], aux[p.k + k]);
}
fn merge_aux4(k: u32) -> array<vec4<f32>, 2> {
    let e0 = merge_aux1(k);
    let e1 = merge_aux1(k + 1u);
    let e2 = merge_aux1(k + 2u);
    let e3 = merge_aux1(k + 3u);
    return array<vec4<f32>, 2>(vec4<f32>(e0.x, e1.x, e2.x, e3.x), vec4<f32>(e0.y, e1.y, e2.y, e3.y));
}
#endif

fn xv4(xb: u32, k: u32, sc: vec2<f32>) -> vec4<f32> {
    return vec4<f32>(xv(xb, k, sc), xv(xb, k + 1u, sc), xv(xb, k + 2u, sc), xv(xb, k + 3u, sc));
}

// Element offset of 4-wide chunk c of the K slice starting at k0, or K past the slice's n4 chunks
// (an index at K reads as zeros and computes nothing): the prologues' staging sub-chunks.
fn sub_k(k0: u32, c: u32, n4: u32) -> u32 {
    return select(p.k, k0 + c * 4u, c < n4);
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

// The prologue of both decode GEMVs: stages the transformed X row t (columns k0.. of n8
// 8-wide chunks) in xsh when `staged`, and returns (sc.x, sc.y, rs): the PRO_MERGE branch scales
// and the factor for each row's dot product (the RMS scale of PRO_NORM). Contains barriers:
// call from uniform control flow.
fn prologue(li: u32, xb: u32, k0: u32, n8: u32, staged: bool) -> vec3<f32> {
    var sc = vec2<f32>(1.0);
    var rs = 1.0;
    // The loops take four of their iterations at a time (256 apart), every load issued before
    // any is used: each is a chain of dependent global loads otherwise.
    let n4 = n8 * 2u;
#ifdef PRO_NORM
    // Stage aux * x and sum x^2 in the same pass; one reduction (whose barrier also publishes
    // the staged row) gives the scale.
    var s1 = 0.0;
    if (staged) {
        for (var c = li; c < n4; c += 1024u) {
            // Sub-chunks past the row read as zeros (an index past K loads nothing).
            let k1 = sub_k(0u, c + 256u, n4);
            let k2 = sub_k(0u, c + 512u, n4);
            let k3 = sub_k(0u, c + 768u, n4);
            let v0 = xraw4(xb, c * 4u);
            let v1 = xraw4(xb, k1);
            let v2 = xraw4(xb, k2);
            let v3 = xraw4(xb, k3);
            let a0 = aux4(c * 4u);
            let a1 = aux4(k1);
            let a2 = aux4(k2);
            let a3 = aux4(k3);
            s1 += (dot(v0, v0) + dot(v1, v1)) + (dot(v2, v2) + dot(v3, v3));
            xsh[c] = v0 * a0;
            if (c + 256u < n4) { xsh[c + 256u] = v1 * a1; }
            if (c + 512u < n4) { xsh[c + 512u] = v2 * a2; }
            if (c + 768u < n4) { xsh[c + 768u] = v3 * a3; }
        }
    } else {
        for (var k = li; k < p.k; k += 256u) { let v = x[xb + k]; s1 += v * v; }
    }
    rs = inverseSqrt(wg_sum2(li, s1, 0.0).x / f32(p.k) + p.eps);
#else
    // Whether the merge prologue below staged the row already.
    var merged = false;
#ifdef PRO_MERGE
    if (staged && n4 <= 1024u && k0 == 0u) {
        // One pass (K <= 4096; the merge is never split over K): each thread loads its (up to)
        // four 4-wide chunks of both branches and of both norm weights, all before the
        // reduction, and stages the merged chunks from registers once the scales are known.
        // Against reading both branches twice: +1.6-2.2% decode tokens/s on an H200 (f16 and
        // f32); out_proj has at most two workgroups per SM, so the registers cost no occupancy.
        let k1 = sub_k(0u, li + 256u, n4);
        let k2 = sub_k(0u, li + 512u, n4);
        let k3 = sub_k(0u, li + 768u, n4);
        let a0 = xraw4(xb, li * 4u);
        let a1 = xraw4(xb, k1);
        let a2 = xraw4(xb, k2);
        let a3 = xraw4(xb, k3);
        let b0 = x2raw4(xb, li * 4u);
        let b1 = x2raw4(xb, k1);
        let b2 = x2raw4(xb, k2);
        let b3 = x2raw4(xb, k3);
        let u0 = merge_aux4(li * 4u);
        let u1 = merge_aux4(k1);
        let u2 = merge_aux4(k2);
        let u3 = merge_aux4(k3);
        let ss = wg_sum2(li, (dot(a0, a0) + dot(a1, a1)) + (dot(a2, a2) + dot(a3, a3)),
            (dot(b0, b0) + dot(b1, b1)) + (dot(b2, b2) + dot(b3, b3)));
        sc = vec2<f32>(inverseSqrt(ss.x / f32(p.k) + p.eps), inverseSqrt(ss.y / f32(p.k) + p.eps));
        // As xv: (aux[k] * (x * sc.x) + aux[K + k] * (x2 * sc.y)) / 2, four k at a time.
        if (li < n4) { xsh[li] = (u0[0] * (a0 * sc.x) + u0[1] * (b0 * sc.y)) / 2.0; }
        if (li + 256u < n4) { xsh[li + 256u] = (u1[0] * (a1 * sc.x) + u1[1] * (b1 * sc.y)) / 2.0; }
        if (li + 512u < n4) { xsh[li + 512u] = (u2[0] * (a2 * sc.x) + u2[1] * (b2 * sc.y)) / 2.0; }
        if (li + 768u < n4) { xsh[li + 768u] = (u3[0] * (a3 * sc.x) + u3[1] * (b3 * sc.y)) / 2.0; }
        merged = true;
    } else {
        // Longer K (or an unstaged row): the two scales first, then the staging pass below
        // reads both branches again.
        var sa = vec4<f32>(0.0);
        var sb = vec4<f32>(0.0);
        for (var k = li; k < p.k; k += 1024u) {
            let a = vec4<f32>(x[xb + k], xraw(xb, k + 256u), xraw(xb, k + 512u), xraw(xb, k + 768u));
            let b = vec4<f32>(x2[xb + k], x2raw(xb, k + 256u), x2raw(xb, k + 512u), x2raw(xb, k + 768u));
            sa += a * a;
            sb += b * b;
        }
        let ss = wg_sum2(li, (sa.x + sa.y) + (sa.z + sa.w), (sb.x + sb.y) + (sb.z + sb.w));
        sc = vec2<f32>(inverseSqrt(ss.x / f32(p.k) + p.eps), inverseSqrt(ss.y / f32(p.k) + p.eps));
    }
#endif
    if (staged && !merged) {
        for (var c = li; c < n4; c += 1024u) {
            let v0 = xv4(xb, k0 + c * 4u, sc);
            let v1 = xv4(xb, sub_k(k0, c + 256u, n4), sc);
            let v2 = xv4(xb, sub_k(k0, c + 512u, n4), sc);
            let v3 = xv4(xb, sub_k(k0, c + 768u, n4), sc);
            xsh[c] = v0;
            if (c + 256u < n4) { xsh[c + 256u] = v1; }
            if (c + 512u < n4) { xsh[c + 512u] = v2; }
            if (c + 768u < n4) { xsh[c + 768u] = v3; }
        }
    }
    workgroupBarrier();
#endif
    return vec3<f32>(sc, rs);
}

// Each 32-lane group computes one row of W per pass (rows RPW apart from pass to pass), four
// 16-byte chunks of it per iteration, all four loads issued before the math. (Two rows at a time
// kept twice the weight registers live: measured on an H200, f32 decode ran 2% slower that way
// and the other weight types no faster.)
@compute @workgroup_size(256)
fn gemv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let r = li / TPR;
    let lane = li % TPR;
    let t = wid.y;
    let xb = p.x_off + t * p.x_stride;
    // K slice wid.z: columns [k0, k0 + kslice) (the whole row without a split; only prologues
    // without a reduction over K are split, and each slice writes its own partial Y row).
    let k0 = wid.z * p.kslice;
    let c0 = k0 / 8u;
    yslice = wid.z * p.ypart;
    let n8 = (min(p.kslice, p.k - k0) + 7u) / 8u;
    let staged = n8 * 8u <= XSH;
    let pro = prologue(li, xb, k0, n8, staged);
    let sc = pro.xy;
    let rs = pro.z;
    for (var ps = 0u; ps < p.passes; ps++) {
        let row = (wid.x * p.passes + ps) * RPW + r;
        // An out-of-range row reads row m - 1 (keeps loads in bounds and control flow uniform).
        let wb = min(row, p.m - 1u) * (p.kp4 / 2u) + c0;
        var acc = 0.0;
        if (staged) {
            // Chunks past the row are clamped to its last chunk and masked out.
            for (var c = lane; c < n8; c += 4u * TPR) {
                let c1 = min(c + TPR, n8 - 1u);
                let c2 = min(c + 2u * TPR, n8 - 1u);
                let c3 = min(c + 3u * TPR, n8 - 1u);
                let a0 = w8a(wb + c);
                let b0 = w8b(wb + c);
                let a1 = w8a(wb + c1);
                let b1 = w8b(wb + c1);
                let a2 = w8a(wb + c2);
                let b2 = w8b(wb + c2);
                let a3 = w8a(wb + c3);
                let b3 = w8b(wb + c3);
                let m1 = select(0.0, 1.0, c + TPR < n8);
                let m2 = select(0.0, 1.0, c + 2u * TPR < n8);
                let m3 = select(0.0, 1.0, c + 3u * TPR < n8);
                acc += (dot(a0, xsh[2u * c]) + dot(b0, xsh[2u * c + 1u]))
                    + m1 * (dot(a1, xsh[2u * c1]) + dot(b1, xsh[2u * c1 + 1u]))
                    + m2 * (dot(a2, xsh[2u * c2]) + dot(b2, xsh[2u * c2 + 1u]))
                    + m3 * (dot(a3, xsh[2u * c3]) + dot(b3, xsh[2u * c3 + 1u]));
            }
        } else {
            for (var c = lane; c < n8; c += TPR) {
                let kk = k0 + c * 8u;
                let xa = vec4<f32>(xv(xb, kk, sc), xv(xb, kk + 1u, sc), xv(xb, kk + 2u, sc), xv(xb, kk + 3u, sc));
                let xc = vec4<f32>(xv(xb, kk + 4u, sc), xv(xb, kk + 5u, sc), xv(xb, kk + 6u, sc), xv(xb, kk + 7u, sc));
                let a0 = w8a(wb + c);
                let b0 = w8b(wb + c);
                acc += dot(a0, xa) + dot(b0, xc);
            }
        }
        let total = lane_sum(li, lane, acc);
        if (lane == 0u && row < p.m) { store(t, row, total * rs); }
    }
}

#ifdef WIDE
// gemv_wide: the decode GEMV for K <= 2048 with K spread over the whole workgroup. Thread li
// owns the 8 columns 8 li .. 8 li + 7 and keeps X there, after the prologue but without its row
// scales, in registers; it then reads those columns of eight rows of W at a time, every load
// issued before any is used (with SUBGROUP32, the only case the host picks it for outside tests,
// no barrier comes before the first). Each four rows' partial sums
// are reduced once (a subgroupAdd per 32 lanes, or a workgroup-memory tree without SUBGROUP32)
// into workgroup memory; after one barrier at the end a thread per row adds the subgroups'
// partials, applies the row scale of the prologue's RMS norm (reduced the same way, so the
// weight loads never wait for it) and stores. Measured on an H200 against `gemv`: +2% tokens/s
// for f16 weights, -3% for f32 (which keeps `gemv`); for K of 3200 and 5504, with two and three
// chunks per thread, it was slower for both (so the host keeps `gemv` there too).
// Grid: (ceil(m / (4 * passes)), rows, 1); passes (groups of 4 rows) is even, at most 8.
// Slots of gsum: one per 4-row group (its dot products); slot 8: the prologue's sum of
// squares. 8 entries per slot (one per subgroup of 32).
const NORM_SLOT: u32 = 8u;
var<workgroup> gsum: array<vec4<f32>, 72>;

// Adds v over the workgroup into slot `slot` of gsum (read with `total` after a barrier).
// Contains barriers without SUBGROUP32: call from uniform control flow.
fn partial(li: u32, v: vec4<f32>, slot: u32) {
#ifdef SUBGROUP32
    let s = subgroupAdd(v);
    if (li % 32u == 0u) { gsum[slot * 8u + li / 32u] = s; }
#else
    let a = wg_sum2(li, v.x, v.y);
    let b = wg_sum2(li, v.z, v.w);
    if (li == 0u) { gsum[slot * 8u] = vec4<f32>(a, b); }
#endif
}

fn total(slot: u32) -> vec4<f32> {
#ifdef SUBGROUP32
    var s = gsum[slot * 8u];
    for (var i = 1u; i < 8u; i++) { s += gsum[slot * 8u + i]; }
    return s;
#else
    return gsum[slot * 8u];
#endif
}

// One row's partial dot product over this thread's chunk q (clamped into the row; its X is
// zero where clamped).
fn rowdot(row: u32, q: u32, xa: vec4<f32>, xc: vec4<f32>) -> f32 {
    let wb = min(row, p.m - 1u) * (p.kp4 / 2u);
    let a = w8a(wb + q);
    let b = w8b(wb + q);
    return dot(a, xa) + dot(b, xc);
}

@compute @workgroup_size(256)
fn gemv_wide(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let t = wid.y;
    let xb = p.x_off + t * p.x_stride;
    // This thread's 8 columns after the prologue, without the row scale (zeros past K).
    let k = li * 8u;
    let one = vec2<f32>(1.0);
    let xa = xv4(xb, k, one);
    let xc = xv4(xb, k + 4u, one);
    let q = min(li, (p.k + 7u) / 8u - 1u);
#ifdef PRO_NORM
    let ra = xraw4(xb, k);
    let rb = xraw4(xb, k + 4u);
    partial(li, vec4<f32>(dot(ra, ra) + dot(rb, rb), 0.0, 0.0, 0.0), NORM_SLOT);
#endif
    let rw = 4u * p.passes;
    for (var g = 0u; g < p.passes; g += 2u) {
        let r0 = wid.x * rw + g * 4u;
        let d0 = rowdot(r0, q, xa, xc);
        let d1 = rowdot(r0 + 1u, q, xa, xc);
        let d2 = rowdot(r0 + 2u, q, xa, xc);
        let d3 = rowdot(r0 + 3u, q, xa, xc);
        let d4 = rowdot(r0 + 4u, q, xa, xc);
        let d5 = rowdot(r0 + 5u, q, xa, xc);
        let d6 = rowdot(r0 + 6u, q, xa, xc);
        let d7 = rowdot(r0 + 7u, q, xa, xc);
        partial(li, vec4<f32>(d0, d1, d2, d3), g);
        partial(li, vec4<f32>(d4, d5, d6, d7), g + 1u);
    }
    workgroupBarrier();
    if (li < rw) {
        let row = wid.x * rw + li;
        var v = total(li / 4u)[li % 4u];
#ifdef PRO_NORM
        v *= inverseSqrt(total(NORM_SLOT).x / f32(p.k) + p.eps);
#endif
        if (row < p.m) { store(t, row, v); }
    }
}
#endif

const BT: u32 = 64u;
const BM: u32 = 64u;
const BK: u32 = 16u;
// Row stride of the staged tiles in vec4 (68 floats: the 4 spare spread a step's stores over
// the memory banks, at most 2 threads of a subgroup per bank).
const SS: u32 = 17u;
// xs: [BK][SS] vec4, k-major: xs[kk * SS + i] = X rows t0 + 4i .. 4i + 3 at k0 + kk.
var<workgroup> xs: array<vec4<f32>, 272>;
// ws: [BK][SS] vec4, k-major: ws[kk * SS + i] = W rows m0 + 4i .. 4i + 3 at k0 + kk.
var<workgroup> ws: array<vec4<f32>, 272>;

// Stores one K step's items of this thread: k = kq*4 .. kq*4 + 3 of row r of the X tile (vx)
// and of row r of the W tile (vw), into the k-major tiles.
fn stage_tiles(r: u32, kq: u32, vx: vec4<f32>, vw: vec4<f32>) {
    let i = (kq * 4u) * SS + r / 4u;
    let c = r % 4u;
    xs[i][c] = vx.x;
    xs[i + SS][c] = vx.y;
    xs[i + 2u * SS][c] = vx.z;
    xs[i + 3u * SS][c] = vx.w;
    ws[i][c] = vw.x;
    ws[i + SS][c] = vw.y;
    ws[i + 2u * SS][c] = vw.z;
    ws[i + 3u * SS][c] = vw.w;
}

// Tile readers of the GEMMs (gemm, gemm_coop, gemm_coop2): four consecutive k of row t of X,
// zero past the rows and from kend on (the end of K, or of a K slice), and of row m of W, zero
// past its rows and its padded K (past a slice's end W meets X's zeros).
fn tile_x4(t: u32, k: u32, kend: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (t < p.rows) {
        let b = p.x_off + t * p.x_stride + k;
        if (k + 3u < kend) {
#ifdef XV4
            v = xq[b / 4u];
#else
            v = vec4<f32>(x[b], x[b + 1u], x[b + 2u], x[b + 3u]);
#endif
        } else {
            // The row's last k: one scalar per component, no dynamic index into `v` (which can
            // put a variable in local memory). Measured on an H200 against the indexed loop:
            // gate|up 7.32 -> 7.28 ms per 256-row chunk, pp512 f16 medians 7114 / 7224 -> 7298
            // / 7286 (two alternating runs).
            var v0 = 0.0;
            var v1 = 0.0;
            var v2 = 0.0;
            if (k < kend) { v0 = x[b]; }
            if (k + 1u < kend) { v1 = x[b + 1u]; }
            if (k + 2u < kend) { v2 = x[b + 2u]; }
            v = vec4<f32>(v0, v1, v2, 0.0);
        }
    }
    return v;
}

fn tile_w4(m: u32, k: u32) -> vec4<f32> {
    var u = vec4<f32>(0.0);
    if (m < p.m && k < p.kp4 * 4u) { u = w4(m * p.kp4 + k / 4u); }
    return u;
}

// Whether `gemm` loads each K step's operands one step ahead. Measured on an H200 (pp512,
// best of 10, two alternating runs): f32 weights 3236 / 3221 -> 3450 / 3453 tokens/s with it;
// f16 weights (tensor cores off) 3351 / 3338 -> 3298 / 3325, so 16-bit and quantized weights
// load each step as it comes.
#ifdef W_F32
const GEMM_PREFETCH: bool = true;
#else
const GEMM_PREFETCH: bool = false;
#endif

// 64 x 64 output tiles of 256 threads, 4 x 4 outputs each (rows lid.y * 4.., outputs
// lid.x * 4..). Each 16-deep K step stages X and W through workgroup memory, one 4-wide k
// chunk of one tile row per thread for each, and the inner loop reads one vec4 of each per k.
@compute @workgroup_size(16, 16)
fn gemm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let m0 = wid.x * BM;
    let t0 = wid.y * BT;
    // K slice wid.z: columns [kb, ke) (all of K without a split), its partial results ypart
    // elements apart in Y; the host makes split slices multiples of BK deep.
    let kb = wid.z * p.kslice;
    let ke = min(p.k, kb + p.kslice);
    yslice = wid.z * p.ypart;
    // The 4 x 4 outputs as four vec4 variables (row i of the thread's block in acc_i), not an
    // array: a private array may live in local memory (it halved the tensor-core GEMM's speed).
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    // This thread's staging: tile row r, k chunk kq of each step; with GEMM_PREFETCH loaded
    // into registers one step ahead (the next step's loads in flight while this one multiplies).
    let r = li / 4u;
    let kq = li % 4u;
    var vx = vec4<f32>(0.0);
    var vw = vec4<f32>(0.0);
    if (GEMM_PREFETCH) {
        vx = tile_x4(t0 + r, kb + kq * 4u, ke);
        vw = tile_w4(m0 + r, kb + kq * 4u);
    }
    for (var k0 = kb; k0 < ke; k0 += BK) {
        if (!GEMM_PREFETCH) {
            vx = tile_x4(t0 + r, k0 + kq * 4u, ke);
            vw = tile_w4(m0 + r, k0 + kq * 4u);
        }
        stage_tiles(r, kq, vx, vw);
        workgroupBarrier();
        if (GEMM_PREFETCH && k0 + BK < ke) {
            vx = tile_x4(t0 + r, k0 + BK + kq * 4u, ke);
            vw = tile_w4(m0 + r, k0 + BK + kq * 4u);
        }
        for (var kk = 0u; kk < BK; kk++) {
            let a = xs[kk * SS + lid.y];
            let b = ws[kk * SS + lid.x];
            acc0 += a.x * b;
            acc1 += a.y * b;
            acc2 += a.z * b;
            acc3 += a.w * b;
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let t = t0 + lid.y * 4u + i;
        let row = select(select(acc3, acc2, i == 2u), select(acc1, acc0, i == 0u), i < 2u);
        for (var j = 0u; j < 4u; j++) {
            let m = m0 + lid.x * 4u + j;
            if (t < p.rows && m < p.m) { store(t, m, row[j]); }
        }
    }
}

#ifdef COOP
// The staged tiles of the cooperative-matrix GEMMs: each K step, the workgroup's THREADS threads
// copy TILE rows of X and TILE rows of W, CK deep, into workgroup memory as f16, four k per item.
#ifdef COOP2
const TILE: u32 = 128u;
#ifdef COOP2_SG16
// 16 subgroups, K steps of 64: measured on an H200 against 32-deep steps, gate|up 7.06 -> 5.67
// ms per 256-row chunk, pp512 f16 medians 7765 / 7943 -> 8768 / 8896 (two alternating runs).
// Loading W as 8 f16 per thread (16-byte loads) instead of 4 gained nothing with 32-deep steps
// and lost 9% of gate|up with 64-deep ones.
const THREADS: u32 = 512u;
const CK: u32 = 64u;
#else
const THREADS: u32 = 256u;
const CK: u32 = 32u;
#endif
#else
const TILE: u32 = 64u;
const THREADS: u32 = 128u;
const CK: u32 = 64u;
#endif
// Row stride of the staged tiles in f16: CK plus 8 of padding, so that the 16 rows a fragment
// load reads start in different shared-memory banks.
const SK: u32 = CK + 8u;
// ax: [TILE rows of X][SK] f16, row-major (fragment A).
var<workgroup> ax: array<f16, TILE * SK>;
// bw: [TILE rows of W][SK] f16, row-major = W^T column-major (fragment B).
var<workgroup> bw: array<f16, TILE * SK>;

// Item i (0 .. TILE * CK / 4 / THREADS) of this thread's share of a K step: four consecutive k
// of one row of the X tile (X read up to ke: the end of K, or of this workgroup's K slice) and
// of the W tile, zero past the edges. The kernels keep the next step's items in variables:
// held in a private array instead, as gemm_coop first did, the prompt GEMMs ran at half the
// speed on an H200 (the array lived in local memory).
fn coop_x(li: u32, i: u32, t0: u32, k0: u32, ke: u32) -> vec4<f32> {
    let e4 = li + i * THREADS;
    return tile_x4(t0 + e4 / (CK / 4u), k0 + (e4 % (CK / 4u)) * 4u, ke);
}

fn coop_w(li: u32, i: u32, m0: u32, k0: u32) -> vec4<f32> {
    let e4 = li + i * THREADS;
    return tile_w4(m0 + e4 / (CK / 4u), k0 + (e4 % (CK / 4u)) * 4u);
}

// Writes item i (X values xv, W values wv) into the staged tiles.
fn coop_stage(li: u32, i: u32, xv: vec4<f32>, wv: vec4<f32>) {
    let e4 = li + i * THREADS;
    let o = (e4 / (CK / 4u)) * SK + (e4 % (CK / 4u)) * 4u;
    let v = vec4<f16>(xv);
    let u = vec4<f16>(wv);
    ax[o] = v.x;
    ax[o + 1u] = v.y;
    ax[o + 2u] = v.z;
    ax[o + 3u] = v.w;
    bw[o] = u.x;
    bw[o + 1u] = u.y;
    bw[o + 2u] = u.z;
    bw[o + 3u] = u.w;
}
#endif

#ifdef COOP
#ifndef COOP2
// gemm_coop: the prompt-chunk GEMM on cooperative matrices (tensor cores), for f16 / q8 / q4
// weights where the adapter has EXPERIMENTAL_COOPERATIVE_MATRIX with 16x16x16 f16 inputs and
// f32 accumulators and subgroups of 32. X and the (dequantized) weights are rounded to f16 when
// staged; accumulation is f32. One workgroup = 4 subgroups = a 64 (rows of X) x 64 (rows of W)
// output tile, each subgroup a 32 x 32 quarter of it as 2 x 2 fragments of 16 x 16. K advances
// CK at a time through workgroup memory; the next step's global loads are issued into registers
// before the current step's multiplies. Grid: (ceil(m / 64), ceil(rows / 64)).
// cy: [64 rows of X][64 rows of W] f32 accumulators, staged for the bounds-checked epilogue.
var<workgroup> cy: array<f32, 4096>;
@compute @workgroup_size(128)
fn gemm_coop(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32) {
    let m0 = wid.x * 64u;
    let t0 = wid.y * 64u;
    let st = (sg / 2u) * 32u;
    let sm = (sg % 2u) * 32u;
    for (var i = li; i < 4096u; i += 128u) { cy[i] = 0.0; }
    workgroupBarrier();
    var c00 = coopLoadT<coop_mat16x16<f32, C>>(&cy[0], 64u);
    var c01 = c00;
    var c10 = c00;
    var c11 = c00;
    var x0 = coop_x(li, 0u, t0, 0u, p.k);
    var x1 = coop_x(li, 1u, t0, 0u, p.k);
    var x2 = coop_x(li, 2u, t0, 0u, p.k);
    var x3 = coop_x(li, 3u, t0, 0u, p.k);
    var x4 = coop_x(li, 4u, t0, 0u, p.k);
    var x5 = coop_x(li, 5u, t0, 0u, p.k);
    var x6 = coop_x(li, 6u, t0, 0u, p.k);
    var x7 = coop_x(li, 7u, t0, 0u, p.k);
    var w0 = coop_w(li, 0u, m0, 0u);
    var w1 = coop_w(li, 1u, m0, 0u);
    var w2 = coop_w(li, 2u, m0, 0u);
    var w3 = coop_w(li, 3u, m0, 0u);
    var w4v = coop_w(li, 4u, m0, 0u);
    var w5 = coop_w(li, 5u, m0, 0u);
    var w6 = coop_w(li, 6u, m0, 0u);
    var w7 = coop_w(li, 7u, m0, 0u);
    for (var k0 = 0u; k0 < p.k; k0 += CK) {
        coop_stage(li, 0u, x0, w0);
        coop_stage(li, 1u, x1, w1);
        coop_stage(li, 2u, x2, w2);
        coop_stage(li, 3u, x3, w3);
        coop_stage(li, 4u, x4, w4v);
        coop_stage(li, 5u, x5, w5);
        coop_stage(li, 6u, x6, w6);
        coop_stage(li, 7u, x7, w7);
        workgroupBarrier();
        let kn = k0 + CK;
        if (kn < p.k) {
            x0 = coop_x(li, 0u, t0, kn, p.k);
            x1 = coop_x(li, 1u, t0, kn, p.k);
            x2 = coop_x(li, 2u, t0, kn, p.k);
            x3 = coop_x(li, 3u, t0, kn, p.k);
            x4 = coop_x(li, 4u, t0, kn, p.k);
            x5 = coop_x(li, 5u, t0, kn, p.k);
            x6 = coop_x(li, 6u, t0, kn, p.k);
            x7 = coop_x(li, 7u, t0, kn, p.k);
            w0 = coop_w(li, 0u, m0, kn);
            w1 = coop_w(li, 1u, m0, kn);
            w2 = coop_w(li, 2u, m0, kn);
            w3 = coop_w(li, 3u, m0, kn);
            w4v = coop_w(li, 4u, m0, kn);
            w5 = coop_w(li, 5u, m0, kn);
            w6 = coop_w(li, 6u, m0, kn);
            w7 = coop_w(li, 7u, m0, kn);
        }
        for (var kk = 0u; kk < CK; kk += 16u) {
            let a0 = coopLoadT<coop_mat16x16<f16, A>>(&ax[st * SK + kk], SK);
            let a1 = coopLoadT<coop_mat16x16<f16, A>>(&ax[(st + 16u) * SK + kk], SK);
            let b0 = coopLoad<coop_mat16x16<f16, B>>(&bw[sm * SK + kk], SK);
            let b1 = coopLoad<coop_mat16x16<f16, B>>(&bw[(sm + 16u) * SK + kk], SK);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a0, b1, c01);
            c10 = coopMultiplyAdd(a1, b0, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
        }
        workgroupBarrier();
    }
    coopStoreT(c00, &cy[st * 64u + sm], 64u);
    coopStoreT(c01, &cy[st * 64u + sm + 16u], 64u);
    coopStoreT(c10, &cy[(st + 16u) * 64u + sm], 64u);
    coopStoreT(c11, &cy[(st + 16u) * 64u + sm + 16u], 64u);
    workgroupBarrier();
    for (var i = 0u; i < 32u; i++) {
        let e = li + i * 128u;
        let t = t0 + e / 64u;
        let m = m0 + e % 64u;
        if (t < p.rows && m < p.m) { store(t, m, cy[e]); }
    }
}
#endif
#endif

#ifdef COOP2
// gemm_coop2: gemm_coop with twice the multiplies per staged element. One
// workgroup = 8 subgroups = a 128 (rows of X) x 128 (rows of W) output tile, each subgroup a
// 32 x 64 part of it as 2 x 4 fragments; K advances 32 at a time through workgroup memory, the
// next step's loads held in registers meanwhile. Full tiles store their fragments straight to Y
// (a residual add starts them from Y); edge tiles go through a per-subgroup 16 x 16 staging
// fragment and the bounds-checked store. Split over K (grid z = slice, kslice a multiple of 32),
// each slice's partial results go ypart further along Y; the host keeps Y's offset, row stride
// and ypart multiples of 4 (16-byte aligned fragment rows). No bias.
// Grid: (ceil(m / 128), ceil(rows / 128), slices).
// cs2: zeros for the accumulators' start (the first 256), then one 16 x 16 f32 staging fragment
// per subgroup for edge tiles (the 16-subgroup form: 8 of them, used in two rounds).
var<workgroup> cs2: array<f32, 2304>;

// Edge tiles: staging fragment `slot` (rows t0.., W rows m0..) stored element by element where
// inside Y, by the subgroups that are `on`. Contains barriers: call from uniform control flow.
fn coop2_edge(slot: u32, on: bool, lane: u32, t0: u32, m0: u32) {
    workgroupBarrier();
    if (on) {
        for (var e = 0u; e < 8u; e++) {
            let i = lane + e * 32u;
            let t = t0 + i / 16u;
            let m = m0 + i % 16u;
            if (t < p.rows && m < p.m) { store(t, m, cs2[256u + slot * 256u + i]); }
        }
    }
    workgroupBarrier();
}

#ifdef COOP2_SG16
// The 16-subgroup form's share of one 64-deep K step, held in registers while the previous
// step multiplies: 4 items of X (f32, 16-byte loads) and 4 of W (4 k each). Kept in a struct of
// vectors, not an array (see coop_x).
struct Sg16Step {
    x0: vec4<f32>,
    x1: vec4<f32>,
    x2: vec4<f32>,
    x3: vec4<f32>,
    w0: vec4<f32>,
    w1: vec4<f32>,
    w2: vec4<f32>,
    w3: vec4<f32>,
}

fn sg16_load(li: u32, t0: u32, m0: u32, k0: u32, ke: u32) -> Sg16Step {
    return Sg16Step(
        coop_x(li, 0u, t0, k0, ke),
        coop_x(li, 1u, t0, k0, ke),
        coop_x(li, 2u, t0, k0, ke),
        coop_x(li, 3u, t0, k0, ke),
        coop_w(li, 0u, m0, k0),
        coop_w(li, 1u, m0, k0),
        coop_w(li, 2u, m0, k0),
        coop_w(li, 3u, m0, k0),
    );
}

fn sg16_stage(li: u32, s: Sg16Step) {
    coop_stage(li, 0u, s.x0, s.w0);
    coop_stage(li, 1u, s.x1, s.w1);
    coop_stage(li, 2u, s.x2, s.w2);
    coop_stage(li, 3u, s.x3, s.w3);
}

// gemm_coop2 with 16 subgroups (512 threads) per 128 x 128 tile, each subgroup a 32 x 32 part
// as 2 x 2 fragments: twice the subgroups per SM, half the accumulators per thread (the
// 8-subgroup form runs one workgroup per SM on an H200), K steps twice as deep (within 48 KiB of
// workgroup memory: the staged tiles 36 KiB, cs2 9 KiB). Same staging, splits and epilogue as
// the 8-subgroup form below.
@compute @workgroup_size(512)
fn gemm_coop2(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32) {
    let mw = wid.x * 128u;
    let tw = wid.y * 128u;
    // subgroup sg: rows tw + (sg / 4) * 32 .., W rows mw + (sg % 4) * 32 ..
    let st = (sg / 4u) * 32u;
    let sm = (sg % 4u) * 32u;
    let lane = li % 32u;
    let kb = wid.z * p.kslice;
    let ke = min(kb + p.kslice, p.k);
    yslice = wid.z * p.ypart;
    let full = (tw + 128u <= p.rows) & (mw + 128u <= p.m);
    if (li < 256u) { cs2[li] = 0.0; }
    workgroupBarrier();
    var c00 = coopLoadT<coop_mat16x16<f32, C>>(&cs2[0], 16u);
    var c01 = c00;
    var c10 = c00;
    var c11 = c00;
    let ys = p.y_stride;
    let y0 = p.y_off + wid.z * p.ypart + (tw + st) * p.y_stride + mw + sm;
    let y1 = y0 + 16u * p.y_stride;
    let i00 = y0;
    let i01 = y0 + 16u;
    let i10 = y1;
    let i11 = y1 + 16u;
    if (full & (p.accumulate != 0u)) {
        c00 = coopLoadT<coop_mat16x16<f32, C>>(&y[i00], ys);
        c01 = coopLoadT<coop_mat16x16<f32, C>>(&y[i01], ys);
        c10 = coopLoadT<coop_mat16x16<f32, C>>(&y[i10], ys);
        c11 = coopLoadT<coop_mat16x16<f32, C>>(&y[i11], ys);
    }
    var st_next = sg16_load(li, tw, mw, kb, ke);
    for (var k0 = kb; k0 < ke; k0 += CK) {
        sg16_stage(li, st_next);
        workgroupBarrier();
        let kn = k0 + CK;
        if (kn < ke) {
            st_next = sg16_load(li, tw, mw, kn, ke);
        }
        for (var kk = 0u; kk < CK; kk += 16u) {
            let a0 = coopLoadT<coop_mat16x16<f16, A>>(&ax[st * SK + kk], SK);
            let a1 = coopLoadT<coop_mat16x16<f16, A>>(&ax[(st + 16u) * SK + kk], SK);
            let b0 = coopLoad<coop_mat16x16<f16, B>>(&bw[sm * SK + kk], SK);
            let b1 = coopLoad<coop_mat16x16<f16, B>>(&bw[(sm + 16u) * SK + kk], SK);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a0, b1, c01);
            c10 = coopMultiplyAdd(a1, b0, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
        }
        workgroupBarrier();
    }
    if (full) {
        coopStoreT(c00, &y[i00], ys);
        coopStoreT(c01, &y[i01], ys);
        coopStoreT(c10, &y[i10], ys);
        coopStoreT(c11, &y[i11], ys);
    } else {
        // Two rounds of 8 subgroups through the 8 staging fragments; the other 8 store to
        // the zeros (free after the K loop), a race on values nobody reads.
        let ta = tw + st;
        let tb = ta + 16u;
        let ma = mw + sm;
        let slot = sg % 8u;
        for (var r = 0u; r < 2u; r++) {
            let on = sg / 8u == r;
            let cs0 = select(0u, 256u + slot * 256u, on);
            coopStoreT(c00, &cs2[cs0], 16u);
            coop2_edge(slot, on, lane, ta, ma);
            coopStoreT(c01, &cs2[cs0], 16u);
            coop2_edge(slot, on, lane, ta, ma + 16u);
            coopStoreT(c10, &cs2[cs0], 16u);
            coop2_edge(slot, on, lane, tb, ma);
            coopStoreT(c11, &cs2[cs0], 16u);
            coop2_edge(slot, on, lane, tb, ma + 16u);
        }
    }
}
#else
@compute @workgroup_size(256)
fn gemm_coop2(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32) {
    let mw = wid.x * 128u;
    let tw = wid.y * 128u;
    // subgroup sg: rows tw + (sg / 2) * 32 .., W rows mw + (sg % 2) * 64 ..
    let st = (sg / 2u) * 32u;
    let sm = (sg % 2u) * 64u;
    let lane = li % 32u;
    // Split over K (grid z > 1): this workgroup's slice and where its partial results go.
    let kb = wid.z * p.kslice;
    let ke = min(kb + p.kslice, p.k);
    yslice = wid.z * p.ypart;
    let full = (tw + 128u <= p.rows) & (mw + 128u <= p.m);
    for (var i = li; i < 2304u; i += 256u) { cs2[i] = 0.0; }
    workgroupBarrier();
    var c00 = coopLoadT<coop_mat16x16<f32, C>>(&cs2[0], 16u);
    var c01 = c00;
    var c02 = c00;
    var c03 = c00;
    var c10 = c00;
    var c11 = c00;
    var c12 = c00;
    var c13 = c00;
    // Y indices and stride as lets: naga 30 does not emit the index or stride expressions of a
    // cooperative store inside a branch itself (its SPIR-V writer then fails; the variant test
    // runs that writer). `&`, not `&&`, in `full`: naga lowers a short-circuit to a branch,
    // which its uniformity analysis cannot follow.
    let ys = p.y_stride;
    let y0 = p.y_off + wid.z * p.ypart + (tw + st) * p.y_stride + mw + sm;
    let y1 = y0 + 16u * p.y_stride;
    let i00 = y0;
    let i01 = y0 + 16u;
    let i02 = y0 + 32u;
    let i03 = y0 + 48u;
    let i10 = y1;
    let i11 = y1 + 16u;
    let i12 = y1 + 32u;
    let i13 = y1 + 48u;
    if (full & (p.accumulate != 0u)) {
        c00 = coopLoadT<coop_mat16x16<f32, C>>(&y[i00], ys);
        c01 = coopLoadT<coop_mat16x16<f32, C>>(&y[i01], ys);
        c02 = coopLoadT<coop_mat16x16<f32, C>>(&y[i02], ys);
        c03 = coopLoadT<coop_mat16x16<f32, C>>(&y[i03], ys);
        c10 = coopLoadT<coop_mat16x16<f32, C>>(&y[i10], ys);
        c11 = coopLoadT<coop_mat16x16<f32, C>>(&y[i11], ys);
        c12 = coopLoadT<coop_mat16x16<f32, C>>(&y[i12], ys);
        c13 = coopLoadT<coop_mat16x16<f32, C>>(&y[i13], ys);
    }
    var x0 = coop_x(li, 0u, tw, kb, ke);
    var x1 = coop_x(li, 1u, tw, kb, ke);
    var x2 = coop_x(li, 2u, tw, kb, ke);
    var x3 = coop_x(li, 3u, tw, kb, ke);
    var w0 = coop_w(li, 0u, mw, kb);
    var w1 = coop_w(li, 1u, mw, kb);
    var w2 = coop_w(li, 2u, mw, kb);
    var w3 = coop_w(li, 3u, mw, kb);
    for (var k0 = kb; k0 < ke; k0 += CK) {
        coop_stage(li, 0u, x0, w0);
        coop_stage(li, 1u, x1, w1);
        coop_stage(li, 2u, x2, w2);
        coop_stage(li, 3u, x3, w3);
        workgroupBarrier();
        let kn = k0 + CK;
        if (kn < ke) {
            x0 = coop_x(li, 0u, tw, kn, ke);
            x1 = coop_x(li, 1u, tw, kn, ke);
            x2 = coop_x(li, 2u, tw, kn, ke);
            x3 = coop_x(li, 3u, tw, kn, ke);
            w0 = coop_w(li, 0u, mw, kn);
            w1 = coop_w(li, 1u, mw, kn);
            w2 = coop_w(li, 2u, mw, kn);
            w3 = coop_w(li, 3u, mw, kn);
        }
        for (var kk = 0u; kk < CK; kk += 16u) {
            let a0 = coopLoadT<coop_mat16x16<f16, A>>(&ax[st * SK + kk], SK);
            let a1 = coopLoadT<coop_mat16x16<f16, A>>(&ax[(st + 16u) * SK + kk], SK);
            let b0 = coopLoad<coop_mat16x16<f16, B>>(&bw[sm * SK + kk], SK);
            let b1 = coopLoad<coop_mat16x16<f16, B>>(&bw[(sm + 16u) * SK + kk], SK);
            let b2 = coopLoad<coop_mat16x16<f16, B>>(&bw[(sm + 32u) * SK + kk], SK);
            let b3 = coopLoad<coop_mat16x16<f16, B>>(&bw[(sm + 48u) * SK + kk], SK);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a0, b1, c01);
            c02 = coopMultiplyAdd(a0, b2, c02);
            c03 = coopMultiplyAdd(a0, b3, c03);
            c10 = coopMultiplyAdd(a1, b0, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
            c12 = coopMultiplyAdd(a1, b2, c12);
            c13 = coopMultiplyAdd(a1, b3, c13);
        }
        workgroupBarrier();
    }
    if (full) {
        coopStoreT(c00, &y[i00], ys);
        coopStoreT(c01, &y[i01], ys);
        coopStoreT(c02, &y[i02], ys);
        coopStoreT(c03, &y[i03], ys);
        coopStoreT(c10, &y[i10], ys);
        coopStoreT(c11, &y[i11], ys);
        coopStoreT(c12, &y[i12], ys);
        coopStoreT(c13, &y[i13], ys);
    } else {
        let cs0 = 256u + sg * 256u;
        let ta = tw + st;
        let tb = ta + 16u;
        let ma = mw + sm;
        coopStoreT(c00, &cs2[cs0], 16u);
        coop2_edge(sg, true, lane, ta, ma);
        coopStoreT(c01, &cs2[cs0], 16u);
        coop2_edge(sg, true, lane, ta, ma + 16u);
        coopStoreT(c02, &cs2[cs0], 16u);
        coop2_edge(sg, true, lane, ta, ma + 32u);
        coopStoreT(c03, &cs2[cs0], 16u);
        coop2_edge(sg, true, lane, ta, ma + 48u);
        coopStoreT(c10, &cs2[cs0], 16u);
        coop2_edge(sg, true, lane, tb, ma);
        coopStoreT(c11, &cs2[cs0], 16u);
        coop2_edge(sg, true, lane, tb, ma + 16u);
        coopStoreT(c12, &cs2[cs0], 16u);
        coop2_edge(sg, true, lane, tb, ma + 32u);
        coopStoreT(c13, &cs2[cs0], 16u);
        coop2_edge(sg, true, lane, tb, ma + 48u);
    }
}
#endif
#endif

#ifdef REDUCE
// gemm_reduce: Y[t, m] (+)= the sum of a K-split gemm's or gemm_coop2's `passes` partial results (bound as
// X: [passes][rows][x_stride] f32 from x_off, ypart elements apart), summed in slice order.
// Grid: (ceil(m / 256), rows).
@compute @workgroup_size(256)
fn gemm_reduce(@builtin(global_invocation_id) gid: vec3<u32>) {
    let m = gid.x;
    let t = gid.y;
    if (m >= p.m || t >= p.rows) { return; }
    var s = 0.0;
    for (var z = 0u; z < p.passes; z++) { s += x[p.x_off + z * p.ypart + t * p.x_stride + m]; }
    store(t, m, s);
}
#endif

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
#ifdef PRO_CONV
    return conv_x(xb, k);
#else
    return x[xb + k];
#endif
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
