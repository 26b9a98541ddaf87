//! Link translation in response bodies (an app's `translate_body`): the
//! URLs of HTML attributes and CSS `url()`s that point at a published
//! app's internal URL become its external URL, as `crate::translate`
//! translates one URL. Streamed: each chunk from the backend is rewritten
//! as it comes, and only a bounded tail is carried to the next.
//!
//! - **Which bodies.** `text/html` (and `application/xhtml+xml`) in an
//!   ASCII-compatible charset (UTF-8 when none is named), and `text/css`,
//!   by `Content-Type`, with no `Content-Encoding` other than `identity`.
//!   Anything else passes untouched: a compressed body is not rewritten
//!   (the connector asks the backend for `identity` when the app
//!   translates bodies, so most are not compressed).
//! - **HTML** goes through `lol_html`, a streaming rewriter: the attributes
//!   in [`URL_ATTRIBUTES`], `srcset`, the `content` of
//!   `<meta http-equiv=refresh>`, and CSS in `style` attributes and
//!   `<style>` elements. An unfinished tag is held by lol_html up to
//!   [`MAX_HTML_HOLD`]; past that the rewriter bails out: what it held and
//!   the rest of the body pass as the backend sent them.
//! - **CSS** (bodies, `<style>` text) goes through [`CssScanner`], which
//!   holds back at most an unfinished `url(` of [`MAX_CSS_TOKEN`] bytes; a
//!   longer one passes untranslated.
//! - **Not rewritten:** URLs in scripts, inline event handlers, text,
//!   comments, `@import "…"` without `url()`, and URLs written with
//!   character references (`http&#58;//…`).

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap};
use lol_html::html_content::{ContentType, Element, TextChunk};
use lol_html::send::{HtmlRewriter, Settings};
use lol_html::{element, text, MemorySettings};

use crate::translate::{refresh_value, Translator};

/// The most bytes of an unfinished tag lol_html holds between chunks (its
/// memory limit, which also covers its own state). Generous, for inline
/// `data:` images in `src`.
pub(crate) const MAX_HTML_HOLD: usize = 256 << 10;
/// The longest CSS `url(…)` translated (from `url(` to the end of its
/// URL), and so the most a [`CssScanner`] carries between chunks.
pub(crate) const MAX_CSS_TOKEN: usize = 4 << 10;

/// Attributes whose whole value is one URL, rewritten on any element.
pub(crate) const URL_ATTRIBUTES: &[&str] = &[
    "href",
    "src",
    "action",
    "formaction",
    "poster",
    "cite",
    "background",
    "longdesc",
    "manifest",
    "data",
    "codebase",
    "icon",
];

/// What kind of body a response has, for rewriting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyKind {
    Html(lol_html::AsciiCompatibleEncoding),
    Css,
}

impl BodyKind {
    /// The kind of a response with `headers`, or `None` when its body
    /// passes untouched (another type, compressed, or an encoding that is
    /// not ASCII-compatible).
    pub fn of(headers: &HeaderMap) -> Option<BodyKind> {
        for v in headers.get_all(header::CONTENT_ENCODING) {
            let identity = v.to_str().is_ok_and(|v| {
                v.split(',')
                    .all(|c| c.trim().is_empty() || c.trim().eq_ignore_ascii_case("identity"))
            });
            if !identity {
                return None;
            }
        }
        let ct = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
        let mut params = ct.split(';');
        let essence = params.next()?.trim();
        let charset = params.find_map(|p| {
            let (k, v) = p.split_once('=')?;
            k.trim()
                .eq_ignore_ascii_case("charset")
                .then(|| v.trim().trim_matches('"'))
        });
        let encoding = match charset {
            None => Some(encoding_rs::UTF_8),
            Some(label) => encoding_rs::Encoding::for_label(label.as_bytes()),
        }
        .and_then(lol_html::AsciiCompatibleEncoding::new)?;
        if essence.eq_ignore_ascii_case("text/html")
            || essence.eq_ignore_ascii_case("application/xhtml+xml")
        {
            Some(BodyKind::Html(encoding))
        } else if essence.eq_ignore_ascii_case("text/css") {
            Some(BodyKind::Css)
        } else {
            None
        }
    }
}

/// Rewrites one body, chunk by chunk.
pub(crate) struct BodyRewriter {
    inner: Inner,
}

