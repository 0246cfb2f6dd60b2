//! The last discovered set on disk, so a restarted agent starts from it. Small JSON, replaced
//! atomically; a missing file is normal, a bad one is ignored with a warning (never fatal).

use std::{
    collections::BTreeSet,
    fs,
    io::Write as _,
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

pub const FILE_NAME: &str = "discovered.json";
const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    /// Unix seconds of the write, for people reading the file.
    saved_at: u64,
    backends: Vec<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a kha discovery state file")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} has version {found}, this kha reads version {VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// The persisted set, or empty: a missing file silently, an unreadable or corrupt one with a
/// warning.
pub fn load_or_warn(dir: &Path) -> BTreeSet<SocketAddr> {
    match load(dir) {
        Ok(Some(set)) => {
            log::info!("discovery: {} backends from the last run ({})", set.len(), path(dir).display());
            set
        }
        Ok(None) => BTreeSet::new(),
        Err(e) => {
            log::warn!("discovery: ignoring the state file: {}", super::chain(&e));
            BTreeSet::new()
        }
    }
}

pub fn load(dir: &Path) -> Result<Option<BTreeSet<SocketAddr>>, StateError> {
    let path = path(dir);
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateError::Read { path, source }),
    };
    let file: StateFile =
        serde_json::from_slice(&text).map_err(|source| StateError::Parse { path: path.clone(), source })?;
    if file.version != VERSION {
        return Err(StateError::Version { path, found: file.version });
    }
    Ok(Some(file.backends.into_iter().map(|b| SocketAddr::new(b.ip().to_canonical(), b.port())).collect()))
}

/// Replaces the state file: a temporary file beside it, written and synced, renamed over it,
/// and the directory synced, so a crash leaves the old file or the new one, never a torn one.
pub fn save(dir: &Path, set: &BTreeSet<SocketAddr>) -> Result<(), StateError> {
    let path = path(dir);
    let io = |source| StateError::Write { path: path.clone(), source };
    fs::create_dir_all(dir).map_err(io)?;
    let saved_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let file = StateFile { version: VERSION, saved_at, backends: set.iter().copied().collect() };
    let mut text = serde_json::to_vec_pretty(&file).expect("a state file serializes");
    text.push(b'\n');
    let written = (|| {
        // fs::write's mode (0666 less the umask), not tempfile's 0600.
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{FILE_NAME}."))
            .permissions(fs::Permissions::from_mode(0o666))
            .tempfile_in(dir)?;
        tmp.write_all(&text)?;
        tmp.as_file().sync_all()?;
        tmp.persist(&path)?;
        fs::File::open(dir)?.sync_all()
    })();
    written.map_err(io)
}

/// [`save`] on a blocking thread: two fsyncs can take seconds on a busy disk, and the
/// watcher that calls this shares the runtime's thread with the probes and the endpoints.
pub async fn save_off_thread(dir: PathBuf, set: BTreeSet<SocketAddr>) -> Result<(), StateError> {
    let path = path(&dir);
    tokio::task::spawn_blocking(move || save(&dir, &set)).await.unwrap_or_else(|e| {
        Err(StateError::Write {
            path,
            source: std::io::Error::other(format!("the writer thread failed: {e}")),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kha-state-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn set(v: &[&str]) -> BTreeSet<SocketAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn round_trip_in_a_new_directory() {
        let d = dir("round-trip").join("nested");
        assert_eq!(load(&d).unwrap(), None, "no file yet");
        let s = set(&["192.0.2.11:6443", "[2001:db8::12]:6443"]);
        save(&d, &s).unwrap();
        assert_eq!(load(&d).unwrap(), Some(s.clone()));
        // Replaced whole; no temporary file left behind.
        save(&d, &set(&["192.0.2.13:6443"])).unwrap();
        assert_eq!(load_or_warn(&d), set(&["192.0.2.13:6443"]));
        let names: Vec<_> = fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from(FILE_NAME)]);
        let _ = fs::remove_dir_all(d.parent().unwrap());
    }

    #[tokio::test]
    async fn saving_off_the_runtime_thread_writes_the_same_file() {
        let d = dir("off-thread");
        let s = set(&["192.0.2.11:6443"]);
        save_off_thread(d.clone(), s.clone()).await.unwrap();
        assert_eq!(load(&d).unwrap(), Some(s));
        // A file where the directory should be: the error names the state file.
        let blocked = d.join("blocked");
        fs::write(&blocked, b"").unwrap();
        let e = save_off_thread(blocked.clone(), set(&["192.0.2.12:6443"])).await.unwrap_err();
        assert!(matches!(&e, StateError::Write { path: p, .. } if *p == path(&blocked)), "{e}");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn corrupt_files_are_ignored_not_fatal() {
        let d = dir("corrupt");
        fs::create_dir_all(&d).unwrap();
        for bad in [
            &b""[..],
            b"{",
            b"\xff\xfe",
            b"[]",
            br#"{"version":1,"saved_at":0,"backends":["master-1:6443"]}"#,
            br#"{"version":1,"saved_at":0,"backends":["192.0.2.11:6443"],"extra":1}"#,
        ] {
            fs::write(path(&d), bad).unwrap();
            assert!(matches!(load(&d), Err(StateError::Parse { .. })), "{:?}", String::from_utf8_lossy(bad));
            assert!(load_or_warn(&d).is_empty());
        }
        fs::write(path(&d), br#"{"version":9,"saved_at":0,"backends":[]}"#).unwrap();
        assert!(matches!(load(&d), Err(StateError::Version { found: 9, .. })));
        // A directory where the file should be: unreadable, ignored.
        fs::remove_file(path(&d)).unwrap();
        fs::create_dir(path(&d)).unwrap();
        assert!(matches!(load(&d), Err(StateError::Read { .. })));
        assert!(load_or_warn(&d).is_empty());
        let _ = fs::remove_dir_all(&d);
    }
}
