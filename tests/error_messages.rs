//! The house rule on error messages, checked over the workspace's source:
//! an `#[error("…")]` message never prints its own source (`{source}`, or
//! `{0}` of a `#[from]`/`#[source]` field). `portico_agent::error_chain`
//! prints each source once after the message; a message that also embeds
//! it reads `join token already used: … join token already used`.

use std::path::{Path, PathBuf};

/// Crates whose errors someone is still converting; remove an entry when
/// its crate is done (the test then holds it to the rule).
const PENDING: &[&str] = &[];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') && name != "fuzz" {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

/// `(line number, attribute)` of each `#[error(...)]` that prints its source.
fn violations(text: &str) -> Vec<(usize, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with("//") {
            continue;
        }
        let Some(at) = line.find("#[error(\"") else {
            continue;
        };
        let attr = &line[at..];
        let embeds_source = attr.contains("{source}") || attr.contains("{source:");
        // `{0}` is the source when the field it names is one.
        let field_is_source = lines
            .iter()
            .skip(i + 1)
            .find(|l| !l.trim().is_empty() && !l.trim().starts_with("///"))
            .is_some_and(|l| l.contains("#[from]") || l.contains("#[source]"));
        let embeds_zero = (attr.contains("{0}") || attr.contains("{0:")) && field_is_source;
        if embeds_source || embeds_zero {
            found.push((i + 1, attr.trim().to_owned()));
        }
    }
    found
}

#[test]
fn the_scan_finds_what_it_looks_for() {
    let bad =
        "#[error(\"cannot read {path}: {source}\")]\nRead { path: P, #[source] source: E },\n\
               #[error(\"store: {0}\")]\nStore(#[from] StoreError),\n";
    assert_eq!(violations(bad).len(), 2, "{:?}", violations(bad));
    let good = "#[error(\"cannot read {path}\")]\nRead { path: P, #[source] source: E },\n\
                #[error(\"{0} is not an id\")]\nNotId(String),\n#[error(transparent)]\nX(#[from] Y),\n";
    assert!(violations(good).is_empty(), "{:?}", violations(good));
}

#[test]
fn no_error_message_prints_its_source() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(root, &mut files);
    assert!(
        files.len() > 50,
        "the scan found the sources: {}",
        files.len()
    );
    let mut all = Vec::new();
    for path in files {
        let rel = path.strip_prefix(root).unwrap();
        let crate_dir = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        if PENDING.contains(&crate_dir.as_ref()) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (line, attr) in violations(&text) {
            all.push(format!("{}:{line}: {attr}", rel.display()));
        }
    }
    assert!(
        all.is_empty(),
        "messages that print their own source (drop it: error_chain prints it):\n{}",
        all.join("\n")
    );
}