enum Inner {
    Html {
        /// Boxed: lol_html's state is a kilobyte, the other kinds' a few
        /// words.
        rewriter: Box<HtmlRewriter<'static, Sink>>,
        out: Arc<Mutex<BytesMut>>,
    },
    Css {
        scanner: CssScanner,
        translator: Arc<Translator>,
    },
    /// After lol_html bailed out: the rest passes as it is.
    Through,
}

impl std::fmt::Debug for BodyRewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.inner {
            Inner::Html { .. } => "html",
            Inner::Css { .. } => "css",
            Inner::Through => "through",
        };
        f.debug_struct("BodyRewriter").field("kind", &kind).finish()
    }
}

/// lol_html's output: appended to a buffer the rewriter drains.
struct Sink(Arc<Mutex<BytesMut>>);

impl lol_html::OutputSink for Sink {
    fn handle_chunk(&mut self, chunk: &[u8]) {
        lock(&self.0).extend_from_slice(chunk);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding it; a poison would still leave whole
    // bytes behind.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BodyRewriter {
    pub fn new(kind: BodyKind, translator: Arc<Translator>) -> BodyRewriter {
        let inner = match kind {
            BodyKind::Css => Inner::Css {
                scanner: CssScanner::default(),
                translator,
            },
            BodyKind::Html(encoding) => {
                let out = Arc::new(Mutex::new(BytesMut::new()));
                Inner::Html {
                    rewriter: Box::new(html_rewriter(encoding, translator, Sink(out.clone()))),
                    out,
                }
            }
        };
        BodyRewriter { inner }
    }

    /// The rewritten bytes for `chunk` (possibly none yet, possibly some
    /// held back from earlier chunks).
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        match &mut self.inner {
            Inner::Through => Bytes::copy_from_slice(chunk),
            Inner::Css {
                scanner,
                translator,
            } => {
                let mut out = Vec::with_capacity(chunk.len() + 64);
                scanner.push(chunk, false, translator, &mut out);
                Bytes::from(out)
            }
            Inner::Html { rewriter, out } => {
                let result = rewriter.write(chunk);
                let bytes = lock(out).split().freeze();
                if let Err(e) = result {
                    // A graceful bail-out: lol_html has flushed what it
                    // held and this chunk as they came.
                    tracing::debug!(error = %e, "HTML rewriting stopped; the rest of the body passes as it is");
                    self.inner = Inner::Through;
                }
                bytes
            }
        }
    }

    /// What is still held, at the end of the body.
    pub fn finish(self) -> Bytes {
        match self.inner {
            Inner::Through => Bytes::new(),
            Inner::Css {
                mut scanner,
                translator,
            } => {
                let mut out = Vec::new();
                scanner.push(&[], true, &translator, &mut out);
                Bytes::from(out)
            }
            Inner::Html { rewriter, out } => {
                if let Err(e) = rewriter.end() {
                    tracing::debug!(error = %e, "HTML rewriting stopped at the end of the body");
                }
                let bytes = lock(&out).split().freeze();
                bytes
            }
        }
    }
}

fn html_rewriter(
    encoding: lol_html::AsciiCompatibleEncoding,
    t: Arc<Translator>,
    sink: Sink,
) -> HtmlRewriter<'static, Sink> {
    let mut settings = Settings::new_send()
        .with_encoding(encoding)
        // Never refuse ambiguous markup: a rewriter that stops mid-body
        // would lose what it held.
        .with_strict(false)
        .with_memory_settings(
            MemorySettings::new()
                .with_max_allowed_memory_usage(MAX_HTML_HOLD)
                .with_graceful_bail_out_on_memory_limit_exceeded(true),
        );
    // One handler on every element, which looks for each attribute: one
    // selector is cheaper to match than one per attribute.
    let tt = t.clone();
    let on_element = move |el: &mut Element<'_, '_, _>| {
        for name in URL_ATTRIBUTES {
            set(el, name, |v| tt.url(v));
        }
        set(el, "srcset", |v| srcset(v, &tt));
        set(el, "style", |v| css_str(v, &tt));
        Ok(())
    };
    settings = settings.append_element_content_handler(element!("*", on_element));
    let tt = t.clone();
    settings = settings.append_element_content_handler(element!(
        "meta[http-equiv][content]",
        move |el: &mut Element<'_, '_, _>| {
            let refresh = el
                .get_attribute("http-equiv")
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("refresh"));
            if refresh {
                set(el, "content", |v| refresh_value(v, &tt));
            }
            Ok(())
        }
    ));
    // `<style>` text comes in pieces cut where the input chunks were: the
    // scanner carries an unfinished `url(` from one piece to the next (and
    // a bail-out writes out what it carried).
    let carried = Arc::new(Mutex::new(CssScanner::default()));
    let scanner = carried.clone();
    settings =
        settings.append_element_content_handler(text!("style", move |chunk: &mut TextChunk<
            '_,
        >| {
            let mut scanner = lock(&scanner);
            let had = scanner.is_carrying();
            let last = chunk.last_in_text_node();
            let mut out = Vec::with_capacity(chunk.as_str().len());
            scanner.push(chunk.as_str().as_bytes(), last, &t, &mut out);
            if last {
                // The next `<style>` starts afresh.
                scanner.prev = 0;
            }
            if had || scanner.is_carrying() || out != chunk.as_str().as_bytes() {
                chunk.replace(&String::from_utf8_lossy(&out), ContentType::Html);
            }
            Ok(())
        }));
    settings = settings.append_bail_out_handler(lol_html::bail_out!(move |_err, bail_out| {
        let held = lock(&carried).take();
        if !held.is_empty() {
            bail_out.append(&String::from_utf8_lossy(&held), ContentType::Html);
        }
    }));
    HtmlRewriter::new(settings, sink)
}

