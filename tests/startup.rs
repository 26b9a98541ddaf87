//! How the real `portico` binary starts and reports: each component from
//! a config file and from environment variables, their precedence, its
//! open-file limit, its log's colours, and its error lines.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{admin_cli, curl, Child, PyHttpServer, Stack, BIN};
use portico::dev::create_token;
use portico_proto::api::TokenScope;
use portico_proto::GroupId;

const LIMIT: Duration = Duration::from_secs(60);

/// The soft and hard "Max open files" of a process, from /proc.
fn open_file_limits(pid: &str) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_owned();
    let mut words = line["Max open files".len()..].split_whitespace();
    (
        words.next().unwrap().to_owned(),
        words.next().unwrap().to_owned(),
    )
}

/// `portico router` on a fresh data directory and a free port.
fn router_args(dir: &std::path::Path) -> Vec<String> {
    vec![
        "router".into(),
        "--data".into(),
        dir.join("router").to_str().unwrap().into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ]
}

#[tokio::test]
async fn a_process_raises_its_open_file_limit_to_the_hard_limit_and_logs_both() {
    let (_, hard) = open_file_limits("self");
    let dir = tempfile::tempdir().unwrap();
    // Start it with a soft limit of 256, as a distribution's default would.
    let mut cmd = tokio::process::Command::new("sh");
    cmd.args(["-c", "ulimit -Sn 256 && exec \"$@\"", "sh", BIN])
        .args(router_args(dir.path()));
    let mut child = Child::spawn_cmd(cmd);
    let line = child.line_containing("open-file limit", LIMIT).await;
    assert_eq!(Child::field(&line, "was"), Some("256"), "{line}");
    assert_eq!(Child::field(&line, "hard"), Some(hard.as_str()), "{line}");
    assert_eq!(Child::field(&line, "soft"), Some(hard.as_str()), "{line}");
    child.line_starting("listening ", LIMIT).await;
    // The kernel agrees.
    let pid = child.child.id().unwrap().to_string();
    let (soft_now, hard_now) = open_file_limits(&pid);
    assert_eq!(
        (soft_now.as_str(), hard_now.as_str()),
        (hard.as_str(), hard.as_str())
    );
}

#[tokio::test]
async fn logs_are_plain_off_a_terminal_and_with_no_color() {
    // Piped (not a terminal): no escape sequences.
    let dir = tempfile::tempdir().unwrap();
    let args = router_args(dir.path());
    let mut child = Child::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
    child.line_starting("listening ", LIMIT).await;
    child.line_containing("open-file limit", LIMIT).await;
    assert!(!child.output().contains('\x1b'), "{:?}", child.output());
    drop(child);

    // On a terminal (a pty from script(1)): coloured, unless NO_COLOR is set.
    for (no_color, coloured) in [(None, true), (Some("1"), false)] {
        let dir = tempfile::tempdir().unwrap();
        let line = std::iter::once(BIN.to_owned())
            .chain(router_args(dir.path()))
            .collect::<Vec<_>>()
            .join(" ");
        let mut cmd = tokio::process::Command::new("script");
        cmd.args(["-qec", &line, "/dev/null"])
            .env_remove("NO_COLOR");
        if let Some(v) = no_color {
            cmd.env("NO_COLOR", v);
        }
        let mut child = Child::spawn_cmd(cmd);
        child.line_containing("listening ", LIMIT).await;
        child.line_containing("open-file limit", LIMIT).await;
        assert_eq!(
            child.output().contains('\x1b'),
            coloured,
            "NO_COLOR={no_color:?}: {:?}",
            child.output()
        );
    }
}

/// How a component gets its settings in [`start`].
#[derive(Clone, Copy, Debug)]
enum Source {
    /// A TOML file given with `--config`.
    File,
    /// `PORTICO_*` variables, and `PORTICO_CONFIG` for nothing.
    Env,
}

