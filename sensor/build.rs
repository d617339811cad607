use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// The kernel crate's pinned nightly (see that file); a change rebuilds this script.
const EBPF_TOOLCHAIN_FILE: &str = include_str!("../sensor-ebpf/rust-toolchain.toml");

/// The `channel` of a rust-toolchain.toml.
fn toolchain_channel(file: &str) -> Option<&str> {
    file.lines().find_map(|l| {
        let value = l
            .trim()
            .strip_prefix("channel")?
            .trim_start()
            .strip_prefix('=')?;
        Some(value.trim().trim_matches('"'))
    })
}

fn main() -> anyhow::Result<()> {
    let toolchain = toolchain_channel(EBPF_TOOLCHAIN_FILE)
        .ok_or_else(|| anyhow!("no channel in sensor-ebpf/rust-toolchain.toml"))?;
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "sensor-ebpf")
        .ok_or_else(|| anyhow!("sensor-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("sensor-ebpf manifest has no parent"))?;
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(toolchain),
    )
}
