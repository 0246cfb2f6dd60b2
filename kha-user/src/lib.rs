//! The kha agent as a library: the binary (`main.rs`) is the CLI around it.
//!
//! Pure modules (`config`, `endpoints`, `sync`, `status`) are tested without root. `loader`
//! and `maps` are the only modules that touch the kernel.

pub mod config;
pub mod discovery;
pub mod endpoints;
pub mod health;
pub mod kubespray;
pub mod loader;
pub mod maps;
pub mod observe;
pub mod probe;
pub mod status;
pub mod sync;
