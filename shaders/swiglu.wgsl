// MLP activation: gate = silu(gate) * up, elementwise over [rows, width].
// Grid: (ceil(rows * width / 256), 1, 1), flattened (x capped; y used past 65535 groups).

struct Params {
    count: u32,   // rows * width
    groups_x: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// up: [rows, width] f32.
@group(0) @binding(1) var<storage, read> up: array<f32>;
// gate: [rows, width] f32, overwritten with the activation.
@group(0) @binding(2) var<storage, read_write> gate: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * p.groups_x * 256u;
    if (i >= p.count) { return; }
    let g = gate[i];
    gate[i] = (g / (1.0 + exp(-g))) * up[i];
}