/// Replaces attribute `name`'s value by `f`'s, when it gives one.
fn set<H: lol_html::HandlerTypes>(
    el: &mut Element<'_, '_, H>,
    name: &str,
    f: impl FnOnce(&str) -> Option<String>,
) {
    if let Some(new) = el.get_attribute(name).and_then(|v| f(&v)) {
        // The name is one of ours, always valid.
        let _ = el.set_attribute(name, &new);
    }
}

/// A `srcset` (`url [descriptor], …`) with each URL translated; `None`
/// when none changes.
fn srcset(value: &str, t: &Translator) -> Option<String> {
    let mut out = String::with_capacity(value.len() + 32);
    let mut changed = false;
    let mut rest = value;
    while !rest.is_empty() {
        // Separators and spaces before the URL.
        let lead = rest
            .find(|c: char| !(c.is_ascii_whitespace() || c == ','))
            .unwrap_or(rest.len());
        out.push_str(&rest[..lead]);
        rest = &rest[lead..];
        if rest.is_empty() {
            break;
        }
        let end = rest
            .find(|c: char| c.is_ascii_whitespace())
            .unwrap_or(rest.len());
        let mut url = &rest[..end];
        // A URL written right before the comma: the comma is not its.
        let mut comma = "";
        if let Some(u) = url.strip_suffix(',') {
            url = u;
            comma = ",";
        }
        match t.url(url) {
            Some(new) => {
                out.push_str(&new);
                changed = true;
            }
            None => out.push_str(url),
        }
        out.push_str(comma);
        rest = &rest[end..];
        if comma.is_empty() {
            // The descriptor, up to the next comma.
            let d = rest.find(',').unwrap_or(rest.len());
            out.push_str(&rest[..d]);
            rest = &rest[d..];
        }
    }
    changed.then_some(out)
}

/// CSS text (a `style` attribute) with its `url()`s translated; `None`
/// when none changes.
fn css_str(value: &str, t: &Translator) -> Option<String> {
    let mut out = Vec::with_capacity(value.len() + 32);
    CssScanner::default().push(value.as_bytes(), true, t, &mut out);
    (out != value.as_bytes()).then(|| String::from_utf8_lossy(&out).into_owned())
}

/// Finds CSS `url(…)`s in a stream of bytes and translates their URLs.
/// Works on any ASCII-compatible encoding: it cuts and inserts only at
/// ASCII bytes. Between chunks it carries at most an unfinished `url(` of
/// [`MAX_CSS_TOKEN`] bytes; the output is the same however the input is
/// cut.
#[derive(Debug, Default)]
pub(crate) struct CssScanner {
    carry: Vec<u8>,
    /// The byte before `carry` (or before the next chunk), to tell `url(`
    /// from `myurl(`.
    prev: u8,
}

impl CssScanner {
    fn is_carrying(&self) -> bool {
        !self.carry.is_empty()
    }

    /// What is carried, given up (the scanner starts afresh).
    fn take(&mut self) -> Vec<u8> {
        self.prev = 0;
        std::mem::take(&mut self.carry)
    }

