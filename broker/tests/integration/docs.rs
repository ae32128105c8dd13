//! The README documents every option that `--help` shows.

use std::process::Command;

#[test]
fn every_flag_in_help_is_in_the_readme() {
    let help = Command::new(env!("CARGO_BIN_EXE_gavel-broker"))
        .arg("--help")
        .output()
        .expect("run gavel-broker --help");
    let help = String::from_utf8(help.stdout).unwrap();
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let flags: Vec<&str> = help
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches([',', ')', '.', ':']))
        .filter(|w| !matches!(*w, "--help" | "--version"))
        .collect();
    assert!(
        flags.len() >= 10,
        "parsed too few flags from --help: {flags:?}"
    );
    for flag in flags {
        assert!(
            readme.contains(&format!("`{flag}`")),
            "README.md does not document {flag}"
        );
    }
    for env in help
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("GAVEL_"))
    {
        assert!(
            readme.contains(&format!("`{env}`")),
            "README.md does not document {env}"
        );
    }
}
