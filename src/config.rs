//! Where the flags of `portico router`, `portico edge` and `portico
//! connector` come from: the command line, `PORTICO_*` environment
//! variables, and a TOML file given with `--config FILE` (or
//! `PORTICO_CONFIG`), in that order of precedence, then the defaults.
//!
//! The flags are the schema. clap's definitions in [`crate::cli`] are the
//! only list of settings: [`env_var`] derives each flag's variable, and a
//! file key is the flag's long name in snake_case (`--public-listen` is
//! `public_listen`). A file value goes through the flag's own parser, so a
//! duration is written as on the command line (`"30s"`, `"1h 30m"`), and a
//! key that is no flag of the component is an error naming the key and the
//! file (serde's `deny_unknown_fields`, enforced against the flags
//! themselves, so the file format cannot drift from them).
//!
//! How it is done: a first, lenient parse finds the component, its
//! `--config` and where each flag's value came from
//! ([`clap::ArgMatches::value_source`]); every file key whose flag was not
//! set on the command line or by its variable is checked with that flag's
//! parser and appended to the arguments as `--flag=value`; the strict parse
//! of the result is the one the program uses, with clap's usual errors for
//! what is still missing.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command, CommandFactory, FromArgMatches};

use crate::cli::Cli;

/// The subcommands whose flags a config file may set.
pub const COMPONENTS: [&str; 3] = ["router", "edge", "connector"];

/// The flag that names the file; it cannot appear in a file.
pub const CONFIG_FLAG: &str = "config";

/// What `--help` of each component says about the sources of its flags.
pub const SOURCES_HELP: &str = "\
Every flag can also be set by an environment variable (shown as [env: ...])
or by a key in a TOML file given with --config FILE (or PORTICO_CONFIG). A
key is the flag's name in snake_case (--cert-ttl is cert_ttl), a duration
reads as on the command line (\"30s\", \"1h 30m\"), and an unknown key is an
error. The command line wins over the environment, the environment over the
file, the file over the defaults. examples/ has a commented file for each
component.";

/// A config file that cannot be used. Each names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {} is not valid TOML", path.display())]
    Syntax {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error(
        "config file {}: unknown key `{key}`: `portico {component}` has no flag --{}",
        path.display(),
        key.replace('_', "-")
    )]
    UnknownKey {
        path: PathBuf,
        component: &'static str,
        key: String,
    },
    #[error("config file {}: key `{key}` cannot be set in a config file", path.display())]
    NotInFile { path: PathBuf, key: String },
    #[error("config file {}: key `{key}` must be {expected}, not {found}", path.display())]
    WrongType {
        path: PathBuf,
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("config file {}: key `{key}`", path.display())]
    InvalidValue {
        path: PathBuf,
        key: String,
        #[source]
        source: FlagError,
    },
}

/// clap's refusal of one value, shown as its one-line message (clap's
/// message already carries the parser's reason, so it has no source).
#[derive(Debug)]
pub struct FlagError(clap::Error);

impl std::fmt::Display for FlagError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = self.0.render().to_string();
        let line = text.lines().next().unwrap_or_default();
        f.write_str(line.strip_prefix("error: ").unwrap_or(line))
    }
}

impl std::error::Error for FlagError {}

/// The `portico` command with every component flag's environment variable
/// set ([`env_var`]). `Cli::command()` plus that; use it, not the derive's
/// own parser.
pub fn command() -> Command {
    let mut cmd = Cli::command();
    for name in COMPONENTS {
        cmd = cmd.mut_subcommand(name, |sub| {
            sub.mut_args(|arg| match (arg.get_long(), arg.get_env()) {
                (Some(long), None) if !arg.is_positional() => {
                    let var = env_var(long);
                    arg.env(var)
                }
                _ => arg,
            })
        });
    }
    cmd
}

/// `PORTICO_PUBLIC_LISTEN` for `public-listen`.
pub fn env_var(long: &str) -> String {
    format!("PORTICO_{}", long.to_ascii_uppercase().replace('-', "_"))
}

/// `public_listen` for `public-listen`.
pub fn file_key(long: &str) -> String {
    long.replace('-', "_")
}

