//! What the sensor knows: key kinds, per-client counters in bounded memory, the connection
//! table, the rows views show, and the state saved across restarts. Imports nothing of the
//! sensor's above it.

pub mod aggregate;
pub mod clientmap;
#[cfg(test)]
mod compat;
pub mod conntable;
pub mod keys;
mod packed;
pub mod report;
pub mod shipped;
pub mod state;
