//! The machine a run was made on, for the report.

use std::{fs, process::Command};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub memory_gib: f64,
    pub os: String,
    pub nginx: String,
    pub haproxy: String,
    pub kha_commit: String,
    pub date: String,
}

fn output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&text).lines().next().unwrap_or("").trim().to_owned()
        })
        .unwrap_or_default()
}

pub fn describe() -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: f64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0.0);
    let os = fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_owned()))
        .unwrap_or_default();
    let root = crate::cmd::workspace_root();
    let root = root.to_string_lossy();
    let mut commit = output("git", &["-C", &root, "rev-parse", "--short", "HEAD"]);
    if commit.is_empty() {
        commit = "(not a git checkout)".into();
    } else if !output("git", &["-C", &root, "status", "--porcelain"]).is_empty() {
        commit.push_str(" (with uncommitted changes)");
    }
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
        memory_gib: mem_kib / (1024.0 * 1024.0),
        os,
        nginx: output("nginx", &["-v"]).trim_start_matches("nginx version: ").to_owned(),
        haproxy: output("haproxy", &["-v"])
            .replace(" version", "")
            .split(' ')
            .take(2)
            .collect::<Vec<_>>()
            .join(" "),
        kha_commit: commit,
        date: output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
    }
}

impl Machine {
    pub fn one_line(&self) -> String {
        format!(
            "{}, {} cores, {:.0} GiB, Linux {}, {}; {}, {}; kha {}",
            self.cpu,
            self.cores,
            self.memory_gib,
            self.kernel,
            self.os,
            self.nginx,
            self.haproxy,
            self.kha_commit
        )
    }
}
