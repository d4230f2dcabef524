// RMSNorm over rows: y = w * (x * rsqrt(mean(x^2) + eps)), one workgroup per row.
// Used for input / pre-MLP / final norms (width d) and for the SSM's inner dt, B and C
// norms, which normalize column slices of the x_proj output in place (define INPLACE).
// Define PARTS: the row is first the sum of a K-split product's partial results (the
// gemm_reduce of matmul.wgsl fused in front of the norm that follows it):
//   PARTS            r = the sum of the slices (+ the existing y row if accumulate); y <- r (the
//                    residual stream), u <- w * norm(r)               (out_proj then pre-MLP norm)
//   PARTS, INPLACE   y <- w * norm(sum of the slices), with columns [0, seg1), [seg1, seg2),
//                    [seg2, width) normalized separately               (x_proj then dt, B, C norms)
// Grid: (rows, 1, 1).

struct Params {
    rows: u32,
    width: u32,
    x_off: u32,     // element offset of row 0 of the input (PARTS: of slice 0's row 0)
    x_stride: u32,  // elements between input rows
    y_off: u32,
    y_stride: u32,
    eps: f32,
    // PARTS only:
    seg1: u32,      // segment bounds (seg1 = seg2 = width: one segment)
    seg2: u32,
    slices: u32,    // partial results to sum, in slice order
    ypart: u32,     // elements between slices
    accumulate: u32, // 1: add the sum to the existing y row
    u_off: u32,     // PARTS without INPLACE: the normalized output's row 0 and row stride
    u_stride: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// w: [width] f32 norm weight.
@group(0) @binding(1) var<storage, read> w: array<f32>;
#ifdef PARTS
// parts: [slices][rows][x_stride] f32 partial results from x_off, ypart elements apart.
@group(0) @binding(2) var<storage, read> parts: array<f32>;
// y: [rows, y_stride] f32 from y_off: the sum (or, with INPLACE, its normalized form).
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
#ifndef INPLACE
// u: [rows, u_stride] f32 from u_off: the normalized sum.
@group(0) @binding(4) var<storage, read_write> u: array<f32>;
#endif
#else
#ifdef INPLACE
// y: rows of `width` values at y_off + r * y_stride, normalized in place
// (the caller sets x_off = y_off and x_stride = y_stride).
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
fn xin(i: u32) -> f32 { return y[i]; }
#else
// x: [rows, x_stride] f32 input, starting at x_off.
@group(0) @binding(2) var<storage, read> x: array<f32>;
// y: [rows, y_stride] f32 output, starting at y_off.
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
fn xin(i: u32) -> f32 { return x[i]; }
#endif
#endif

const WG: u32 = 256u;
var<workgroup> red: array<f32, 256>;

#ifndef PARTS
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let row = wid.x;
    let xb = p.x_off + row * p.x_stride;
    let yb = p.y_off + row * p.y_stride;
    var s = 0.0;
    for (var i = li; i < p.width; i += WG) {
        let v = xin(xb + i);
        s += v * v;
    }
    red[li] = s;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k = k >> 1u) {
        if (li < k) { red[li] += red[li + k]; }
        workgroupBarrier();
    }
    let r = inverseSqrt(red[0] / f32(p.width) + p.eps);
    // Each element is read and written by the same thread, so in-place use is safe.
    for (var i = li; i < p.width; i += WG) {
        y[yb + i] = w[i] * (xin(xb + i) * r);
    }
}
#else
var<workgroup> red3: array<vec4<f32>, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let row = wid.x;
    let xb = p.x_off + row * p.x_stride;
    let yb = p.y_off + row * p.y_stride;
    // Sums of squares of the three segments.
    var s = vec4<f32>(0.0);
    for (var i = li; i < p.width; i += WG) {
        var v = 0.0;
        for (var z = 0u; z < p.slices; z++) { v += parts[xb + z * p.ypart + i]; }
        if (p.accumulate != 0u) { v = y[yb + i] + v; }
        // Each element is written and read back by the same thread.
        y[yb + i] = v;
        let q = v * v;
        if (i < p.seg1) { s.x += q; } else if (i < p.seg2) { s.y += q; } else { s.z += q; }
    }
    red3[li] = s;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k = k >> 1u) {
        if (li < k) { red3[li] += red3[li + k]; }
        workgroupBarrier();
    }
    let n = max(vec3<f32>(f32(p.seg1), f32(p.seg2 - p.seg1), f32(p.width - p.seg2)), vec3<f32>(1.0));
    let r = inverseSqrt(red3[0].xyz / n + p.eps);
    for (var i = li; i < p.width; i += WG) {
        var ri = r.z;
        if (i < p.seg1) { ri = r.x; } else if (i < p.seg2) { ri = r.y; }
        let o = w[i] * (y[yb + i] * ri);
#ifdef INPLACE
        y[yb + i] = o;
#else
        u[p.u_off + row * p.u_stride + i] = o;
#endif
    }
}
#endif
