//! Skipping a test that needs what this machine lacks (root, BPF, FUSE, loop devices,
//! O_DIRECT): one function for every crate's tests (kernel-ext and mount-tool include
//! this file by path).
//!
//! With `EXOFS_REQUIRE_PRIVILEGED=1` (CI sets it) a skip is a failure: a test that needs
//! root cannot pass by not running.

/// The environment variable that turns skips into failures.
pub const REQUIRE_PRIVILEGED: &str = "EXOFS_REQUIRE_PRIVILEGED";

/// Says loudly that `test` does not run, and why; panics instead when skips are refused.
pub fn skip(test: &str, why: &str) {
    let required =
        std::env::var(REQUIRE_PRIVILEGED).is_ok_and(|value| !value.is_empty() && value != "0");
    if required {
        panic!("{test} cannot run here ({why}), and {REQUIRE_PRIVILEGED} refuses skips");
    }
    eprintln!("SKIPPED {test}: {why}");
}
