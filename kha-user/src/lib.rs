//! The kha agent as a library: the binary (`main.rs`) is the CLI around it.
//!
//! Pure modules (`config`, `table`, `health`, `status`) are tested without root, and so are
//! the agent's decisions (`supervise`, behind a table and a terminator trait). `loader` and
//! `maps` are the only modules that touch the kernel.

pub mod config;
pub mod discovery;
pub mod errors;
pub mod health;
pub mod kubespray;
pub mod layout;
pub mod loader;
pub mod maps;
pub mod observe;
pub mod probe;
pub mod status;
pub mod supervise;
pub mod table;
pub mod top;
pub mod trace;
