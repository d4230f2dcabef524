//! Recording dispatches apart from running them.
//!
//! A [`Recorder`] collects dispatches (kernel, buffers, parameter bytes,
//! workgroup counts). [`Recorder::finish`] turns them into a [`Program`]: one
//! uniform arena for all parameters and one bind group per dispatch, created
//! once. A program can be encoded any number of times; when only the
//! parameters change (the next decode step), [`Recorder::params_only`] records
//! the same structure without creating anything and [`Program::update_params`]
//! writes the new bytes.

use super::{BindKind, Gpu, Kernel};
use crate::error::{Error, Result};
use std::sync::Arc;

const PARAM_STRIDE: usize = 256;

struct Pending {
    kernel: Arc<Kernel>,
    buffers: Vec<wgpu::Buffer>,
    groups: [u32; 3],
}

pub struct Recorder<'g> {
    gpu: &'g Gpu,
    pending: Vec<Pending>,
    params: Vec<u8>,
    build: bool,
}

pub struct Program {
    params: wgpu::Buffer,
    param_bytes: usize,
    dispatches: Vec<(Arc<Kernel>, wgpu::BindGroup, [u32; 3])>,
}

impl<'g> Recorder<'g> {
    pub fn new(gpu: &'g Gpu) -> Self {
        Recorder {
            gpu,
            pending: Vec::new(),
            params: Vec::new(),
            build: true,
        }
    }
    /// A recorder that only collects parameter bytes, for [`Program::update_params`].
    pub fn params_only(gpu: &'g Gpu) -> Self {
        Recorder {
            gpu,
            pending: Vec::new(),
            params: Vec::new(),
            build: false,
        }
    }
    pub fn gpu(&self) -> &'g Gpu {
        self.gpu
    }

    /// Adds one dispatch. `buffers` fill bindings 1.. in order; `params` is binding 0.
    pub fn dispatch<P: bytemuck::Pod>(
        &mut self,
        kernel: &Arc<Kernel>,
        params: &P,
        buffers: &[&wgpu::Buffer],
        groups: [u32; 3],
    ) -> Result<()> {
        let bytes = bytemuck::bytes_of(params);
        assert!(
            bytes.len() <= PARAM_STRIDE,
            "{}: parameter struct too large",
            kernel.name
        );
        let start = self.params.len();
        self.params.extend_from_slice(bytes);
        self.params.resize(start + PARAM_STRIDE, 0);
        if !self.build {
            return Ok(());
        }
        assert_eq!(
            buffers.len() + 1,
            kernel.bindings.len(),
            "{}: binding count",
            kernel.name
        );
        debug_assert_eq!(kernel.bindings[0], BindKind::Uniform);
        let max = self.gpu.limits.max_compute_workgroups_per_dimension;
        if groups.iter().any(|&g| g > max) {
            return Err(Error::GpuLimit {
                what: format!("{} dispatch of {:?} workgroups", kernel.name, groups),
                needed: *groups.iter().max().unwrap() as u64,
                limit: max as u64,
                limit_name: "max_compute_workgroups_per_dimension",
            });
        }
        self.pending.push(Pending {
            kernel: kernel.clone(),
            buffers: buffers.iter().map(|b| (*b).clone()).collect(),
            groups,
        });
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.params.len() / PARAM_STRIDE
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    pub fn into_params(self) -> Vec<u8> {
        self.params
    }

    pub fn finish(self) -> Program {
        let device = &self.gpu.device;
        let params = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("program params"),
            size: self.params.len().max(PARAM_STRIDE) as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if !self.params.is_empty() {
            self.gpu.queue.write_buffer(&params, 0, &self.params);
        }
        let dispatches = self
            .pending
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let mut entries = vec![wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &params,
                        offset: (i * PARAM_STRIDE) as u64,
                        size: wgpu::BufferSize::new(PARAM_STRIDE as u64),
                    }),
                }];
                for (j, b) in p.buffers.iter().enumerate() {
                    entries.push(wgpu::BindGroupEntry {
                        binding: j as u32 + 1,
                        resource: b.as_entire_binding(),
                    });
                }
                let bg = device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some(&p.kernel.name),
                    layout: &p.kernel.layout,
                    entries: &entries,
                });
                (p.kernel, bg, p.groups)
            })
            .collect();
        Program {
            params,
            param_bytes: self.params.len(),
            dispatches,
        }
    }
}

impl Program {
    pub fn dispatch_count(&self) -> usize {
        self.dispatches.len()
    }

    /// Records every dispatch into one compute pass.
    pub fn encode(&self, pass: &mut wgpu::ComputePass<'_>) {
        for (k, bg, g) in &self.dispatches {
            pass.set_pipeline(&k.pipeline);
            pass.set_bind_group(0, bg, &[]);
            pass.dispatch_workgroups(g[0], g[1], g[2]);
        }
    }

    /// Encodes and submits the program alone.
    pub fn run(&self, gpu: &Gpu) {
        gpu.queue.submit([self.commands(gpu)]);
    }

    /// The program as a command buffer (one compute pass), encoded now and submitted later:
    /// decode encodes step N + 1 on the CPU while the GPU runs step N.
    pub fn commands(&self, gpu: &Gpu) -> wgpu::CommandBuffer {
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            self.encode(&mut pass);
        }
        enc.finish()
    }

    /// Runs the program once with a GPU timestamp after every dispatch and returns, per
    /// dispatch, the kernel name with its grid (so one kernel's shapes are told apart) and the
    /// nanoseconds since the previous timestamp (the kernel plus the barrier before it). None when the adapter lacks timestamps inside passes.
    pub async fn profile(&self, gpu: &Gpu) -> Result<Option<Vec<(String, f64)>>> {
        if !gpu
            .features
            .contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES)
            || self.dispatches.is_empty()
        {
            return Ok(None);
        }
        let n = self.dispatches.len() as u32 + 1;
        let qs = gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("profile"),
            ty: wgpu::QueryType::Timestamp,
            count: n,
        });
        let resolve = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profile resolve"),
            size: n as u64 * 8,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.write_timestamp(&qs, 0);
            for (i, (k, bg, g)) in self.dispatches.iter().enumerate() {
                pass.set_pipeline(&k.pipeline);
                pass.set_bind_group(0, bg, &[]);
                pass.dispatch_workgroups(g[0], g[1], g[2]);
                pass.write_timestamp(&qs, i as u32 + 1);
            }
        }
        enc.resolve_query_set(&qs, 0..n, &resolve, 0);
        gpu.queue.submit([enc.finish()]);
        let bytes = gpu.read_bytes(&resolve, 0, n as u64 * 8).await?;
        let ts: &[u64] = bytemuck::cast_slice(&bytes);
        let period = gpu.queue.get_timestamp_period() as f64;
        Ok(Some(
            self.dispatches
                .iter()
                .enumerate()
                .map(|(i, (k, _, g))| {
                    (
                        format!("{} grid {}x{}x{}", k.name, g[0], g[1], g[2]),
                        ts[i + 1].saturating_sub(ts[i]) as f64 * period,
                    )
                })
                .collect(),
        ))
    }

    /// Replaces the parameter bytes (same structure, new values).
    pub fn update_params(&self, gpu: &Gpu, bytes: &[u8]) {
        assert_eq!(bytes.len(), self.param_bytes, "program structure changed");
        if !bytes.is_empty() {
            gpu.queue.write_buffer(&self.params, 0, bytes);
        }
    }
}
