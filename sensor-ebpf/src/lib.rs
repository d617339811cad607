#![no_std]
// Intentionally empty: the kernel programs are the `sensor` binary target (src/main.rs).