/// Parses the process's command line, environment and config file; a bad
/// command line exits as clap does (usage, `--help`, status 2).
pub fn parse() -> Result<Cli, ConfigError> {
    match try_parse_from(std::env::args_os()) {
        Ok(cli) => Ok(cli),
        Err(ParseError::Cli(e)) => e.exit(),
        Err(ParseError::File(e)) => Err(e),
    }
}

/// Why [`try_parse_from`] gave no command line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// clap's error, `--help` and `--version` included.
    #[error(transparent)]
    Cli(#[from] clap::Error),
    #[error(transparent)]
    File(#[from] ConfigError),
}

/// [`parse`] over the given arguments (the first is the program name),
/// returning clap's errors instead of exiting.
pub fn try_parse_from<I, T>(args: I) -> Result<Cli, ParseError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let cmd = command();
    args.extend(file_arguments(&cmd, &args)?);
    let matches = cmd.try_get_matches_from(&args)?;
    Ok(Cli::from_arg_matches(&matches)?)
}

/// The `--flag=value` arguments that the config file adds: one per key
/// whose flag is set neither on the command line nor by its variable.
fn file_arguments(cmd: &Command, args: &[OsString]) -> Result<Vec<OsString>, ConfigError> {
    // Lenient: a flag that only the file provides is still missing here.
    let Ok(top) = cmd.clone().ignore_errors(true).try_get_matches_from(args) else {
        return Ok(Vec::new());
    };
    let Some((name, sub)) = top.subcommand() else {
        return Ok(Vec::new());
    };
    let Some(component) = COMPONENTS.into_iter().find(|c| *c == name) else {
        return Ok(Vec::new());
    };
    // `portico edge list` and the like take no file.
    if sub.subcommand().is_some() {
        return Ok(Vec::new());
    }
    let Some(path) = sub
        .try_get_one::<PathBuf>(CONFIG_FLAG)
        .ok()
        .flatten()
        .cloned()
    else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|source| ConfigError::Syntax {
        path: path.clone(),
        source,
    })?;
    let sub_cmd = cmd
        .find_subcommand(component)
        .expect("every component is a subcommand");
    let mut out = Vec::new();
    for (key, value) in &table {
        // The component's own flags, then the global ones (--log, --threads).
        let (arg, matches) = match find_flag(sub_cmd, key) {
            Some(arg) => (arg, sub),
            None => match find_flag(cmd, key).filter(|a| a.is_global_set()) {
                Some(arg) => (arg, &top),
                None => {
                    return Err(ConfigError::UnknownKey {
                        path,
                        component,
                        key: key.clone(),
                    })
                }
            },
        };
        if arg.get_id() == CONFIG_FLAG {
            return Err(ConfigError::NotInFile {
                path,
                key: key.clone(),
            });
        }
        if set_elsewhere(matches, arg) || set_elsewhere(sub, arg) {
            continue;
        }
        out.extend(flag_arguments(&path, key, arg, value)?);
    }
    Ok(out)
}

/// The flag whose file key is `key`.
fn find_flag<'a>(cmd: &'a Command, key: &str) -> Option<&'a Arg> {
    cmd.get_arguments()
        .find(|a| a.get_long().is_some_and(|l| file_key(l) == key))
}

