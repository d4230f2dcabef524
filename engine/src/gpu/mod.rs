//! The GPU layer: device setup, buffers, readback, the WGSL preprocessor,
//! kernels (pipeline + bind-group layout) and programs (recorded dispatch
//! lists). Model code above this layer never calls wgpu directly.

mod kernel;
mod program;

pub use kernel::{preprocess, BindKind, Kernel};
pub use program::{Program, Recorder};

use crate::error::{Error, Result};
use std::sync::{Arc, Mutex};

/// How to pick the adapter.
#[derive(Debug, Clone)]
pub struct GpuOptions {
    pub backends: wgpu::Backends,
    /// Index into the adapters of `backends` (native only), None = best.
    pub adapter_index: Option<usize>,
    /// Use `shader-f16` when the adapter has it (otherwise f16 weights are read as packed u32).
    pub allow_shader_f16: bool,
    /// Use cooperative matrices (tensor cores) for the prompt GEMM of f16 / q8 / q4 weights
    /// when the adapter has them (native only; wgpu's EXPERIMENTAL_COOPERATIVE_MATRIX).
    pub allow_coop_matrix: bool,
    /// The device is requested with the adapter's limits; these cap the two buffer-size limits
    /// of that request (e.g. WebGPU's defaults, 128 MiB and 256 MiB, to check that a model
    /// loads on any conforming adapter). None = what the adapter offers.
    pub max_storage_buffer_binding_size: Option<u64>,
    pub max_buffer_size: Option<u64>,
    /// Splits weight matrices into parts of at most this many bytes even where the device
    /// allows larger bindings (tests of the split path; activation buffers are not affected).
    pub weight_binding_cap: Option<u64>,
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            #[cfg(not(target_arch = "wasm32"))]
            backends: wgpu::Backends::PRIMARY,
            #[cfg(target_arch = "wasm32")]
            backends: wgpu::Backends::BROWSER_WEBGPU,
            adapter_index: None,
            allow_shader_f16: true,
            allow_coop_matrix: true,
            max_storage_buffer_binding_size: None,
            max_buffer_size: None,
            weight_binding_cap: None,
        }
    }
}

/// Parse a backend name as the CLI accepts it.
pub fn parse_backends(name: &str) -> Option<wgpu::Backends> {
    Some(match name {
        "auto" => GpuOptions::default().backends,
        "vulkan" => wgpu::Backends::VULKAN,
        "metal" => wgpu::Backends::METAL,
        "dx12" => wgpu::Backends::DX12,
        "gl" => wgpu::Backends::GL,
        "webgpu" => wgpu::Backends::BROWSER_WEBGPU,
        _ => return None,
    })
}

/// Whether the adapter has 16x16x16 cooperative matrices with f16 inputs and an f32
/// accumulator in subgroups of exactly 32 (what `gemm_coop` in matmul.wgsl is written for).
/// Off on the web (wgpu exposes them natively only), when `allow_coop_matrix` is false, and when
/// the environment variable `HYMBA_NO_COOP` is set.
fn coop_matrix_f16(adapter: &wgpu::Adapter, opts: &GpuOptions, shader_f16: bool) -> bool {
    #[cfg(target_arch = "wasm32")]
    {
        let _ = (adapter, opts, shader_f16);
        false
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        if !opts.allow_coop_matrix || !shader_f16 || std::env::var_os("HYMBA_NO_COOP").is_some() {
            return false;
        }
        let info = adapter.get_info();
        let needed = wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX | wgpu::Features::SUBGROUP;
        if !adapter.features().contains(needed)
            || info.subgroup_min_size != 32
            || info.subgroup_max_size != 32
        {
            return false;
        }
        adapter.cooperative_matrix_properties().iter().any(|c| {
            c.m_size == 16
                && c.n_size == 16
                && c.k_size == 16
                && c.ab_type == wgpu::CooperativeScalarType::F16
                && c.cr_type == wgpu::CooperativeScalarType::F32
        })
    }
}

/// A device, its queue and what it can do.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub features: wgpu::Features,
    pub limits: wgpu::Limits,
    /// Kernels read f16 weights as native `f16` (true) or as packed `u32` pairs.
    pub shader_f16: bool,
    /// 16x16x16 cooperative matrices with f16 inputs and f32 accumulators, in subgroups of 32:
    /// the prompt GEMM of f16 / q8 / q4 weights runs on them.
    pub coop_f16: bool,
    /// Largest buffer a weight-matrix part may use: the device's storage-binding and buffer
    /// limits, or `GpuOptions::weight_binding_cap` when smaller (see `kernels::Matrix`).
    pub weight_binding_limit: u64,
    errors: Arc<Mutex<Vec<String>>>,
}

