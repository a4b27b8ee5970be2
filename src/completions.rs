//! `apiary completions SHELL`: a completion script for the shell, generated from the same
//! `clap` definition as the command line, so it always lists the current subcommands and flags.

use std::io::Write as _;

use anyhow::Context as _;
use clap::CommandFactory as _;

/// Writes the completion script for `shell` to stdout.
pub fn print(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let script = script(shell);
    let mut out = std::io::stdout().lock();
    match out.write_all(&script).and_then(|()| out.flush()) {
        // Piped into a reader that stopped early (`| head`): nothing more is wanted.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing the completion script"),
    }
}

/// The completion script for `shell`.
pub fn script(shell: clap_complete::Shell) -> Vec<u8> {
    let mut cmd = crate::cli::Cli::command();
    let mut buf = Vec::new();
    // Into memory, where writing cannot fail: clap_complete panics on a failed write, and
    // stdout may be a closed pipe.
    clap_complete::generate(shell, &mut cmd, "apiary", &mut buf);
    buf
}