/// Set on the command line or by its variable: the file yields.
fn set_elsewhere(matches: &ArgMatches, arg: &Arg) -> bool {
    matches!(
        matches.value_source(arg.get_id().as_str()),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// `--long=value` for each value of `key`, checked with the flag's parser.
fn flag_arguments(
    path: &Path,
    key: &str,
    arg: &Arg,
    value: &toml::Value,
) -> Result<Vec<OsString>, ConfigError> {
    let long = arg.get_long().expect("file keys are long flags");
    let wrong = |expected: &'static str| ConfigError::WrongType {
        path: path.to_owned(),
        key: key.to_owned(),
        expected,
        found: value.type_str(),
    };
    match arg.get_action() {
        ArgAction::SetTrue => {
            return match value {
                toml::Value::Boolean(true) => Ok(vec![format!("--{long}").into()]),
                toml::Value::Boolean(false) => Ok(Vec::new()),
                _ => Err(wrong("true or false")),
            }
        }
        ArgAction::Set | ArgAction::Append => {}
        _ => {
            return Err(ConfigError::NotInFile {
                path: path.to_owned(),
                key: key.to_owned(),
            })
        }
    }
    let many = matches!(arg.get_action(), ArgAction::Append);
    let values: Vec<String> = match value {
        toml::Value::Array(items) if many => items
            .iter()
            .map(|v| scalar(v).ok_or_else(|| wrong("a list of strings or numbers")))
            .collect::<Result<_, _>>()?,
        v => match scalar(v) {
            Some(s) => vec![s],
            None if many => return Err(wrong("a list of strings or numbers")),
            None => return Err(wrong("a string, a number or a boolean")),
        },
    };
    let arguments: Vec<OsString> = values
        .iter()
        .map(|v| format!("--{long}={v}").into())
        .collect();
    // The flag's own parser, alone, so that a bad value is blamed on the
    // file and its key.
    let probe = Arg::new(arg.get_id().clone())
        .long(long.to_owned())
        .value_names(arg.get_value_names().unwrap_or_default().to_vec())
        .action(arg.get_action().clone())
        .value_parser(arg.get_value_parser().clone());
    Command::new("portico")
        .arg(probe)
        .try_get_matches_from(std::iter::once(OsString::from("portico")).chain(arguments.clone()))
        .map_err(|e| ConfigError::InvalidValue {
            path: path.to_owned(),
            key: key.to_owned(),
            source: FlagError(e),
        })?;
    Ok(arguments)
}

/// The text of a string, integer, float or boolean.
fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Datetime(_) | toml::Value::Array(_) | toml::Value::Table(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Command as Cmd, ConnectorArgs, EdgeArgs, RouterArgs};

    /// The flags a file may set for `component`: its own, then the global
    /// ones.
    fn flags(component: &str) -> Vec<Arg> {
        let cmd = command();
        let sub = cmd.find_subcommand(component).unwrap().clone();
        sub.get_arguments()
            .chain(cmd.get_arguments().filter(|a| a.is_global_set()))
            .filter(|a| a.get_long().is_some() && a.get_id() != CONFIG_FLAG)
            .cloned()
            .collect()
    }

    fn example(component: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(format!("{component}.toml"))
    }

    fn parse(args: &[&str]) -> Result<Cli, ParseError> {
        try_parse_from(std::iter::once("portico").chain(args.iter().copied()))
    }

    fn file(dir: &tempfile::TempDir, text: &str) -> String {
        let path = dir.path().join("portico.toml");
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    }

    fn router(cli: Cli) -> RouterArgs {
        match cli.command {
            Cmd::Router(a) => a,
            other => panic!("not router: {other:?}"),
        }
    }

    fn edge(cli: Cli) -> EdgeArgs {
        match cli.command {
            Cmd::Edge(c) => c.run,
            other => panic!("not edge: {other:?}"),
        }
    }

    fn connector(cli: Cli) -> ConnectorArgs {
        match cli.command {
            Cmd::Connector(c) => c.run,
            other => panic!("not connector: {other:?}"),
        }
    }

    #[test]
    fn every_component_flag_has_its_variable() {
        for component in COMPONENTS {
            let cmd = command();
            let sub = cmd.find_subcommand(component).unwrap();
            for arg in sub.get_arguments().filter(|a| a.get_long().is_some()) {
                let long = arg.get_long().unwrap();
                let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
                assert_eq!(
                    env,
                    Some(env_var(long)),
                    "portico {component} --{long}: its variable breaks the PORTICO_<FLAG> rule"
                );
            }
            for arg in flags(component).iter().filter(|a| a.is_global_set()) {
                assert!(
                    arg.get_env().is_some(),
                    "global --{} has no variable",
                    arg.get_long().unwrap()
                );
            }
        }
    }

    /// Each example parses through the binary's own path, and names every
    /// flag of its component as a key (commented out where optional): a
    /// new flag without its key fails here.
    #[test]
    fn every_example_parses_and_names_every_flag() {
        for component in COMPONENTS {
            let path = example(component);
            let text = std::fs::read_to_string(&path).unwrap();
            for arg in flags(component) {
                let key = file_key(arg.get_long().unwrap());
                let named = text.lines().any(|l| {
                    let l = l.trim_start_matches('#').trim_start();
                    l.strip_prefix(key.as_str())
                        .is_some_and(|rest| rest.trim_start().starts_with('='))
                });
                assert!(named, "{} has no `{key}` key", path.display());
            }
            let cli = parse(&[component, "--config", path.to_str().unwrap()]).unwrap_or_else(|e| {
                panic!("{}: {}", path.display(), portico_agent::error_chain(&e))
            });
            // A value from each file, to show it was read.
            match component {
                "router" => assert_eq!(router(cli).data, PathBuf::from("/var/lib/portico")),
                "edge" => assert_eq!(
                    edge(cli).state,
                    Some(PathBuf::from("/var/lib/portico-edge"))
                ),
                "connector" => assert_eq!(
                    connector(cli).state,
                    Some(PathBuf::from("/var/lib/portico-connector"))
                ),
                _ => unreachable!(),
            }
        }
    }

    #[test]
    fn the_command_line_wins_over_the_file_and_the_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let f = file(
            &dir,
            "data = \"/from/file\"\napps_domain = \"file.test\"\ncert_ttl = \"2h 30m\"\npublic_port = 8443\n",
        );
        let args = router(parse(&["router", "--config", &f, "--apps-domain", "cli.test"]).unwrap());
        assert_eq!(args.data, PathBuf::from("/from/file"));
        assert_eq!(args.apps_domain, "cli.test");
        assert_eq!(args.cert_ttl, std::time::Duration::from_secs(9000));
        assert_eq!(args.public_port, Some(8443));
        // Not in the file: the default.
        assert_eq!(args.listen, "127.0.0.1:7443".parse().unwrap());
        // The order on the command line does not matter.
        let args = router(parse(&["router", "--apps-domain", "cli.test", "--config", &f]).unwrap());
        assert_eq!(args.apps_domain, "cli.test");
    }

    #[test]
    fn flags_lists_and_globals_come_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = file(
            &dir,
            "router = \"https://r.test:7443\"\nstate = \"/s\"\nno_http3 = true\n\
             threads = 1\nlog_format = \"json\"\nlog = \"debug\"\n",
        );
        let cli = parse(&["edge", "--config", &f]).unwrap();
        assert_eq!(cli.threads.map(|t| t.get()), Some(1));
        assert_eq!(cli.log.log_format, crate::logging::LogFormat::Json);
        assert_eq!(cli.log.level, "debug");
        let args = edge(cli);
        assert!(args.no_http3);
        assert_eq!(args.router.as_deref(), Some("https://r.test:7443"));
        // A global flag on the command line wins too.
        let cli = parse(&["--threads", "2", "edge", "--config", &f]).unwrap();
        assert_eq!(cli.threads.map(|t| t.get()), Some(2));

        let f = file(
            &dir,
            "router = \"https://r.test:7443\"\nstate = \"/s\"\nbackend_ca = [\"/a.pem\", \"/b.pem\"]\ntunnels = 2\n",
        );
        let args = connector(parse(&["connector", "--config", &f]).unwrap());
        assert_eq!(
            args.backend_ca,
            [PathBuf::from("/a.pem"), PathBuf::from("/b.pem")]
        );
        assert_eq!(args.tunnels, 2);
        let args =
            connector(parse(&["connector", "--config", &f, "--backend-ca", "/c.pem"]).unwrap());
        assert_eq!(args.backend_ca, [PathBuf::from("/c.pem")]);

        // Nameservers: a list in the file, repeated or comma-separated flags.
        let f = file(
            &dir,
            "router = \"https://r.test:7443\"\nstate = \"/s\"\nnameserver = [\"10.0.0.53\", \"[fd00::53]:5353\"]\n",
        );
        let args = connector(parse(&["connector", "--config", &f]).unwrap());
        let want: Vec<std::net::SocketAddr> = vec![
            "10.0.0.53:53".parse().unwrap(),
            "[fd00::53]:5353".parse().unwrap(),
        ];
        assert_eq!(args.nameserver, want);
        let args = connector(
            parse(&[
                "connector",
                "--config",
                &f,
                "--nameserver",
                "127.0.0.1:5300,10.1.1.1",
            ])
            .unwrap(),
        );
        let want: Vec<std::net::SocketAddr> = vec![
            "127.0.0.1:5300".parse().unwrap(),
            "10.1.1.1:53".parse().unwrap(),
        ];
        assert_eq!(args.nameserver, want);
        assert!(parse(&["connector", "--config", &f, "--nameserver", "dns.example"]).is_err());
    }

    #[test]
    fn a_bad_file_is_an_error_naming_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let err = |text: &str, component: &str| {
            let f = file(&dir, text);
            match parse(&[component, "--config", &f]) {
                Err(ParseError::File(e)) => (portico_agent::error_chain(&e).to_string(), e, f),
                other => panic!("{text:?}: {other:?}"),
            }
        };
        let (text, e, f) = err("data = \"/d\"\nlisten_addr = \"127.0.0.1:1\"\n", "router");
        assert!(
            matches!(&e, ConfigError::UnknownKey { key, component: "router", .. } if key == "listen_addr")
        );
        assert!(
            text.contains(&f) && text.contains("`listen_addr`"),
            "{text}"
        );
        // An edge key given to a connector.
        let (_, e, _) = err("public_listen = \"127.0.0.1:1\"\n", "connector");
        assert!(matches!(&e, ConfigError::UnknownKey { key, .. } if key == "public_listen"));

        let (text, e, f) = err("data = \"/d\"\ncert_ttl = \"3 fortnights\"\n", "router");
        assert!(
            matches!(&e, ConfigError::InvalidValue { key, .. } if key == "cert_ttl"),
            "{e:?}"
        );
        assert!(
            text.contains(&f) && text.contains("`cert_ttl`") && text.contains("3 fortnights"),
            "{text}"
        );
        let (text, _, _) = err("data = \"/d\"\nlisten = \"nowhere\"\n", "router");
        assert!(
            text.contains("`listen`") && text.contains("nowhere"),
            "{text}"
        );
        assert_eq!(
            text.matches("invalid socket address syntax").count(),
            1,
            "{text}"
        );

        let (_, e, _) = err("data = \"/d\"\n[listen]\nport = 1\n", "router");
        assert!(
            matches!(&e, ConfigError::WrongType { key, found: "table", .. } if key == "listen"),
            "{e:?}"
        );
        let (_, e, _) = err(
            "router = \"https://r\"\nstate = \"/s\"\nno_http3 = \"yes\"\n",
            "edge",
        );
        assert!(
            matches!(&e, ConfigError::WrongType { key, .. } if key == "no_http3"),
            "{e:?}"
        );
        let (_, e, _) = err("config = \"/other.toml\"\n", "router");
        assert!(
            matches!(&e, ConfigError::NotInFile { key, .. } if key == "config"),
            "{e:?}"
        );
        let (text, e, f) = err("data = \n", "router");
        assert!(matches!(&e, ConfigError::Syntax { .. }), "{e:?}");
        assert!(text.contains(&f), "{text}");

        let missing = dir.path().join("missing.toml");
        match parse(&["router", "--config", missing.to_str().unwrap()]) {
            Err(ParseError::File(ConfigError::Read { path, .. })) => assert_eq!(path, missing),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn what_is_still_missing_is_clap_s_error_and_subcommands_take_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = file(&dir, "apps_domain = \"x.test\"\n");
        match parse(&["router", "--config", &f]) {
            Err(ParseError::Cli(e)) => {
                assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument)
            }
            other => panic!("{other:?}"),
        }
        // `portico edge list` ignores PORTICO_CONFIG and has no --config.
        assert!(parse(&["edge", "list"]).is_ok());
        assert!(matches!(
            parse(&["edge", "list", "--config", &f]),
            Err(ParseError::Cli(_))
        ));
    }
}
