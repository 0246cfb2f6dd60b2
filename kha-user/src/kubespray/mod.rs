//! kubespray integration: read a cluster's inventory and variables the way Ansible does, show
//! the apiserver endpoints kubespray's "HA endpoints" table gives each kind of host
//! (`kha endpoints`), and write the kha config that replaces nginx-proxy on a non-master
//! node (`kha config`). Pure apart from reading the named files (and writing `--output`).
//!
//! - [`yaml`]: parsing with file, line, column and key in every error
//! - [`inventory`]: groups, hosts, access addresses
//! - [`vars`]: the variables that matter, in Ansible's precedence
//! - [`address`]: hosts in URLs, `--external-url`
//! - [`endpoints`]: the table's four modes
//! - [`node_config`]: the kha config file

pub mod address;
pub mod endpoints;
pub mod error;
pub mod inventory;
pub mod node_config;
pub mod origin;
pub mod vars;
pub mod yaml;

#[cfg(test)]
mod tests;

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

pub use address::{ExternalUrl, Host};
pub use endpoints::{Evaluation, Mode, evaluate};
pub use error::{KubesprayError, UrlProblem};
pub use inventory::Inventory;
pub use vars::Vars;

/// Where the cluster's description comes from (both subcommands).
#[derive(Clone, Debug, clap::Args)]
pub struct Source {
    /// kubespray inventory: the YAML hosts file (with a kube_control_plane or kube-master group).
    #[arg(long = "from-kubespray", short = 'i', visible_alias = "inventory", value_name = "INVENTORY")]
    pub inventory: PathBuf,
    /// group_vars directory: all/ (or all.yml), then k8s_cluster/ and k8s-cluster/
    /// [default: group_vars/ beside the inventory, if there is one].
    #[arg(long, value_name = "DIR")]
    pub group_vars: Option<PathBuf>,
    /// Set a variable, over the files (like ansible-playbook -e); VALUE is YAML, e.g.
    /// --var 'loadbalancer_apiserver={address: 192.0.2.10, port: 8383}'; empty unsets it.
    #[arg(long = "var", value_name = "NAME=VALUE")]
    pub vars: Vec<String>,
}

impl Source {
    pub fn load(&self) -> Result<(Inventory, Vars), KubesprayError> {
        let inventory = Inventory::from_file(&self.inventory)?;
        let vars = Vars::load(&inventory, self.group_vars.as_deref(), &self.vars)?;
        Ok((inventory, vars))
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    #[default]
    Text,
    Json,
}

/// `kha endpoints`: the apiserver URL of kube-master, non-master and external clients.
#[derive(Clone, Debug, clap::Args)]
pub struct EndpointsArgs {
    #[command(flatten)]
    pub source: Source,
    /// An LB in front of the masters that kubespray does not manage, for external clients
    /// (with the local LB: mode "Local LB + unmanaged LB"), e.g. https://api.example.com:8383.
    #[arg(long, value_name = "URL")]
    pub external_url: Option<String>,
    /// Also show the whole table: every mode with these variables.
    #[arg(long)]
    pub all_modes: bool,
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Text)]
    pub output: Format,
}

/// `kha config`: the kha config file for a non-master node.
#[derive(Clone, Debug, clap::Args)]
pub struct ConfigArgs {
    #[command(flatten)]
    pub source: Source,
    /// Also balance etcd clients: 127.0.0.1:2379 -> the etcd group on 2379, probed at /health.
    #[arg(long)]
    pub etcd: bool,
    /// Write the config to FILE (replaced whole) instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// What `kha endpoints` prints.
pub fn endpoints_command(args: &EndpointsArgs) -> Result<String, KubesprayError> {
    let ext = args.external_url.as_deref().map(ExternalUrl::parse).transpose()?;
    let (inventory, vars) = args.source.load()?;
    let e = evaluate(&vars, &inventory, ext.as_ref(), args.all_modes)?;
    Ok(match args.output {
        Format::Text => endpoints::render_text(&e),
        Format::Json => {
            let mut json =
                serde_json::to_string_pretty(&e).map_err(|source| KubesprayError::Json { source })?;
            json.push('\n');
            json
        }
    })
}

/// The config text, or with `--output` a line saying where it was written.
pub fn config_command(args: &ConfigArgs) -> Result<String, KubesprayError> {
    let (inventory, vars) = args.source.load()?;
    let text = node_config::generate(&vars, &inventory, args.etcd)?;
    match &args.output {
        None => Ok(text),
        Some(path) => {
            write_replacing(path, &text)?;
            Ok(format!("wrote {}\n", path.display()))
        }
    }
}

/// Writes beside the target, then renames over it: an agent re-reading the file on SIGHUP
/// never sees half of it.
fn write_replacing(path: &Path, text: &str) -> Result<(), KubesprayError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let written = (|| -> std::io::Result<()> {
        // fs::write's mode (0666 less the umask), not tempfile's 0600: the file is a config.
        let mut tmp =
            tempfile::Builder::new().permissions(std::fs::Permissions::from_mode(0o666)).tempfile_in(dir)?;
        tmp.write_all(text.as_bytes())?;
        tmp.persist(path)?;
        Ok(())
    })();
    written.map_err(|source| KubesprayError::Write { path: path.to_owned(), source })
}
