//! `--check-config`: it refuses what a start would refuse (with the reason), accepts what a
//! start would accept, and reads on/off environment variables the way operators write them.

use std::process::{Command, Output};

use crate::common::temp_dir;

fn check_config(args: &[&str], env: &[(&str, &str)]) -> Output {
    let data_dir = temp_dir("check-config");
    let output = Command::new(env!("CARGO_BIN_EXE_gavel-broker"))
        .arg("--check-config")
        .arg("--data-dir")
        .arg(&data_dir)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run gavel-broker --check-config");
    let _ = std::fs::remove_dir_all(&data_dir);
    output
}

#[test]
fn check_config_refuses_what_a_start_would_refuse() {
    let cases: &[(&[&str], &str)] = &[
        (&["--redis-url", "notaurl"], "--redis-url"),
        (
            &["--jwt-public-key", "/nonexistent/key.pem"],
            "/nonexistent/key.pem",
        ),
        (
            &[
                "--tls-cert",
                "/nonexistent/cert.pem",
                "--tls-key",
                "/nonexistent/key.pem",
            ],
            "/nonexistent/cert.pem",
        ),
        (
            &["--backend-ca", "/nonexistent/ca.pem"],
            "/nonexistent/ca.pem",
        ),
        (
            &["--conversation-auth-url", "ftp://example"],
            "--conversation-auth-url",
        ),
    ];
    for (args, reason) in cases {
        let output = check_config(args, &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(reason),
            "{args:?} should name {reason}: {stderr}"
        );
        assert!(
            output.stdout.is_empty(),
            "{args:?}: nothing printed as if valid"
        );
    }
}

#[test]
fn check_config_accepts_a_configuration_that_starts_and_prints_it() {
    let output = check_config(&["--jwt-secret", "a-secret-of-enough-length-0123"], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("worker threads"), "{stdout}");
    assert!(
        !stdout.contains("a-secret-of-enough-length-0123"),
        "secrets are redacted"
    );
}

#[test]
fn a_log_filter_that_does_not_parse_stops_the_start() {
    let output = check_config(&["--log", "gavel_broker=[[["], &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--log"));
}

#[test]
fn on_off_environment_variables_take_the_usual_spellings() {
    for (value, on) in [
        ("1", true),
        ("yes", true),
        ("on", true),
        ("0", false),
        ("off", false),
    ] {
        let output = check_config(&[], &[("GAVEL_ALLOW_ANONYMOUS", value)]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "GAVEL_ALLOW_ANONYMOUS={value}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains(&format!("allow_anonymous: {on}")),
            "GAVEL_ALLOW_ANONYMOUS={value}: {stdout}"
        );
    }
}