/// `portico COMPONENT` with `settings` (file keys) given as `source`, and
/// nothing on the command line. Every inherited `PORTICO_*` variable is
/// removed first.
fn start(dir: &Path, component: &str, source: Source, settings: &[(&str, toml::Value)]) -> Child {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg(component);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PORTICO_") {
            cmd.env_remove(k);
        }
    }
    match source {
        Source::File => {
            let table: toml::Table = settings
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect();
            let path = dir.join(format!("{component}.toml"));
            std::fs::write(&path, toml::to_string(&table).unwrap()).unwrap();
            cmd.arg("--config").arg(path);
        }
        Source::Env => {
            for (k, v) in settings {
                let text = match v {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                cmd.env(format!("PORTICO_{}", k.to_ascii_uppercase()), text);
            }
        }
    }
    Child::spawn_cmd(cmd)
}

fn s(v: &str) -> toml::Value {
    toml::Value::String(v.to_owned())
}

fn path(p: &Path) -> toml::Value {
    s(p.to_str().unwrap())
}

/// `portico ARGS` as an admin command against the router in `dir`.
async fn admin(api: &str, dir: &Path, args: &[&str]) -> String {
    admin_cli(api, &dir.join("router"), args).await
}

/// A router, an edge and a connector, each started only from `source`
/// (no flag on the command line), then a request through all three.
async fn deployment_from(source: Source) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let files = tempfile::tempdir().unwrap();
    std::fs::write(
        files.path().join("hello.txt"),
        "hello from the file backend\n",
    )
    .unwrap();
    let backend = PyHttpServer::start(files.path()).await;

    // Not the defaults: each value shows that the source was read.
    let mut router = start(
        d,
        "router",
        source,
        &[
            ("data", path(&d.join("router"))),
            ("listen", s("127.0.0.1:0")),
            ("apps_domain", s("cfg.test")),
            ("cert_ttl", s("2h 30m")),
            ("log_format", s("json")),
        ],
    );
    let line = router.line_starting("listening ", LIMIT).await;
    let api = Child::field(&line, "api").unwrap().to_owned();
    assert_ne!(api, "https://127.0.0.1:7443", "listen came from {source:?}");
    // log_format = json: the log lines are JSON objects.
    let limit_line = router.line_containing("open-file limit", LIMIT).await;
    let v: serde_json::Value = serde_json::from_str(&limit_line)
        .unwrap_or_else(|e| panic!("{source:?}: not JSON ({e}): {limit_line}"));
    assert_eq!(v["message"], "open-file limit", "{limit_line}");

    let token = admin(&api, d, &["token", "create", "--edge"]).await;
    let mut edge = start(
        d,
        "edge",
        source,
        &[
            ("router", s(&api)),
            ("token", s(token.trim())),
            ("state", path(&d.join("edge"))),
            ("public_listen", s("127.0.0.1:0")),
            ("tunnel_listen", s("127.0.0.1:0")),
            ("metrics_listen", s("127.0.0.1:0")),
            ("no_http3", toml::Value::Boolean(true)),
        ],
    );
    let line = edge.line_starting("listening ", LIMIT).await;
    let public = Child::field(&line, "public").unwrap().to_owned();
    assert!(public.starts_with("127.0.0.1:"), "{line}");
    assert!(Child::field(&line, "metrics").is_some(), "{line}");
    assert!(Child::field(&line, "h3").is_none(), "no_http3: {line}");

    let token = admin(&api, d, &["token", "create", "--group", "Default"]).await;
    let mut connector = start(
        d,
        "connector",
        source,
        &[
            ("router", s(&api)),
            ("token", s(token.trim())),
            ("state", path(&d.join("connector"))),
            ("tunnels", toml::Value::Integer(1)),
            ("metrics_listen", s("127.0.0.1:0")),
        ],
    );
    let line = connector.line_starting("listening ", LIMIT).await;
    assert!(Child::field(&line, "metrics").is_some(), "{line}");

    let out = admin(
        &api,
        d,
        &[
            "app",
            "create",
            "files",
            "--internal-url",
            &format!("http://{}/", backend.addr),
        ],
    )
    .await;
    assert!(out.contains("files.cfg.test"), "apps_domain: {out}");
    let port = public.rsplit_once(':').unwrap().1;
    let url = format!("https://files.cfg.test:{port}/hello.txt");
    let resolve = format!("files.cfg.test:{port}:127.0.0.1");
    let ca = d.join("router/ca.pem");
    let r = common::eventually("the app is served", LIMIT, || {
        let (url, resolve, ca) = (url.clone(), resolve.clone(), ca.clone());
        async move {
            let r = curl(&ca, &["--resolve", &resolve, &url]).await;
            (r.status == 200).then_some(r)
        }
    })
    .await;
    assert_eq!(r.text(), "hello from the file backend\n");
    drop((router, edge, connector));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_component_starts_from_a_config_file() {
    deployment_from(Source::File).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_component_starts_from_environment_variables() {
    deployment_from(Source::Env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_wins_over_the_environment_and_the_environment_over_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = d.join("router.toml");
    std::fs::write(
        &file,
        format!(
            "data = {:?}\nlisten = \"127.0.0.1:0\"\napps_domain = \"file.test\"\npublic_port = 1111\n",
            d.join("router").to_str().unwrap()
        ),
    )
    .unwrap();
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(["router", "--public-port", "3333"])
        .env("PORTICO_CONFIG", &file)
        .env("PORTICO_APPS_DOMAIN", "env.test")
        .env("PORTICO_PUBLIC_PORT", "2222");
    let mut router = Child::spawn_cmd(cmd);
    let line = router.line_starting("listening ", LIMIT).await;
    let api = Child::field(&line, "api").unwrap().to_owned();
    // listen: the file over the default (7443).
    assert_ne!(api, "https://127.0.0.1:7443");
    let out = admin(
        &api,
        d,
        &[
            "app",
            "create",
            "wiki",
            "--internal-url",
            "http://127.0.0.1:9/",
        ],
    )
    .await;
    // apps_domain: the environment over the file; public_port: the
    // command line over the environment and the file.
    assert!(out.contains("https://wiki.env.test:3333/"), "{out}");
}

#[tokio::test]
async fn a_typo_in_a_config_file_stops_the_process_with_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edge.toml");
    std::fs::write(
        &file,
        "router = \"https://127.0.0.1:7443\"\nstate = \"/tmp/x\"\npublic_listn = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let child = Child::spawn(&["edge", "--config", file.to_str().unwrap()]);
    let (status, out) = child.exit(LIMIT).await;
    assert_eq!(status.code(), Some(2), "{out}");
    assert_eq!(
        out.trim(),
        format!(
            "error: config file {}: unknown key `public_listn`: `portico edge` has no flag --public-listn",
            file.display()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_join_token_is_reported_once() {
    let s = Stack::start().await;
    let token = create_token(
        &s.d.admin,
        TokenScope::Connector {
            group: GroupId::new("Default").unwrap(),
        },
    )
    .await
    .unwrap();
    let router = s.d.router.url();
    let connector = |state: &str| {
        let state = s.dir.path().join(state);
        Child::spawn(&[
            "connector",
            "--router",
            &router,
            "--state",
            state.to_str().unwrap(),
            "--token",
            &token,
            "--tunnels",
            "1",
        ])
    };
    let mut first = connector("first");
    first.line_starting("listening ", LIMIT).await;
    let (status, out) = connector("second").exit(LIMIT).await;
    assert!(!status.success(), "{out}");
    let errors: Vec<&str> = out.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "{out}");
    assert_eq!(
        out.matches("join token already used").count(),
        1,
        "printed once:\n{out}"
    );
    assert!(errors[0].ends_with("join token already used"), "{out}");
    drop(first);
    s.stop().await;
}