    /// Scans `chunk` after what was carried, appending the output to
    /// `out`; `last` says no more input follows.
    pub fn push(&mut self, chunk: &[u8], last: bool, t: &Translator, out: &mut Vec<u8>) {
        let joined;
        let data: &[u8] = if self.carry.is_empty() {
            chunk
        } else {
            let mut d = std::mem::take(&mut self.carry);
            d.extend_from_slice(chunk);
            joined = d;
            &joined
        };
        let mut emitted = 0;
        let mut i = 0;
        while let Some(off) = data[i..].iter().position(|b| b | 0x20 == b'u') {
            let p = i + off;
            let before = if p == 0 { self.prev } else { data[p - 1] };
            if is_ident(before) {
                i = p + 1;
                continue;
            }
            match url_token(&data[p..]) {
                Token::No => i = p + 1,
                Token::Partial if !last && data.len() - p <= MAX_CSS_TOKEN => {
                    out.extend_from_slice(&data[emitted..p]);
                    self.prev = before;
                    self.carry = data[p..].to_vec();
                    return;
                }
                Token::Partial => i = p + 1,
                // Too long: passed as it is, and scanned on from its `u`
                // as a long unfinished one is (so the cut does not matter).
                Token::Url { end, .. } if end > MAX_CSS_TOKEN => i = p + 1,
                Token::Url { start, end } => {
                    let url = std::str::from_utf8(&data[p + start..p + end]).ok();
                    if let Some(new) = url.and_then(|u| t.url(u)) {
                        out.extend_from_slice(&data[emitted..p + start]);
                        out.extend_from_slice(new.as_bytes());
                        emitted = p + end;
                    }
                    i = p + end;
                }
            }
        }
        out.extend_from_slice(&data[emitted..]);
        if let Some(b) = data.last() {
            self.prev = *b;
        }
    }
}

enum Token {
    /// Not a `url(` here.
    No,
    /// Maybe one, cut by the end of the input.
    Partial,
    /// The URL lies at `[start, end)` from the `u`.
    Url { start: usize, end: usize },
}

/// Reads `url(` + spaces + an optional quote + the URL at the start of `s`.
fn url_token(s: &[u8]) -> Token {
    const OPEN: &[u8] = b"url(";
    let n = s.len().min(OPEN.len());
    if !s[..n].eq_ignore_ascii_case(&OPEN[..n]) {
        return Token::No;
    }
    if n < OPEN.len() {
        return Token::Partial;
    }
    let mut j = OPEN.len();
    while j < s.len() && is_space(s[j]) {
        j += 1;
    }
    let Some(&first) = s.get(j) else {
        return Token::Partial;
    };
    let (start, stop): (usize, fn(u8) -> bool) = match first {
        b'"' => (j + 1, |b| b == b'"' || b == b'\n'),
        b'\'' => (j + 1, |b| b == b'\'' || b == b'\n'),
        _ => (j, |b| b == b')' || is_space(b) || b == b'"' || b == b'\''),
    };
    match s[start..].iter().position(|b| stop(*b)) {
        Some(len) => Token::Url {
            start,
            end: start + len,
        },
        None => Token::Partial,
    }
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'\x0c')
}

