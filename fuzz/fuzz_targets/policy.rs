//! The policy file parser (`mount_tool::policy::parse`) on arbitrary text.
//!
//! Asserted: nothing panics; a refused file has at least one mistake, and every mistake
//! has a message and a line and column inside the text (columns count bytes, from 1, and
//! may point just past a line's last byte); an accepted policy keeps every promise of the
//! policy module, checked here independently: each subject has a grant, a cgroup is an
//! absolute path, every grant names absolute paths without `..`, valid program names and
//! limits in range.
#![no_main]

use exofs_abi::chain::{MAX_BATCH, MAX_HOPS};
use libfuzzer_sys::fuzz_target;
use mount_tool::policy::{self, Policy, Who};

fn valid_program(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-')
}

fn assert_sound(policy: &Policy, text: &str) {
    for subject in &policy.subjects {
        assert!(
            !subject.grants.is_empty(),
            "a subject without grants was accepted:\n{text}"
        );
        if let Who::Cgroup(path) = &subject.who {
            assert!(
                path.is_absolute(),
                "relative cgroup {path:?} accepted:\n{text}"
            );
        }
        for grant in &subject.grants {
            assert!(!grant.paths.is_empty(), "empty paths accepted:\n{text}");
            for path in &grant.paths {
                assert!(
                    path.starts_with('/') && !path.split('/').any(|part| part == ".."),
                    "path {path:?} accepted:\n{text}"
                );
            }
            assert!(
                !grant.programs.is_empty(),
                "empty programs accepted:\n{text}"
            );
            for program in &grant.programs {
                assert!(
                    valid_program(program),
                    "program {program:?} accepted:\n{text}"
                );
            }
            assert!(
                (1..=MAX_HOPS).contains(&grant.max_hops),
                "max_hops {} accepted",
                grant.max_hops
            );
            assert!(
                (1..=MAX_BATCH as u32).contains(&grant.max_batch),
                "max_batch {} accepted",
                grant.max_batch
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match policy::parse(&text) {
        Ok(policy) => assert_sound(&policy, &text),
        Err(mistakes) => {
            assert!(!mistakes.is_empty(), "refused without a mistake:\n{text}");
            let lines: Vec<&str> = text.split('\n').collect();
            for mistake in &mistakes {
                assert!(
                    !mistake.message.trim().is_empty(),
                    "a mistake without a message: {mistake:?}"
                );
                assert!(
                    (1..=lines.len()).contains(&mistake.line),
                    "{mistake:?}: line outside the text ({} lines)",
                    lines.len()
                );
                let line = lines[mistake.line - 1];
                assert!(
                    (1..=line.len() + 1).contains(&mistake.column),
                    "{mistake:?}: column outside line {:?}",
                    line
                );
            }
        }
    }
});
