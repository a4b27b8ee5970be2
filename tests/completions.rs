//! `apiary completions SHELL` prints a script the shell accepts, naming the subcommands, and
//! `apiary --version` names the schema version this binary expects.

use std::process::Command;

const SUBCOMMANDS: [&str; 13] = [
    "migrate",
    "api",
    "worker",
    "enqueue",
    "status",
    "bench",
    "job",
    "dead",
    "cancel",
    "queue",
    "schedule",
    "doctor",
    "completions",
];

fn apiary(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_apiary"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run apiary")
}

#[test]
fn each_shell_gets_a_script_naming_every_subcommand() {
    for shell in ["bash", "zsh", "fish"] {
        let out = apiary(&["completions", shell]);
        assert!(
            out.status.success(),
            "{shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.len() > 1000, "{shell}: a real script:\n{script}");
        for sub in SUBCOMMANDS {
            assert!(script.contains(sub), "{shell}: no {sub} in\n{script}");
        }
        // The nested ones too, and the flags.
        assert!(script.contains("replay"), "{shell}");
        assert!(script.contains("database-url"), "{shell}");
    }
}

#[test]
fn bash_accepts_the_bash_script() {
    let out = apiary(&["completions", "bash"]);
    assert!(out.status.success());
    let path = std::env::temp_dir().join(format!("apiary-completion-{}.bash", std::process::id()));
    std::fs::write(&path, &out.stdout).expect("write the script");
    let check = Command::new("bash")
        .arg("-n")
        .arg(&path)
        .output()
        .expect("bash");
    let _ = std::fs::remove_file(&path);
    assert!(
        check.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    // Sourced, it registers the completion function for `apiary`.
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(script.contains("complete -F _apiary"), "{script}");
}

#[test]
fn an_unknown_shell_is_refused() {
    let out = apiary(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tcsh"));
}

#[test]
fn version_names_the_crate_and_the_newest_migration() {
    let newest = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .expect("migrations/")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.ends_with(".sql")
                .then(|| name.split('_').next().and_then(|n| n.parse::<i64>().ok()))
                .flatten()
        })
        .max()
        .expect("at least one migration");
    let out = apiary(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("apiary {} (schema {newest})\n", env!("CARGO_PKG_VERSION"))
    );
}
