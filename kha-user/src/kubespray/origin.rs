//! Where a value was set, for the errors that name it: below both the errors and the YAML
//! reader, so neither imports the other back.

use std::{
    fmt,
    path::{Path, PathBuf},
};

/// Where a value was set: a place in a file, or a command-line flag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    File { path: PathBuf, line: u64, column: u64 },
    Flag(String),
}

impl Origin {
    pub(crate) fn at(path: &Path, span: &serde_saphyr::Location) -> Self {
        Origin::File { path: path.to_owned(), line: span.line(), column: span.column() }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, line, column } => write!(f, "{}:{line}:{column}", path.display()),
            Origin::Flag(flag) => f.write_str(flag),
        }
    }
}
