//! The lab's real control plane: kube-apiserver, kubectl, the client-go watcher `kha-watch`
//! and etcd, built from the Go modules pinned in `kha-lab/controlplane/` into
//! `target/controlplane/bin`. Built once per change of those modules: a stamp of their
//! sources skips the build (Go's own cache would make a rebuild quick, but linking
//! kube-apiserver still takes tens of seconds).

use std::{
    fs,
    hash::{Hash as _, Hasher as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// The binaries, for the lab (`KHA_CONTROLPLANE_BIN`) and the tests.
pub const BINARIES: [&str; 4] = ["kube-apiserver", "kubectl", "kha-watch", "etcd"];

/// What Kubernetes' own build (hack/lib/version.sh) stamps into its binaries, so that
/// `/version` and `kubectl version` name the release rather than `v0.0.0-master`.
const VERSION_PACKAGES: [&str; 2] = ["k8s.io/component-base/version", "k8s.io/client-go/pkg/version"];

pub fn bin_dir() -> PathBuf {
    cmd::target_dir().join("controlplane/bin")
}

fn source_dir() -> PathBuf {
    cmd::workspace_root().join("kha-lab/controlplane")
}

/// Builds what is missing or stale; returns the directory holding [`BINARIES`].
pub fn ensure() -> Result<PathBuf> {
    let out = bin_dir();
    let stamp_file = out.join(".stamp");
    let stamp = sources_stamp(&source_dir())?;
    let built = BINARIES.iter().all(|b| out.join(b).is_file());
    if built && fs::read_to_string(&stamp_file).ok().as_deref() == Some(stamp.as_str()) {
        return Ok(out);
    }
    let go = Command::new("go").arg("version").output();
    let Ok(go) = go.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()) else {
        bail!(
            "the lab's real control plane is built from Go modules and `go` is not on PATH: install Go 1.26 or newer (machines of this kind have it in /usr/local/go/bin; add that to PATH)"
        );
    };
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    super::step(
        &format!("building the real control plane (kube-apiserver, kubectl, kha-watch, etcd) with {go}"),
        "5-10 minutes the first time on 2 cores, under a minute once Go's caches hold it",
        || build(&out),
    )?;
    fs::write(&stamp_file, stamp).with_context(|| format!("writing {}", stamp_file.display()))?;
    Ok(out)
}

fn build(out: &Path) -> Result<()> {
    let kube = source_dir().join("kube");
    let version = go_output(&kube, &["list", "-m", "-f", "{{.Version}}", "k8s.io/kubernetes"])?;
    let ldflags = version_ldflags(&version)?;
    let out_arg = format!("{}/", out.display());
    let mut c = go(&kube);
    c.args(["build", "-ldflags", &ldflags, "-o", &out_arg]).args([
        "k8s.io/kubernetes/cmd/kube-apiserver",
        "k8s.io/kubernetes/cmd/kubectl",
        "./cmd/kha-watch",
    ]);
    cmd::status(c).context("building kube-apiserver, kubectl and kha-watch")?;
    let mut c = go(&source_dir().join("etcd"));
    c.args(["build", "-o"]).arg(out.join("etcd")).arg("go.etcd.io/etcd/server/v3");
    cmd::status(c).context("building etcd")
}

/// `-X` flags for the release `version` (e.g. `v1.37.2`).
fn version_ldflags(version: &str) -> Result<String> {
    let mut parts = version.trim_start_matches('v').split('.');
    let (Some(major), Some(minor)) = (parts.next(), parts.next()) else {
        bail!("k8s.io/kubernetes has version {version:?}, not vMAJOR.MINOR.PATCH");
    };
    Ok(VERSION_PACKAGES
        .iter()
        .map(|p| {
            format!("-X {p}.gitVersion={version} -X {p}.gitMajor={major} -X {p}.gitMinor={minor} -X {p}.gitTreeState=clean")
        })
        .collect::<Vec<_>>()
        .join(" "))
}

fn go(dir: &Path) -> Command {
    let mut c = Command::new("go");
    // Module mode from go.mod/go.sum only: a fresh clone has no vendor dir, and the VCS stamp
    // would need the repository's history.
    c.current_dir(dir).env("GOFLAGS", "-mod=readonly -buildvcs=false");
    c
}

fn go_output(dir: &Path, args: &[&str]) -> Result<String> {
    let mut c = go(dir);
    c.args(args);
    let out = c.output().with_context(|| format!("running go {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("go {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A digest of every file under `dir` (paths and contents), in a stable order.
fn sources_stamp(dir: &Path) -> Result<String> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() { todo.push(p) } else { files.push(p) }
        }
    }
    files.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in files {
        f.strip_prefix(dir).unwrap_or(&f).hash(&mut h);
        fs::read(&f).with_context(|| format!("reading {}", f.display()))?.hash(&mut h);
    }
    Ok(format!("{:016x}\n", h.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_flags_name_major_and_minor() {
        let f = version_ldflags("v1.37.2").unwrap();
        assert!(f.contains("-X k8s.io/component-base/version.gitVersion=v1.37.2"), "{f}");
        assert!(f.contains("k8s.io/client-go/pkg/version.gitMinor=37"), "{f}");
        assert!(version_ldflags("master").is_err());
    }
}
