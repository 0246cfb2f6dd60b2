//! Everything both sides of kha must agree on: map names, capacities, the `#[repr(C)]` key and
//! value layouts, and the pure helpers the kernel runs (so the host tests the same code).
//!
//! Layout rules: explicit padding, no `bool`/enum/`Option`, byte order in the field name
//! (`_be` = network order), and a compile-time size assert per type. Pinned maps outlive the
//! agent that created them, so changing a layout means bumping the map's version in
//! `layout::LAYOUTS`; the agent then migrates the pinned map (see `layout`).
#![no_std]

// The host-side helpers (feature `user`) need std; the kernel build never sees them.
#[cfg(feature = "user")]
extern crate std;

pub mod addr;
#[cfg(feature = "user")]
pub mod cgroup;
pub mod client;
#[cfg(feature = "user")]
pub mod errno;
pub mod iter;
pub mod layout;
pub mod maps;
pub mod select;
#[cfg(feature = "user")]
pub mod sockaddr;
pub mod trace;

pub use addr::*;
pub use client::*;
pub use iter::*;
pub use layout::*;
pub use maps::*;
#[cfg(feature = "user")]
pub use sockaddr::*;
pub use trace::*;
