//! The Python interpreter for tests that drive a Python tool against the server.

use std::process::Command;

/// `$FLAMINGO_PYTHON`, else `python3`, if it can import `module`. Without one: `None` after
/// reporting `test` as skipped, or a panic under CI (`CI` set), where the tool must be there.
pub fn python_with(module: &str, test: &str, requirements: &str) -> Option<String> {
    let candidates: Vec<String> = std::env::var("FLAMINGO_PYTHON").ok().into_iter().chain(["python3".to_string()]).collect();
    let found = candidates
        .into_iter()
        .find(|p| Command::new(p).args(["-c", &format!("import {module}")]).output().is_ok_and(|o| o.status.success()));
    if found.is_none() {
        let msg = format!("no Python with `{module}`: set FLAMINGO_PYTHON (see {requirements})");
        if std::env::var_os("CI").is_some() {
            panic!("{msg}");
        }
        eprintln!("SKIPPED {test}: {msg}");
    }
    found
}
