// Prompt-chunk GEMM on cooperative matrices (tensor cores) with both operands read as f16
// straight from global memory: Y[t, m] (+)= sum_k Xh[t, k] * W[m, k], accumulated in f32.
//
// matmul.wgsl's gemm_coop stages X (f32) and W through workgroup memory, one scalar f16 store per
// element and a barrier pair per 64-deep K step; most of its time went there. Here nothing is
// staged: X is first rounded to f16 into its own buffer (entry to_f16, one cheap pass), and each
// subgroup then loads its fragments of Xh and W directly (they are reused through the L1 / L2
// caches), so the K loop has no barrier and no workgroup memory at all.
//
// Entry points:
//   to_f16 (define TO_F16) - Xh[t, :] = f16(X[t, :]) for t < rows. Grid (ceil(k / 1024), rows).
//   gemm   (define COOP)   - the product. One workgroup = 4 subgroups stacked along the rows of
//            X; a subgroup owns a 32 (rows of X) x 16 * FM (rows of W) output tile as 2 x FM
//            fragments of 16 x 16, so the four share every W fragment (loaded once into L1).
//            Grid (m / (16 * FM), ceil(rows / 128)).
// FM (define, 2 or 4): W fragments per subgroup. The engine compiles FM = 4 (define FM4 too).
//
// Measured on an H200 (256-row chunks of Hymba-1.5B, per product): faster than gemm_coop on
// the wide outputs (gate|up 11008: 367 -> 278-291 us; in_proj 8960 / 8000: 298 / 241 ->
// 279-286 / 188-192 us) and slower on the 1600-wide ones (out_proj, down: 194 -> 285 us; 324
// with FM = 2), so the host sends only outputs of at least F16X_MIN_M rows here. Issuing a
// 64-deep block's 24 fragment loads before its first multiply instead of 16 deep at a time
// made no difference (within 2%), so the loop stays simple.
// The host uses this kernel only when K and m are multiples of 16 (whole fragments along K and
// along the rows of W), W is f16 in one buffer, there is no bias, and Y's offset and row
// stride are multiples of 4 (16-byte aligned fragment rows); Xh holds the rows rounded up to
// 128. Other products take matmul.wgsl.

