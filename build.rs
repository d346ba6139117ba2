//! Link options for the `weir` binary that make less of it resident: on a gateway, memory is
//! counted in resident pages, and most of this process's are its own code.
//!
//! - `-z pack-relative-relocs`: the dynamic loader rewrites every pointer in the binary's
//!   data at start (it is position-independent), reading one 24-byte record per pointer,
//!   5 MB in all. Packed (RELR), the same fits in a few kilobytes. It needs glibc 2.36 or
//!   later where the binary runs, so it is used only when building for this very machine
//!   and its glibc is new enough.
//! - `-z keep-text-section-prefix` (x86_64, whose default linker is rust-lld): keeps code
//!   the compilers mark as start-up or cold (`.text.startup`, `.text.unlikely`) apart from
//!   the rest, instead of scattered through it. Start-up code runs once, yet every page it
//!   touches stays resident, and the kernel maps 64 KB around each touched page.

use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    let host = std::env::var("HOST").unwrap_or_default();
    if !target.ends_with("-linux-gnu") {
        return;
    }
    if target == host && glibc_at_least(2, 36) {
        println!("cargo::rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    if target.starts_with("x86_64-") {
        println!("cargo::rustc-link-arg-bins=-Wl,-z,keep-text-section-prefix");
    }
}

/// Whether this machine's glibc is at least `major.minor`, as `ldd --version` says.
fn glibc_at_least(major: u32, minor: u32) -> bool {
    let Ok(output) = Command::new("ldd").arg("--version").output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let Some(version) = text
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().last())
    else {
        return false;
    };
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(found_major), Some(found_minor)) => (found_major, found_minor) >= (major, minor),
        _ => false,
    }
}
