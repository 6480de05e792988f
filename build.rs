//! Records the git commit the binary is built from, for `--version`.
//!
//! `NAMESHIM_GIT_COMMIT` set at build time wins (for packagers building from
//! a tarball that know the commit). Otherwise `git rev-parse --short HEAD`
//! is asked, but only when the git work tree is this package itself: a
//! tarball unpacked inside some other repository must not claim that
//! repository's commit. Without either, the commit is "unknown".

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=NAMESHIM_GIT_COMMIT");
    let commit = std::env::var("NAMESHIM_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=NAMESHIM_GIT_COMMIT={}", commit.trim());
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    Some(text.trim().to_string()).filter(|t| !t.is_empty())
}

fn git_commit() -> Option<String> {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    let top = PathBuf::from(git(&[
        "-C",
        manifest_dir.to_str()?,
        "rev-parse",
        "--show-toplevel",
    ])?);
    if !same_dir(&top, &manifest_dir) {
        return None;
    }
    let at = |args: &[&str]| {
        let mut full = vec!["-C", manifest_dir.to_str()?];
        full.extend_from_slice(args);
        git(&full)
    };
    // Rebuild when HEAD moves: HEAD itself (checkout), the branch it names
    // (commit) and packed-refs (gc). Only existing paths are named, since
    // cargo reruns the build script on every build for a missing one; a
    // branch that lives in packed-refs only has no file yet, so its
    // directory is watched instead, where the next commit creates it.
    let git_path =
        |name: &str| at(&["rev-parse", "--git-path", name]).map(|p| manifest_dir.join(p));
    let mut watched: Vec<PathBuf> = ["HEAD", "packed-refs"]
        .into_iter()
        .filter_map(git_path)
        .collect();
    if let Some(branch) = at(&["symbolic-ref", "-q", "HEAD"]).and_then(|b| git_path(&b)) {
        if branch.exists() {
            watched.push(branch);
        } else {
            watched.extend(branch.parent().map(Path::to_path_buf));
        }
    }
    for path in watched.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    at(&["rev-parse", "--short", "HEAD"])
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