// Same layout as matmul.wgsl's Params (the host fills both from MatmulParams).
struct Params {
    rows: u32,       // T: rows of X and Y
    m: u32,          // output features = rows of W
    k: u32,          // input features (a multiple of 16)
    kp4: u32,        // row stride of W in vec4 units (= k / 4 here)
    x_off: u32,      // to_f16: element offset of X[0, 0]
    x_stride: u32,   // to_f16: elements between rows of X
    y_off: u32,      // element offset of Y[0, 0]
    y_stride: u32,   // elements between rows of Y
    accumulate: u32, // 1: Y += result (residual add), 0: Y = result
    has_bias: u32,   // always 0 here
    eps: f32,
    passes: u32,
    aux_n: u32,
    kslice: u32,
    ypart: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

#ifdef TO_F16
// X: [rows, x_stride] f32, row-major, starting at x_off.
@group(0) @binding(1) var<storage, read> x: array<f32>;
// Xh: [rows, k / 2] u32 = [rows, k] f16 row-major, two per word (element 2i in the low half).
@group(0) @binding(2) var<storage, read_write> xh: array<u32>;

// Rounds to f16, saturating at the largest finite f16 (pack2x16float leaves overflow undefined).
fn half2(v: vec2<f32>) -> u32 {
    return pack2x16float(clamp(v, vec2<f32>(-65504.0), vec2<f32>(65504.0)));
}

// One thread per 4 elements.
@compute @workgroup_size(256)
fn to_f16(@builtin(global_invocation_id) gid: vec3<u32>) {
    let k = gid.x * 4u;
    let t = gid.y;
    if (k >= p.k || t >= p.rows) { return; }
    let b = p.x_off + t * p.x_stride + k;
    let o = (t * p.k + k) / 2u;
    xh[o] = half2(vec2<f32>(x[b], x[b + 1u]));
    xh[o + 1u] = half2(vec2<f32>(x[b + 2u], x[b + 3u]));
}
#else
// Xh: [rows rounded up to 128, k] f16, row-major: fragment A, loaded row-major. Rows past
// `rows` hold whatever an earlier product left there; they only reach outputs that are dropped.
@group(0) @binding(1) var<storage, read> xh: array<f16>;
// W: [m, k] f16, row-major (PyTorch Linear layout) = W^T column-major: fragment B.
@group(0) @binding(2) var<storage, read> w: array<f16>;
// bias: unused (bound to a dummy buffer; the host never sends a bias here).
@group(0) @binding(3) var<storage, read> bias: array<f32>;
// Y: [rows, y_stride] f32, row-major, starting at y_off.
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

// Zeros for the accumulators' initial value (the first 256), then one 16 x 16 f32 staging
// fragment per subgroup for the bounds-checked epilogue of edge tiles.
var<workgroup> cs: array<f32, 1024>;

fn store(t: u32, m: u32, v: f32) {
    let i = p.y_off + t * p.y_stride + m;
    var r = v;
    if (p.accumulate != 0u) { r += y[i]; }
    y[i] = r;
}

// Edge tiles: after the subgroup has put a fragment (rows t0.., W rows m0..) into its staging
// slot cs[sg * 256..], each element is stored if it lies inside Y. (The fragment is stored by the
// caller: naga 30's SPIR-V writer fails on a cooperative matrix passed as a function argument.)
// Contains barriers: call from uniform control flow.
fn store_edge(sg: u32, lane: u32, t0: u32, m0: u32) {
    workgroupBarrier();
    for (var e = 0u; e < 8u; e++) {
        let i = lane + e * 32u;
        let t = t0 + i / 16u;
        let m = m0 + i % 16u;
        if (t < p.rows && m < p.m) { store(t, m, cs[sg * 256u + i]); }
    }
    workgroupBarrier();
}

@compute @workgroup_size(128)
fn gemm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32) {
    let m0 = wid.x * (16u * FM);
    let tw = wid.y * 128u;
    let t0 = tw + sg * 32u;
    let lane = li % 32u;
    let kw = p.kp4 * 4u;
    // Whole workgroup tile inside Y (workgroup-uniform): fragments go straight to Y, and a
    // residual add starts the accumulators from Y instead of zero. (`&`, not `&&`: naga
    // lowers a short-circuit to a branch, which its uniformity analysis cannot follow.)
    let full = (tw + 128u <= p.rows) & (m0 + 16u * FM <= p.m);
    // W rows of each fragment, clamped inside W on an edge tile (those results are dropped).
    let mb0 = min(m0, p.m - 16u);
    let mb1 = min(m0 + 16u, p.m - 16u);
#ifdef FM4
    let mb2 = min(m0 + 32u, p.m - 16u);
    let mb3 = min(m0 + 48u, p.m - 16u);
#endif
    for (var i = li; i < 1024u; i += 128u) { cs[i] = 0.0; }
    workgroupBarrier();
    var c00 = coopLoadT<coop_mat16x16<f32, C>>(&cs[0], 16u);
    var c01 = c00;
    var c10 = c00;
    var c11 = c00;
#ifdef FM4
    var c02 = c00;
    var c03 = c00;
    var c12 = c00;
    var c13 = c00;
#endif
    // Y indices and stride as `let`s: naga 30 does not emit the index or stride expressions of
    // a cooperative store inside a branch itself (its SPIR-V writer then fails).
    let ys = p.y_stride;
    let y0 = p.y_off + t0 * p.y_stride;
    let y1 = y0 + 16u * p.y_stride;
    let i00 = y0 + m0;
    let i01 = y0 + m0 + 16u;
    let i10 = y1 + m0;
    let i11 = y1 + m0 + 16u;
#ifdef FM4
    let i02 = y0 + m0 + 32u;
    let i03 = y0 + m0 + 48u;
    let i12 = y1 + m0 + 32u;
    let i13 = y1 + m0 + 48u;
#endif
    if (full & (p.accumulate != 0u)) {
        c00 = coopLoadT<coop_mat16x16<f32, C>>(&y[i00], ys);
        c01 = coopLoadT<coop_mat16x16<f32, C>>(&y[i01], ys);
        c10 = coopLoadT<coop_mat16x16<f32, C>>(&y[i10], ys);
        c11 = coopLoadT<coop_mat16x16<f32, C>>(&y[i11], ys);
#ifdef FM4
        c02 = coopLoadT<coop_mat16x16<f32, C>>(&y[i02], ys);
        c03 = coopLoadT<coop_mat16x16<f32, C>>(&y[i03], ys);
        c12 = coopLoadT<coop_mat16x16<f32, C>>(&y[i12], ys);
        c13 = coopLoadT<coop_mat16x16<f32, C>>(&y[i13], ys);
#endif
    }
    let xa = t0 * p.k;
    let xb = xa + 16u * p.k;
    for (var k = 0u; k < p.k; k += 16u) {
        let a0 = coopLoadT<coop_mat16x16<f16, A>>(&xh[xa + k], p.k);
        let a1 = coopLoadT<coop_mat16x16<f16, A>>(&xh[xb + k], p.k);
        let b0 = coopLoad<coop_mat16x16<f16, B>>(&w[mb0 * kw + k], kw);
        let b1 = coopLoad<coop_mat16x16<f16, B>>(&w[mb1 * kw + k], kw);
        c00 = coopMultiplyAdd(a0, b0, c00);
        c10 = coopMultiplyAdd(a1, b0, c10);
        c01 = coopMultiplyAdd(a0, b1, c01);
        c11 = coopMultiplyAdd(a1, b1, c11);
#ifdef FM4
        let b2 = coopLoad<coop_mat16x16<f16, B>>(&w[mb2 * kw + k], kw);
        let b3 = coopLoad<coop_mat16x16<f16, B>>(&w[mb3 * kw + k], kw);
        c02 = coopMultiplyAdd(a0, b2, c02);
        c12 = coopMultiplyAdd(a1, b2, c12);
        c03 = coopMultiplyAdd(a0, b3, c03);
        c13 = coopMultiplyAdd(a1, b3, c13);
#endif
    }
    if (full) {
        coopStoreT(c00, &y[i00], ys);
        coopStoreT(c01, &y[i01], ys);
        coopStoreT(c10, &y[i10], ys);
        coopStoreT(c11, &y[i11], ys);
#ifdef FM4
        coopStoreT(c02, &y[i02], ys);
        coopStoreT(c03, &y[i03], ys);
        coopStoreT(c12, &y[i12], ys);
        coopStoreT(c13, &y[i13], ys);
#endif
    } else {
        // every subgroup has read the zeros in cs before any overwrites them
        workgroupBarrier();
        let cs0 = sg * 256u;
        coopStoreT(c00, &cs[cs0], 16u);
        store_edge(sg, lane, t0, m0);
        coopStoreT(c01, &cs[cs0], 16u);
        store_edge(sg, lane, t0, m0 + 16u);
        coopStoreT(c10, &cs[cs0], 16u);
        store_edge(sg, lane, t0 + 16u, m0);
        coopStoreT(c11, &cs[cs0], 16u);
        store_edge(sg, lane, t0 + 16u, m0 + 16u);
#ifdef FM4
        coopStoreT(c02, &cs[cs0], 16u);
        store_edge(sg, lane, t0, m0 + 32u);
        coopStoreT(c03, &cs[cs0], 16u);
        store_edge(sg, lane, t0, m0 + 48u);
        coopStoreT(c12, &cs[cs0], 16u);
        store_edge(sg, lane, t0 + 16u, m0 + 32u);
        coopStoreT(c13, &cs[cs0], 16u);
        store_edge(sg, lane, t0 + 16u, m0 + 48u);
#endif
    }
}
#endif