/// One line per adapter: what `hymba info` prints.
pub fn describe_adapter(info: &wgpu::AdapterInfo) -> String {
    format!(
        "{} ({:?}, {:?}, driver {} {})",
        info.name, info.backend, info.device_type, info.driver, info.driver_info
    )
}

impl Gpu {
    /// Whether the adapter is a CPU implementation (lavapipe, SwiftShader, WARP).
    pub fn is_cpu(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// Lists the adapters of the given backends (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn adapters(backends: wgpu::Backends) -> Vec<wgpu::Adapter> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends,
            ..wgpu::InstanceDescriptor::new_without_display_handle_from_env()
        });
        pollster::block_on(instance.enumerate_adapters(backends))
    }

    pub async fn new(opts: &GpuOptions) -> Result<Gpu> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: opts.backends,
            ..wgpu::InstanceDescriptor::new_without_display_handle_from_env()
        });
        let adapter = match opts.adapter_index {
            #[cfg(not(target_arch = "wasm32"))]
            Some(i) => {
                let mut all = instance.enumerate_adapters(opts.backends).await;
                let n = all.len();
                if i >= n {
                    return Err(Error::NoAdapter(format!("adapter index {i} requested but only {n} adapter(s) were found for backends {:?}", opts.backends)));
                }
                all.swap_remove(i)
            }
            _ => instance
                .request_adapter(&wgpu::RequestAdapterOptions {
                    power_preference: wgpu::PowerPreference::HighPerformance,
                    force_fallback_adapter: false,
                    compatible_surface: None,
                    ..Default::default()
                })
                .await
                .map_err(|e| Error::NoAdapter(format!("{e} (backends {:?})", opts.backends)))?,
        };
        Self::from_adapter(adapter, opts).await
    }

    pub async fn from_adapter(adapter: wgpu::Adapter, opts: &GpuOptions) -> Result<Gpu> {
        let info = adapter.get_info();
        let available = adapter.features();
        let mut features = wgpu::Features::empty();
        let shader_f16 = opts.allow_shader_f16 && available.contains(wgpu::Features::SHADER_F16);
        if shader_f16 {
            features |= wgpu::Features::SHADER_F16;
        }
        if available.contains(wgpu::Features::TIMESTAMP_QUERY) {
            features |= wgpu::Features::TIMESTAMP_QUERY;
        }
        #[cfg(not(target_arch = "wasm32"))]
        if available.contains(wgpu::Features::SUBGROUP) {
            features |= wgpu::Features::SUBGROUP;
        }
        if available.contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES) {
            features |= wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
        }
        let coop_f16 = coop_matrix_f16(&adapter, opts, shader_f16);
        let mut experimental = wgpu::ExperimentalFeatures::disabled();
        if coop_f16 {
            features |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
            // SAFETY: wgpu asks callers of experimental features to accept that they may have
            // bugs. Only the prompt GEMMs and the prompt attention use it; the kernel tests, the
            // golden tests (small shapes) and tests/prompt_gemms.rs (a model at real widths)
            // check its results on every adapter that has it; HYMBA_NO_COOP=1 turns it off.
            experimental = unsafe { wgpu::ExperimentalFeatures::enabled() };
        }
        let mut limits = adapter.limits();
        if let Some(cap) = opts.max_storage_buffer_binding_size {
            limits.max_storage_buffer_binding_size =
                limits.max_storage_buffer_binding_size.min(cap) as _;
        }
        if let Some(cap) = opts.max_buffer_size {
            limits.max_buffer_size = limits.max_buffer_size.min(cap);
        }
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("hymba"),
                required_features: features,
                required_limits: limits.clone(),
                experimental_features: experimental,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Device(e.to_string()))?;
        // What the device really has (at least what was requested).
        let limits = device.limits();
        let weight_binding_limit = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size)
            .min(opts.weight_binding_cap.unwrap_or(u64::MAX));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            sink.lock().unwrap().push(e.to_string());
        }));
        Ok(Gpu {
            device,
            queue,
            info,
            features,
            limits,
            shader_f16,
            coop_f16,
            weight_binding_limit,
            errors,
        })
    }

    /// Returns the first uncaptured GPU error since the last check, as an `Err`.
    pub fn check_errors(&self) -> Result<()> {
        let mut e = self.errors.lock().unwrap();
        if e.is_empty() {
            Ok(())
        } else {
            let msg = e.join("; ");
            e.clear();
            Err(Error::Gpu(msg))
        }
    }

    /// The name of the limit behind [`Gpu::weight_binding_limit`], for messages.
    pub fn weight_limit_name(&self) -> &'static str {
        let binding = self.limits.max_storage_buffer_binding_size;
        if self.weight_binding_limit < binding.min(self.limits.max_buffer_size) {
            "weight_binding_cap"
        } else if self.limits.max_buffer_size < binding {
            "max_buffer_size"
        } else {
            "max_storage_buffer_binding_size"
        }
    }

    fn check_size(&self, what: &str, bytes: u64) -> Result<()> {
        if bytes > self.limits.max_storage_buffer_binding_size {
            return Err(Error::GpuLimit {
                what: what.to_string(),
                needed: bytes,
                limit: self.limits.max_storage_buffer_binding_size,
                limit_name: "max_storage_buffer_binding_size",
            });
        }
        if bytes > self.limits.max_buffer_size {
            return Err(Error::GpuLimit {
                what: what.to_string(),
                needed: bytes,
                limit: self.limits.max_buffer_size,
                limit_name: "max_buffer_size",
            });
        }
        Ok(())
    }

    /// A storage buffer of `bytes` (rounded up to 16), zero-initialised.
    pub fn buffer(&self, label: &str, bytes: u64) -> Result<wgpu::Buffer> {
        let size = bytes.max(16).div_ceil(16) * 16;
        self.check_size(label, size)?;
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        }))
    }

    /// A storage buffer holding `data`.
    pub fn upload<T: bytemuck::Pod>(&self, label: &str, data: &[T]) -> Result<wgpu::Buffer> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let buf = self.buffer(label, bytes.len() as u64)?;
        if !bytes.is_empty() {
            let padded = bytes.len().div_ceil(4) * 4;
            if padded == bytes.len() {
                self.queue.write_buffer(&buf, 0, bytes);
            } else {
                let mut v = bytes.to_vec();
                v.resize(padded, 0);
                self.queue.write_buffer(&buf, 0, &v);
            }
        }
        Ok(buf)
    }

    pub fn write<T: bytemuck::Pod>(&self, buf: &wgpu::Buffer, offset_bytes: u64, data: &[T]) {
        self.queue
            .write_buffer(buf, offset_bytes, bytemuck::cast_slice(data));
    }

    /// Copies `len_bytes` from `buf` at `offset` back to the CPU.
    pub async fn read_bytes(
        &self,
        buf: &wgpu::Buffer,
        offset: u64,
        len_bytes: u64,
    ) -> Result<Vec<u8>> {
        let len = len_bytes.div_ceil(4) * 4;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: len.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(buf, offset, &staging, 0, len);
        self.queue.submit([enc.finish()]);
        let out = self.map_read(&staging, len).await?;
        Ok(out[..len_bytes as usize].to_vec())
    }

    /// Maps a MAP_READ buffer and copies out its first `len` bytes.
    pub async fn map_read(&self, staging: &wgpu::Buffer, len: u64) -> Result<Vec<u8>> {
        self.map_read_after(staging, len, None).await
    }

    /// As `map_read`, waiting (natively) only for submission `after` and what came before it,
    /// not for work submitted since (None: everything submitted). On the web the browser
    /// resolves the mapping once the GPU gets past the copy into `staging`.
    pub async fn map_read_after(
        &self,
        staging: &wgpu::Buffer,
        len: u64,
        after: Option<wgpu::SubmissionIndex>,
    ) -> Result<Vec<u8>> {
        let slice = staging.slice(..len);
        let (tx, rx) = futures_channel::oneshot::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: after,
                timeout: None,
            })
            .map_err(|e| Error::Gpu(e.to_string()))?;
        #[cfg(target_arch = "wasm32")]
        let _ = after;
        let r = rx
            .await
            .map_err(|_| Error::Gpu("readback was dropped".into()))?;
        r.map_err(|e| Error::Gpu(format!("buffer map failed: {e}")))?;
        let data = slice
            .get_mapped_range()
            .map_err(|e| Error::Gpu(format!("buffer map failed: {e}")))?
            .to_vec();
        staging.unmap();
        self.check_errors()?;
        Ok(data)
    }

    pub async fn read_f32(
        &self,
        buf: &wgpu::Buffer,
        offset_elems: u64,
        n: u64,
    ) -> Result<Vec<f32>> {
        let b = self.read_bytes(buf, offset_elems * 4, n * 4).await?;
        Ok(bytemuck::cast_slice(&b).to_vec())
    }

    pub async fn read_u32(
        &self,
        buf: &wgpu::Buffer,
        offset_elems: u64,
        n: u64,
    ) -> Result<Vec<u32>> {
        let b = self.read_bytes(buf, offset_elems * 4, n * 4).await?;
        Ok(bytemuck::cast_slice(&b).to_vec())
    }

    /// Waits for all submitted work (native); a no-op future on the web.
    pub async fn finish(&self) -> Result<()> {
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(e.to_string()))?;
        #[cfg(target_arch = "wasm32")]
        {
            let (tx, rx) = futures_channel::oneshot::channel();
            self.queue.on_submitted_work_done(move || {
                let _ = tx.send(());
            });
            let _ = rx.await;
        }
        self.check_errors()
    }
}
