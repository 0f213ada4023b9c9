//! Helpers shared by libfs's tests.
#![allow(dead_code)] // each test crate uses its own part of this module

mod skip;
pub use skip::skip;
