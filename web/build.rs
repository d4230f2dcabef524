//! Build script of hymba-web: embeds the golden cases of `$HYMBA_EXTRA_FIXTURES` (one sub-folder
//! per case with case.json, config.json, model.safetensors, expected.safetensors; or the folder
//! itself when it holds case.json) into the browser golden test (tests/golden.rs), which cannot
//! read files at run time. Without the variable the list is empty.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

const FILES: [&str; 4] = [
    "case.json",
    "config.json",
    "model.safetensors",
    "expected.safetensors",
];

fn cases(root: &Path) -> Vec<PathBuf> {
    if root.join("case.json").is_file() {
        return vec![root.to_path_buf()];
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap_or_else(|e| panic!("HYMBA_EXTRA_FIXTURES={}: {e}", root.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("case.json").is_file())
        .collect();
    v.sort();
    v
}

fn main() {
    println!("cargo:rerun-if-env-changed=HYMBA_EXTRA_FIXTURES");
    let mut out = String::from("const EXTRA_FIXTURES: &[Case] = &[\n");
    if let Some(extra) = std::env::var_os("HYMBA_EXTRA_FIXTURES").filter(|v| !v.is_empty()) {
        let root = PathBuf::from(extra);
        if !root.is_dir() {
            panic!(
                "HYMBA_EXTRA_FIXTURES={} is not a folder (it should hold one sub-folder per golden case)",
                root.display()
            );
        }
        println!("cargo:rerun-if-changed={}", root.display());
        for dir in cases(&root) {
            println!("cargo:rerun-if-changed={}", dir.display());
            for f in FILES {
                let p = dir.join(f);
                if !p.is_file() {
                    panic!("golden case {}: {f} is missing", dir.display());
                }
                println!("cargo:rerun-if-changed={}", p.display());
            }
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            let path = |f: &str| format!("{:?}", dir.join(f).canonicalize().unwrap());
            writeln!(
                out,
                "    Case {{ name: {name:?}, case: include_str!({}), config: include_str!({}), \
                 model: include_bytes!({}), expected: include_bytes!({}) }},",
                path("case.json"),
                path("config.json"),
                path("model.safetensors"),
                path("expected.safetensors"),
            )
            .unwrap();
        }
    }
    out.push_str("];\n");
    let dst = PathBuf::from(std::env::var_os("OUT_DIR").unwrap()).join("extra_fixtures.rs");
    std::fs::write(dst, out).unwrap();
}
