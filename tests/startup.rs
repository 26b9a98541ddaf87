//! How the real `portico` binary starts and reports: its open-file limit,
//! its log's colours, and its error lines.

mod common;

use std::time::Duration;

use common::{Child, BIN};

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
