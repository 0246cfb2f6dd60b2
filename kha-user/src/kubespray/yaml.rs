//! Reading kubespray's YAML: one parse function that names the file, line, column and key of
//! whatever is wrong, an untyped value for variables, and an order-keeping map for inventories.

use std::{fmt, marker::PhantomData, path::Path};

use serde::{
    Deserialize, Deserializer,
    de::{DeserializeOwned, IgnoredAny, MapAccess, SeqAccess, Visitor},
};

use super::error::KubesprayError;
pub use super::origin::Origin;

/// A YAML value as Ansible would see it, kept only as deep as kha needs: scalars, and the
/// mapping of `loadbalancer_apiserver`. Sequences are skipped.
#[derive(Clone, Debug, PartialEq)]
pub enum Raw {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq,
    Map(Vec<(String, Raw)>),
}

impl Raw {
    /// What the value is, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Raw::Null => "empty",
            Raw::Bool(_) => "a boolean",
            Raw::Int(_) => "a number",
            Raw::Float(_) => "a number",
            Raw::Str(_) => "a string",
            Raw::Seq => "a list",
            Raw::Map(_) => "a mapping",
        }
    }

    /// The value as it would be written, for messages.
    pub fn shown(&self) -> String {
        match self {
            Raw::Null => "null".into(),
            Raw::Bool(b) => b.to_string(),
            Raw::Int(i) => i.to_string(),
            Raw::Float(x) => x.to_string(),
            Raw::Str(s) => s.clone(),
            Raw::Seq => "[...]".into(),
            Raw::Map(entries) => {
                let inner: Vec<String> = entries.iter().map(|(k, v)| format!("{k}: {}", v.shown())).collect();
                format!("{{{}}}", inner.join(", "))
            }
        }
    }

    /// A string with Jinja in it (`{{ ... }}` or `{% ... %}`): only Ansible can evaluate it.
    pub fn is_template(&self) -> bool {
        matches!(self, Raw::Str(s) if s.contains("{{") || s.contains("{%"))
    }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Raw;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Raw, E> {
                Ok(Raw::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Raw, E> {
                Ok(Raw::Int(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Raw, E> {
                Ok(Raw::Int(v.into()))
            }
            fn visit_i128<E>(self, v: i128) -> Result<Raw, E> {
                Ok(Raw::Int(v))
            }
            fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<Raw, E> {
                Ok(i128::try_from(v).map(Raw::Int).unwrap_or(Raw::Str(v.to_string())))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Raw, E> {
                Ok(Raw::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Raw, E> {
                Ok(Raw::Str(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Raw, E> {
                Ok(Raw::Str(v))
            }
            fn visit_unit<E>(self) -> Result<Raw, E> {
                Ok(Raw::Null)
            }
            fn visit_none<E>(self) -> Result<Raw, E> {
                Ok(Raw::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
                Raw::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Raw::Seq)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value = map.next_value::<Raw>()?;
                    entries.retain(|(k, _): &(String, Raw)| *k != key);
                    entries.push((key, value));
                }
                Ok(Raw::Map(entries))
            }
        }
        d.deserialize_any(V)
    }
}

/// A YAML mapping in document order (an inventory's first control-plane host is `m[0]`).
/// A repeated key keeps its last value, in the place of its first, as PyYAML does.
#[derive(Debug)]
pub struct Ordered<V>(pub Vec<(String, V)>);

impl<V> Default for Ordered<V> {
    fn default() -> Self {
        Ordered(Vec::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Ordered<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Vis<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Vis<V> {
            type Value = Ordered<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered<V>, A::Error> {
                let mut entries: Vec<(String, V)> = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value = map.next_value::<V>()?;
                    match entries.iter_mut().find(|(k, _)| *k == key) {
                        Some(entry) => entry.1 = value,
                        None => entries.push((key, value)),
                    }
                }
                Ok(Ordered(entries))
            }
        }
        d.deserialize_map(Vis(PhantomData))
    }
}

/// How kha reads YAML: like PyYAML (which Ansible uses), a repeated key keeps its last value;
/// errors are one line (the file and position are in kha's own message).
fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::LastWins,
        with_snippet: false,
    }
}

/// Reads and parses one YAML file.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<(T, String), KubesprayError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| KubesprayError::Read { path: path.to_owned(), source })?;
    if text.trim_start().starts_with("$ANSIBLE_VAULT") {
        return Err(KubesprayError::Vault { path: path.to_owned() });
    }
    Ok((parse(&text, path)?, text))
}

/// Parses YAML text that came from `path` (named in errors only).
pub fn parse<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, KubesprayError> {
    let yaml_error = |key: Option<String>, source: serde_saphyr::Error| {
        let (line, column) = source.location().map(|l| (l.line(), l.column())).unwrap_or((0, 0));
        KubesprayError::Yaml { path: path.to_owned(), line, column, key, source: Box::new(source) }
    };
    // The closure must fail when deserializing fails (or the parser, stopped mid-document,
    // reports the rest as a second document); the key path is carried out beside it.
    let mut key = None;
    serde_saphyr::with_deserializer_from_str_with_options(text, options(), |de| {
        serde_path_to_error::deserialize::<_, T>(de).map_err(|e| {
            key = key_path(e.path());
            e.into_inner()
        })
    })
    .map_err(|e| yaml_error(key.take(), e))
}

/// Parses the VALUE of `--var NAME=VALUE` as YAML, as `ansible-playbook -e` would.
pub fn parse_flag_value(name: &str, value: &str) -> Result<Raw, KubesprayError> {
    serde_saphyr::from_str_with_options::<Raw>(value, options()).map_err(|source| KubesprayError::VarYaml {
        name: name.to_owned(),
        value: value.to_owned(),
        source: Box::new(source),
    })
}

/// `all.children.kube_control_plane.hosts`, without the `value` field that `Spanned` adds to
/// the path of a value it wraps (kha wraps only the leaves named here).
fn key_path(path: &serde_path_to_error::Path) -> Option<String> {
    const SPANNED: [&str; 9] = [
        "ip",
        "access_ip",
        "ansible_host",
        "loadbalancer_apiserver_localhost",
        "loadbalancer_apiserver",
        "apiserver_loadbalancer_domain_name",
        "loadbalancer_apiserver_port",
        "kube_apiserver_port",
        "kube_apiserver_bind_address",
    ];
    use serde_path_to_error::Segment;
    let mut segments: Vec<String> = path
        .iter()
        .filter_map(|s| match s {
            Segment::Map { key } => Some(key.clone()),
            Segment::Seq { index } => Some(format!("[{index}]")),
            Segment::Enum { variant } => Some(variant.clone()),
            Segment::Unknown => None,
        })
        .collect();
    let n = segments.len();
    if n > 1 && segments[n - 1] == "value" && SPANNED.contains(&segments[n - 2].as_str()) {
        segments.pop();
    }
    (!segments.is_empty()).then(|| segments.join("."))
}
