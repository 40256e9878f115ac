//! Lays out the code a serving Stevedore runs together (`deploy/stevedore.order`, written by
//! `bench/orderfile.py`), so that it is a few MiB of resident code instead of nearly all of
//! the text: the kernel maps code 64 KiB at a time around each page touched.
//!
//! Only where the linker is rust-lld, as rustc (1.90+) uses by default on
//! x86_64-unknown-linux-gnu: other linkers do not take `--symbol-ordering-file`, so a
//! configured linker or any link flag in RUSTFLAGS leaves the order out. A line the
//! build has no symbol for (another toolchain, a renamed function, an updated crate) is
//! skipped, never an error: the order only moves code.

use std::env;
use std::path::Path;

fn main() {
    const ORDER: &str = "deploy/stevedore.order";
    println!("cargo:rerun-if-changed={ORDER}");
    println!("cargo:rerun-if-env-changed=STEVEDORE_NO_ORDER_FILE");
    let var = |k: &str| env::var(k).unwrap_or_default();
    let default_lld = var("TARGET") == "x86_64-unknown-linux-gnu"
        && var("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_empty()
        && !var("CARGO_ENCODED_RUSTFLAGS").contains("link")
        && rustc_minor().is_some_and(|m| m >= 90);
    let path = Path::new(&var("CARGO_MANIFEST_DIR")).join(ORDER);
    if default_lld && path.is_file() && env::var_os("STEVEDORE_NO_ORDER_FILE").is_none() {
        // The linker reads a copy in OUT_DIR, which lives as long as this build's output:
        // cargo reuses that output for a checkout elsewhere that shares the target directory
        // (the package's path is not in its fingerprint), and a path into the other checkout
        // would fail the link once that checkout is gone.
        let copy = Path::new(&var("OUT_DIR")).join("stevedore.order");
        if std::fs::copy(&path, &copy).is_ok() {
            println!("cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}", copy.display());
            println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
        }
    }
}

/// The minor version of the rustc that builds the crate (`rustc 1.95.0 (...)` → 95).
fn rustc_minor() -> Option<u32> {
    let rustc = env::var("RUSTC").ok()?;
    let out = std::process::Command::new(rustc).arg("--version").output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let version = text.split_whitespace().nth(1)?;
    let mut parts = version.split('.');
    (parts.next()? == "1").then_some(())?;
    parts.next()?.parse().ok()
}
