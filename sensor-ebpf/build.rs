use which::which;

/// Rebuild the kernel object when bpf-linker changes (it is the object's linker).
fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