/// A byte that may be part of a CSS identifier (non-ASCII counts).
fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b >= 0x80
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::Links;
    use http::HeaderValue;

    fn translator() -> Arc<Translator> {
        let links = Arc::new(Links::new([
            ("http://hr.corp:8080/hr/", "https://hr.apps.example.com/"),
            ("https://wiki.corp/", "https://wiki.apps.example.com:8443/"),
        ]));
        Arc::new(Translator::new(links, "http://hr.corp:8080/hr/").unwrap())
    }

    fn html() -> BodyKind {
        BodyKind::Html(lol_html::AsciiCompatibleEncoding::new(encoding_rs::UTF_8).unwrap())
    }

    /// The body rewritten from `chunks`, fed one after the other.
    fn run(kind: BodyKind, chunks: &[&[u8]]) -> Vec<u8> {
        let mut r = BodyRewriter::new(kind, translator());
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&r.push(c));
        }
        out.extend_from_slice(&r.finish());
        out
    }

    /// Each golden input, rewritten whole, cut in two at every byte and
    /// fed a byte at a time, gives its expected output every time (cuts
    /// fall inside attribute values, tags, `url(` and multi-byte
    /// characters). `UPDATE_GOLDEN=1` writes the expected files afresh.
    #[test]
    fn golden_bodies_rewrite_the_same_however_they_are_cut() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
        for (input, expected, kind) in [
            ("page.html", "page.expected.html", html()),
            ("site.css", "site.expected.css", BodyKind::Css),
        ] {
            let input = std::fs::read(dir.join(input)).unwrap();
            let whole = run(kind, &[&input]);
            let path = dir.join(expected);
            if std::env::var_os("UPDATE_GOLDEN").is_some() {
                std::fs::write(&path, &whole).unwrap();
            }
            let want = std::fs::read(&path).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&whole),
                String::from_utf8_lossy(&want),
                "{expected}"
            );
            for i in 0..=input.len() {
                let got = run(kind, &[&input[..i], &input[i..]]);
                assert!(
                    got == want,
                    "{expected}: cut at byte {i} differs:\n{}",
                    String::from_utf8_lossy(&got)
                );
            }
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            assert!(run(kind, &bytes) == want, "{expected}: byte by byte");
        }
    }

    #[test]
    fn a_css_url_longer_than_the_bound_passes_untranslated_however_cut() {
        let long = format!("http://hr.corp:8080/hr/{}", "a".repeat(MAX_CSS_TOKEN));
        let input = format!(
            "a{{b:url({long})}} c{{d:url(http://hr.corp:8080/hr/short)}} e{{f:url(\"{long}\")}}"
        );
        let want = format!(
            "a{{b:url({long})}} c{{d:url(https://hr.apps.example.com/short)}} e{{f:url(\"{long}\")}}"
        );
        let input = input.as_bytes();
        for i in (0..=input.len()).step_by(7).chain([4095, 4096, 4097, 4100]) {
            let i = i.min(input.len());
            let got = run(BodyKind::Css, &[&input[..i], &input[i..]]);
            assert_eq!(String::from_utf8_lossy(&got), want, "cut at {i}");
        }
        // The carry never grows past the bound, even with no `)` at all.
        let mut s = CssScanner::default();
        let mut out = Vec::new();
        s.push(b"x{y:url(", false, &translator(), &mut out);
        for _ in 0..100 {
            s.push(&[b'z'; 1000], false, &translator(), &mut out);
            assert!(s.carry.len() <= MAX_CSS_TOKEN + 1000);
        }
        s.push(&[], true, &translator(), &mut out);
        assert_eq!(out.len(), 8 + 100_000, "every byte comes out");
    }

    /// A tag longer than lol_html may hold makes it bail out: what it held
    /// and the rest come out as they were, nothing is lost, and what it
    /// had finished before stays translated (all of it, the first link,
    /// or, when the first tag was still held, none).
    #[test]
    fn an_html_tag_longer_than_the_bound_passes_through_whole() {
        let big = "x".repeat(MAX_HTML_HOLD + 1000);
        let input = format!(
            "<a href=\"http://hr.corp:8080/hr/a\">a</a><img alt=\"{big}\" src=\"http://hr.corp:8080/hr/i\"><a href=\"http://hr.corp:8080/hr/b\">b</a>"
        );
        let translated_a = "<a href=\"https://hr.apps.example.com/a\">a</a>";
        let raw_rest = &input[input.find("<img").unwrap()..];
        let full = format!(
            "{translated_a}<img alt=\"{big}\" src=\"https://hr.apps.example.com/i\"><a href=\"https://hr.apps.example.com/b\">b</a>"
        );
        let bailed = format!("{translated_a}{raw_rest}");
        let input = input.as_bytes();
        let mut bailouts = 0;
        for i in [
            0,
            10,
            50,
            100,
            5000,
            100_000,
            MAX_HTML_HOLD,
            input.len() - 30,
            input.len(),
        ] {
            let got = String::from_utf8(run(html(), &[&input[..i], &input[i..]])).unwrap();
            let raw = std::str::from_utf8(input).unwrap();
            assert!(
                got == full || got == bailed || got == raw,
                "cut at {i}: {}",
                &got[..200]
            );
            bailouts += usize::from(got == bailed);
        }
        assert!(bailouts > 0, "no cut made lol_html bail out");
        // In 16 KiB chunks, as a backend sends it.
        let chunks: Vec<&[u8]> = input.chunks(16 << 10).collect();
        let got = String::from_utf8(run(html(), &chunks)).unwrap();
        assert_eq!(got, bailed);
    }

    /// Throughput of the rewriter on a 1 MiB HTML page in 16 KiB chunks
    /// (as a backend's reads come), against passing the chunks on as they
    /// are. A measurement, not a test: `bench/translate.sh` runs it in a
    /// release build and BENCHMARKS.md has its figures.
    #[test]
    #[ignore = "a benchmark: bench/translate.sh"]
    #[allow(clippy::print_stdout)] // Its one line of output is the figure.
    fn bench_translate_1mib_html() {
        let mut page = Vec::with_capacity(1 << 20);
        for i in 0.. {
            let line = format!(
                "<div class=\"row\"><a href=\"http://hr.corp:8080/hr/people/{i}\">Person {i}</a> \
                 <img src=\"/hr/img/{i}.png\" alt=\"\"> <span>some text of the page, {i}</span></div>\n"
            );
            if page.len() + line.len() > 1 << 20 {
                break;
            }
            page.extend_from_slice(line.as_bytes());
        }
        let chunks: Vec<&[u8]> = page.chunks(16 << 10).collect();
        let rounds = 20;
        let measure = |f: &dyn Fn() -> usize| {
            let started = std::time::Instant::now();
            let mut n = 0;
            for _ in 0..rounds {
                n += f();
            }
            let secs = started.elapsed().as_secs_f64();
            (n, (page.len() * rounds) as f64 / secs / 1e6)
        };
        let (_, off) = measure(&|| chunks.iter().map(|c| Bytes::copy_from_slice(c).len()).sum());
        let (n, on) = measure(&|| run(html(), &chunks).len());
        assert!(n > 0);
        let css: Vec<u8> = page
            .split(|b| *b == b'\n')
            .enumerate()
            .flat_map(|(i, _)| {
                format!(".r{i} {{ background: url(http://hr.corp:8080/hr/img/{i}.png) }}\n")
                    .into_bytes()
            })
            .take(1 << 20)
            .collect();
        let css_chunks: Vec<&[u8]> = css.chunks(16 << 10).collect();
        let started = std::time::Instant::now();
        for _ in 0..rounds {
            run(BodyKind::Css, &css_chunks);
        }
        let css_rate = (css.len() * rounds) as f64 / started.elapsed().as_secs_f64() / 1e6;
        println!(
            "translate 1 MiB HTML: off {off:.0} MB/s, on {on:.1} MB/s ({:.1}% of off); 1 MiB CSS on {css_rate:.1} MB/s",
            on / off * 100.0
        );
    }

    #[test]
    fn only_identity_html_and_css_are_rewritten() {
        let kind = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(
                    http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            BodyKind::of(&h)
        };
        assert!(matches!(
            kind(&[("content-type", "text/html")]),
            Some(BodyKind::Html(_))
        ));
        assert!(matches!(
            kind(&[("content-type", "Text/HTML; charset=ISO-8859-1")]),
            Some(BodyKind::Html(_))
        ));
        assert!(matches!(
            kind(&[("content-type", "application/xhtml+xml")]),
            Some(BodyKind::Html(_))
        ));
        assert_eq!(
            kind(&[("content-type", "text/css; charset=utf-8")]),
            Some(BodyKind::Css)
        );
        assert_eq!(
            kind(&[
                ("content-type", "text/css"),
                ("content-encoding", "identity")
            ]),
            Some(BodyKind::Css)
        );
        assert_eq!(
            kind(&[("content-type", "text/html"), ("content-encoding", "gzip")]),
            None
        );
        assert_eq!(
            kind(&[("content-type", "text/css"), ("content-encoding", "br")]),
            None
        );
        assert_eq!(kind(&[("content-type", "text/html; charset=utf-16")]), None);
        assert_eq!(kind(&[("content-type", "text/html; charset=bogus")]), None);
        assert_eq!(kind(&[("content-type", "application/javascript")]), None);
        assert_eq!(kind(&[("content-type", "image/png")]), None);
        assert_eq!(kind(&[]), None);
    }

    #[test]
    fn a_latin1_page_keeps_its_bytes() {
        let kind = BodyKind::Html(
            lol_html::AsciiCompatibleEncoding::new(encoding_rs::WINDOWS_1252).unwrap(),
        );
        let input = b"<p>caf\xe9</p><a href=\"http://hr.corp:8080/hr/caf\xe9\">x</a>";
        let got = run(kind, &[input]);
        assert_eq!(
            got,
            b"<p>caf\xe9</p><a href=\"https://hr.apps.example.com/caf\xe9\">x</a>".to_vec()
        );
    }
}
