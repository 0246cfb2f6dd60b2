//! kha's probe and policy defaults, for the report's settings line.
//!
//! They are read from `kha run --help` of the binary under test, not from kha's library:
//! xtask must not depend on kha-user, whose build script needs the eBPF toolchain, and the
//! binary's own help is what the run actually used. Only this file knows the help's format.

use std::{collections::BTreeMap, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

/// The default of `flag` as `kha run --help` prints it, e.g. `2000` for `--probe-interval-ms`.
fn help_default(help: &str, flag: &str) -> Option<String> {
    let start = help.find(&format!("{flag} "))?;
    let rest = &help[start + flag.len()..];
    // Up to the next option line.
    let end = rest.find("\n      --").unwrap_or(rest.len());
    let block = &rest[..end];
    let d = block.find("[default: ")?;
    let v = &block[d + "[default: ".len()..];
    Some(v[..v.find(']')?].to_owned())
}

/// kha's probe and policy settings, as the binary under test has them by default.
pub(super) fn kha_settings(kha: &Path) -> Result<BTreeMap<String, String>> {
    let help = Command::new(kha)
        .args(["run", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .context("running kha run --help")?;
    if !help.contains("--ca-file") || !help.contains("--probe-interval-ms") {
        bail!("{} has no health checks (--ca-file, --probe-interval-ms): nothing to measure", kha.display());
    }
    let mut s = BTreeMap::new();
    for (flag, name, unit) in [
        ("--policy", "policy", ""),
        ("--probe-interval-ms", "probe interval", " ms (jittered)"),
        ("--probe-timeout-ms", "probe timeout", " ms"),
        ("--rise", "rise", ""),
        ("--fall", "fall", ""),
        ("--drain-time", "drain time", " s"),
        ("--all-down", "all down", ""),
        ("--health-path", "health path", ""),
    ] {
        s.insert(
            format!("kha {name}"),
            help_default(&help, flag).map_or("?".into(), |v| format!("{v}{unit}")),
        );
    }
    if help.contains("--readiness-interval-ms") {
        let v = help_default(&help, "--readiness-interval-ms")
            .map_or("the probe interval".into(), |v| format!("{v} ms"));
        s.insert("kha readiness interval".into(), v);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_defaults_are_read_per_flag() {
        let help = "      --probe-interval-ms <MS>\n          [default: 2000]\n\n      --rise <RISE>\n          Successful probes\n          \n          [default: 2]\n      --x\n";
        assert_eq!(help_default(help, "--probe-interval-ms").as_deref(), Some("2000"));
        assert_eq!(help_default(help, "--rise").as_deref(), Some("2"));
        assert_eq!(help_default(help, "--x"), None);
    }
}
