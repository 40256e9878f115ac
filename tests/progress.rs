//! Long CLI work shows progress on a terminal and only plain lines otherwise: `stevedore
//! fsck` and `gc` run once on pipes and once under a pseudo-terminal (util-linux `script`).

mod common;

use std::process::Command;
use std::time::Duration;

use common::proc;

fn stevedore(args: &str) -> String {
    format!("{} {args}", env!("CARGO_BIN_EXE_stevedore"))
}

#[test]
fn a_spinner_on_a_terminal_plain_lines_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    std::fs::create_dir_all(&root).unwrap();
    for (cmd, summary) in [("fsck", "fsck: 0 blobs"), ("gc", "gc: 0 links")] {
        let args = format!("{cmd} --root {}", root.display());
        // Pipes: the summary line only, no escape sequence, no spinner.
        let mut plain = Command::new(env!("CARGO_BIN_EXE_stevedore"));
        plain.args(args.split(' ')).env("RUST_LOG", "warn");
        let out = proc::run_ok(cmd, plain, Duration::from_secs(60));
        assert!(out.stdout.starts_with(summary), "{cmd} on a pipe:\n{}", out.describe());
        let all = format!("{}{}", out.stdout, out.stderr);
        assert!(!all.contains('\u{1b}') && !all.contains(&format!("{cmd} [")), "{cmd} on a pipe drew progress:\n{all}");
        // A terminal: the spinner (prefix, elapsed time, count) is drawn, then cleared.
        let typescript = dir.path().join(format!("{cmd}.typescript"));
        let mut tty = Command::new(proc::tool("script"));
        tty.arg("-qec").arg(stevedore(&args)).arg(&typescript).env("RUST_LOG", "warn");
        proc::run_ok("script", tty, Duration::from_secs(60));
        let shown = String::from_utf8_lossy(&std::fs::read(&typescript).unwrap()).into_owned();
        assert!(shown.contains(&format!("{cmd} [00:00:0")), "{cmd} on a terminal drew no progress:\n{shown}");
        assert!(shown.contains("\u{1b}[2K"), "{cmd}: the progress line is not cleared:\n{shown}");
        assert!(shown.contains(summary), "{cmd}: no summary on a terminal:\n{shown}");
    }
}
