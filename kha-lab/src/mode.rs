//! Failure modes a master can be switched into at run time, and the control
//! file that carries them across processes.
//!
//! Protocol: the controller writes the mode name (`normal`, `readyz-500`,
//! `hang`) into the control file, replacing it atomically ([`replace_file`]:
//! write a temporary file, rename). `kha-lab master` re-reads the file on SIGHUP and also polls
//! it every [`POLL_INTERVAL`], so a lost signal only delays the change. Once a
//! mode is in effect the master writes its name to `<control-file>.applied`,
//! which lets a controller wait for the switch instead of sleeping. A missing
//! or empty control file means `normal`; an unreadable or unknown one leaves
//! the current mode in place (and is logged).

use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailureMode {
    #[default]
    Normal,
    /// `/readyz` answers 500 with kube-apiserver's failed-check body; the
    /// other endpoints keep working, as when only etcd is unreachable.
    Readyz500,
    /// Connections are accepted but never answered: no TLS handshake for new
    /// ones, no response to further requests on open ones.
    Hang,
    /// Every request gets a 200 whose body never ends: one byte every 200 ms,
    /// as a stuck stream would send. Size limits do not catch it; timeouts must.
    Endless,
}

impl FailureMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureMode::Normal => "normal",
            FailureMode::Readyz500 => "readyz-500",
            FailureMode::Hang => "hang",
            FailureMode::Endless => "endless",
        }
    }
}

impl fmt::Display for FailureMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown failure mode {0:?} (expected normal, readyz-500, hang or endless)")]
pub struct UnknownMode(pub String);

impl FromStr for FailureMode {
    type Err = UnknownMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "normal" | "" => Ok(FailureMode::Normal),
            "readyz-500" => Ok(FailureMode::Readyz500),
            "endless" => Ok(FailureMode::Endless),
            "hang" => Ok(FailureMode::Hang),
            other => Err(UnknownMode(other.to_owned())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("reading control file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("control file {}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: UnknownMode,
    },
}

/// The mode the control file asks for (`normal` when it does not exist).
pub fn read_control(path: &Path) -> Result<FailureMode, ControlError> {
    match fs::read_to_string(path) {
        Ok(text) => text.parse().map_err(|source| ControlError::Parse { path: path.to_owned(), source }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(FailureMode::Normal),
        Err(source) => Err(ControlError::Read { path: path.to_owned(), source }),
    }
}

/// Replaces `path` atomically with `contents` (a temporary file beside it, renamed over it),
/// so a concurrent reader never sees half of it: the control and applied files here, and
/// `kha-lab master --ready-file`. Made as `fs::write` makes a file (0666 less the umask),
/// not with tempfile's 0600, so a reader of another user still can.
pub fn replace_file(path: &Path, contents: &str) -> io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().permissions(fs::Permissions::from_mode(0o666)).tempfile_in(dir)?;
    tmp.write_all(contents.as_bytes())?;
    tmp.persist(path)?;
    Ok(())
}

fn replace_control(path: &Path, contents: &str) -> Result<(), ControlError> {
    replace_file(path, contents).map_err(|source| ControlError::Write { path: path.to_owned(), source })
}

pub fn write_control(path: &Path, mode: FailureMode) -> Result<(), ControlError> {
    replace_control(path, &format!("{mode}\n"))
}

pub fn applied_path(control: &Path) -> PathBuf {
    let mut p = control.as_os_str().to_owned();
    p.push(".applied");
    PathBuf::from(p)
}

/// Records that `mode` is in effect (see the module doc).
pub fn write_applied(control: &Path, mode: FailureMode) -> Result<(), ControlError> {
    replace_control(&applied_path(control), &format!("{mode}\n"))
}

/// The mode a master last reported as applied, if any.
pub fn read_applied(control: &Path) -> Option<FailureMode> {
    fs::read_to_string(applied_path(control)).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_round_trip_through_text() {
        for mode in [FailureMode::Normal, FailureMode::Readyz500, FailureMode::Hang, FailureMode::Endless] {
            assert_eq!(mode.to_string().parse::<FailureMode>(), Ok(mode));
        }
        assert_eq!(" hang\n".parse::<FailureMode>(), Ok(FailureMode::Hang));
        assert!("slow".parse::<FailureMode>().is_err());
    }

    #[test]
    fn control_and_applied_files() {
        let dir = std::env::temp_dir().join(format!("kha-lab-mode-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let control = dir.join("m1.control");
        assert_eq!(read_control(&control).unwrap(), FailureMode::Normal);
        write_control(&control, FailureMode::Readyz500).unwrap();
        assert_eq!(read_control(&control).unwrap(), FailureMode::Readyz500);
        assert_eq!(read_applied(&control), None);
        write_applied(&control, FailureMode::Hang).unwrap();
        assert_eq!(read_applied(&control), Some(FailureMode::Hang));
        fs::write(&control, "bogus").unwrap();
        assert!(matches!(read_control(&control), Err(ControlError::Parse { .. })));
        // Replaced whole, with the mode `fs::write` gives a new file, and nothing left beside.
        let plain = dir.join("plain");
        fs::write(&plain, "x").unwrap();
        replace_file(&control, "normal\n").unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode();
        assert_eq!(mode(&control), mode(&plain));
        let mut names: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["m1.control", "m1.control.applied", "plain"]);
        let _ = fs::remove_dir_all(&dir);
    }
}
