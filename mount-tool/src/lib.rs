//! The parts of the `exofs` command that are libraries: what the fuzz targets (fuzz/) and
//! the binary share. The binary (`main.rs`) holds everything else.
//!
//! - [`policy`]: the policy file, parsed and checked with line-numbered mistakes;
//! - [`request`]: the chain ioctls' requests, decoded and checked before the policy.

pub mod policy;
pub mod request;
