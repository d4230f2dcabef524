// MLP activation for prompt chunks: with gate and up computed by one matmul into rows of
// [gate (width) | up (width)], gate = silu(gate) * up in place.
// Grid: (min(groups, 32768), ceil(groups / 32768), 1) over rows * width elements.

struct Params {
    count: u32,    // rows * width
    width: u32,    // intermediate size
    groups_x: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// gu: [rows, 2 * width] f32: gate then up per row; the gate half is overwritten.
@group(0) @binding(1) var<storage, read_write> gu: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * p.groups_x * 256u;
    if (i >= p.count) { return; }
    let t = i / p.width;
    let j = i % p.width;
    let gi = t * 2u * p.width + j;
    let g = gu[gi];
    gu[gi] = (g / (1.0 + exp(-g))) * gu[gi + p.width];
}
