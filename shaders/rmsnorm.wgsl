// RMSNorm over rows: y = w * (x * rsqrt(mean(x^2) + eps)), one workgroup per row.
// Used for input / pre-MLP / final norms (width d) and for the SSM's inner dt, B and C
// norms, which normalize column slices of the x_proj output in place (define INPLACE).
// Grid: (rows, 1, 1).

struct Params {
    rows: u32,
    width: u32,
    x_off: u32,     // element offset of row 0 of the input
    x_stride: u32,  // elements between input rows
    y_off: u32,
    y_stride: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
// w: [width] f32 norm weight.
@group(0) @binding(1) var<storage, read> w: array<f32>;
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

const WG: u32 = 256u;
var<workgroup> red: array<f32, 256>;

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
