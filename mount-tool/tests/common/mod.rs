//! Helpers shared by the command-line and mount tests: run `exofs`, read what it printed.

use std::process::{Command, Output};

/// Runs the `exofs` binary under test with `args`.
pub fn exofs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_exofs"))
        .args(args)
        .output()
        .expect("run exofs")
}

/// Standard output then standard error, as text.
pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}
