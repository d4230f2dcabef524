//! A kernel: one WGSL entry point compiled with a set of defines, with the
//! pipeline and bind-group layout it owns.

use super::Gpu;
use crate::error::{Error, Result};

/// What sits at a binding slot. Binding 0 is always the kernel's uniform parameter struct.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindKind {
    Uniform,
    Read,
    ReadWrite,
}

pub struct Kernel {
    pub name: String,
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
    pub bindings: Vec<BindKind>,
}

/// A tiny preprocessor: `#ifdef NAME`, `#ifndef NAME`, `#else`, `#endif`
/// (nestable), and `#define NAME VALUE` lines that replace the identifier `NAME`
/// in the lines that follow. `defines` are `NAME` or `NAME=VALUE`.
pub fn preprocess(source: &str, defines: &[&str]) -> String {
    let mut values: Vec<(String, String)> = Vec::new();
    let mut set: Vec<String> = Vec::new();
    for d in defines {
        match d.split_once('=') {
            Some((k, v)) => {
                set.push(k.to_string());
                values.push((k.to_string(), v.to_string()));
            }
            None => set.push(d.to_string()),
        }
    }
    let mut out = String::with_capacity(source.len());
    let mut stack: Vec<(bool, bool)> = Vec::new(); // (parent active, this branch active)
    let active = |stack: &Vec<(bool, bool)>| stack.iter().all(|s| s.1);
    for line in source.lines() {
        let t = line.trim_start();
        if let Some(name) = t.strip_prefix("#ifdef ") {
            let on = set.iter().any(|s| s == name.trim());
            stack.push((active(&stack), on));
            out.push('\n');
            continue;
        }
        if let Some(name) = t.strip_prefix("#ifndef ") {
            let on = !set.iter().any(|s| s == name.trim());
            stack.push((active(&stack), on));
            out.push('\n');
            continue;
        }
        if t.starts_with("#else") {
            if let Some(top) = stack.last_mut() {
                top.1 = !top.1;
            }
            out.push('\n');
            continue;
        }
        if t.starts_with("#endif") {
            stack.pop();
            out.push('\n');
            continue;
        }
        if !active(&stack) {
            out.push('\n');
            continue;
        }
        if let Some(rest) = t.strip_prefix("#define ") {
            let mut it = rest.splitn(2, ' ');
            let k = it.next().unwrap_or("").trim().to_string();
            let v = it.next().unwrap_or("").trim().to_string();
            if !values.iter().any(|(n, _)| *n == k) {
                values.push((k, v));
            }
            out.push('\n');
            continue;
        }
        let mut l = line.to_string();
        for (k, v) in &values {
            l = replace_ident(&l, k, v);
        }
        out.push_str(&l);
        out.push('\n');
    }
    out
}

fn replace_ident(line: &str, ident: &str, value: &str) -> String {
    if !line.contains(ident) {
        return line.to_string();
    }
    let bytes = line.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    let is_id = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    while i < bytes.len() {
        if line[i..].starts_with(ident)
            && (i == 0 || !is_id(bytes[i - 1]))
            && (i + ident.len() >= bytes.len() || !is_id(bytes[i + ident.len()]))
        {
            out.push_str(value);
            i += ident.len();
        } else {
            out.push(bytes[i] as char);
            i += 1;
        }
    }
    out
}

impl Kernel {
    pub fn new(
        gpu: &Gpu,
        file: &str,
        source: &str,
        entry: &str,
        defines: &[&str],
        bindings: &[BindKind],
    ) -> Result<Kernel> {
        let mut defs: Vec<&str> = defines.to_vec();
        // PACKED_F16 asks for f16 weights read as packed u32 even where shader-f16 exists.
        if gpu.shader_f16 && !defines.contains(&"PACKED_F16") {
            defs.push("SHADER_F16");
        }
        let code = preprocess(source, &defs);
        let code = if defs.contains(&"SHADER_F16") && code.contains("f16") {
            format!("enable f16;\n{code}")
        } else {
            code
        };
        // COOP: the cooperative-matrix (tensor core) variants, native only.
        let code = if defs.contains(&"COOP") {
            format!("enable wgpu_cooperative_matrix;\n{code}")
        } else {
            code
        };
        let name = format!("{file}:{entry}[{}]", defines.join(","));
        let device = &gpu.device;
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&name),
            source: wgpu::ShaderSource::Wgsl(code.into()),
        });
        let entries: Vec<wgpu::BindGroupLayoutEntry> = bindings
            .iter()
            .enumerate()
            .map(|(i, k)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: match k {
                    BindKind::Uniform => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    BindKind::Read => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage { read_only: true },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    BindKind::ReadWrite => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage { read_only: false },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                },
                count: None,
            })
            .collect();
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(&name),
            entries: &entries,
        });
        let pl = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(&name),
            bind_group_layouts: &[Some(&layout)],
            ..Default::default()
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&name),
            layout: Some(&pl),
            module: &module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        });
        gpu.check_errors()
            .map_err(|e| Error::Gpu(format!("compiling {name}: {e}")))?;
        Ok(Kernel {
            name,
            pipeline,
            layout,
            bindings: bindings.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocessor_branches_and_defines() {
        let src =
            "#define WG 64\n#ifdef A\na WG\n#else\nnot_a\n#endif\n#ifndef B\nnob WGX\n#endif\n";
        let out = preprocess(src, &["A"]);
        assert!(out.contains("a 64"));
        assert!(!out.contains("not_a"));
        assert!(out.contains("nob WGX"));
        let out = preprocess(src, &["B", "WG=8"]);
        assert!(out.contains("not_a"));
        assert!(!out.contains("nob"));
        let out = preprocess("#define WG 64\nx WG\n", &["WG=8"]);
        assert!(out.contains("x 8"));
    }
}
