//! Branded error answers: a small HTML page, or JSON when the client prefers
//! it. Both carry the stable code, the request id and the UTC time.

use std::time::SystemTime;

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderName, Response};
use portico_proto::{ErrorCode, RequestId};

/// The header every answer carries. A `HeaderName` constant: inserting by
/// `&str` would copy a custom name into a fresh allocation every time.
pub(crate) const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-portico-request-id");
/// The header every error answer carries.
pub(crate) const ERROR_HEADER: HeaderName = HeaderName::from_static("x-portico-error");

/// One line for users, per code.
pub(crate) fn explanation(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::AppNotFound => "No application is published at this address.",
        ErrorCode::Maintenance => "This application is down for maintenance.",
        ErrorCode::NotAssigned => "You are signed in but not assigned to this application.",
        ErrorCode::ConnectorNotFound => "No connector is available to reach this application.",
        ErrorCode::ConnectorTimeout => "The connector did not answer in time.",
        ErrorCode::BackendUnreachable => "The application's server could not be reached.",
        ErrorCode::BackendTimeout => "The application's server did not answer in time.",
        ErrorCode::BackendCertInvalid => {
            "The application's server presented an invalid certificate."
        }
        ErrorCode::MeshUnreachable => "No path to an edge that can reach this application.",
        ErrorCode::BadRequest => "The request could not be understood.",
        ErrorCode::BadRequestBody => "The request body was malformed.",
        ErrorCode::PathOutsidePrefix => {
            "The requested path lies outside the published application."
        }
        ErrorCode::ClientClosed => "The request was cancelled by the client.",
        ErrorCode::ClientStalled => "The client stopped reading the response.",
        ErrorCode::BackendBusy => "The application's server is busy; try again shortly.",
        ErrorCode::FeatureUnsupported => {
            "This application needs a feature this edge does not offer."
        }
        ErrorCode::SignInRequired => "Sign in to use this application.",
        ErrorCode::SignInFailed => {
            "The sign-in could not be completed; open the application again to retry."
        }
        _ => "Something went wrong inside Portico.",
    }
}

/// Whether the client prefers JSON to HTML by its `Accept` header
/// (RFC 9110 §12.5.1).
///
/// Each of the two answers gets the quality of the most specific range that
/// matches it (`application/json` over `application/*` over `*/*`): a more
/// specific range overrides a wildcard, `application/json;q=0, */*` too.
/// JSON wins on a higher quality, or on an equal one when a more specific
/// range gave it: axios's `application/json, text/plain, */*` names JSON
/// and reaches HTML only through `*/*`. Everything else, `*/*` alone, no
/// header and anything malformed included, gets the HTML page.
pub(crate) fn prefers_json(headers: &HeaderMap) -> bool {
    let mut json = Match::NONE;
    let mut html = Match::NONE;
    let ranges = headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .take(MAX_ACCEPT_RANGES);
    for range in ranges {
        let Some((ty, subtype, quality)) = media_range(range) else {
            continue;
        };
        json = json
            .max(Match::of(ty, subtype, "application", "json", quality))
            .max(Match::of(
                ty,
                subtype,
                "application",
                "problem+json",
                quality,
            ));
        html = html.max(Match::of(ty, subtype, "text", "html", quality));
    }
    json.quality > 0
        && (json.quality > html.quality
            || (json.quality == html.quality && json.specificity > html.specificity))
}

/// The most `Accept` ranges looked at; a longer header is cut.
const MAX_ACCEPT_RANGES: usize = 64;

/// How one answer's media type matched a range: the range's specificity
/// (0 no match, 1 `*/*`, 2 `type/*`, 3 exact) and its quality in
/// thousandths. Ordered by specificity first, so `max` keeps the most
/// specific match, and the highest quality among equally specific ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Match {
    specificity: u8,
    quality: u16,
}

impl Match {
    const NONE: Match = Match {
        specificity: 0,
        quality: 0,
    };

    fn of(ty: &str, subtype: &str, want_ty: &str, want_subtype: &str, quality: u16) -> Match {
        let specificity = match (ty, subtype) {
            ("*", "*") => 1,
            (t, "*") if t.eq_ignore_ascii_case(want_ty) => 2,
            (t, s) if t.eq_ignore_ascii_case(want_ty) && s.eq_ignore_ascii_case(want_subtype) => 3,
            _ => return Match::NONE,
        };
        Match {
            specificity,
            quality,
        }
    }
}

/// One `Accept` element, `type/subtype *( ; parameter )`: its type,
/// subtype and quality (`q`, in thousandths; 1000 when absent). `None` for
/// an element that is not a valid media range.
fn media_range(range: &str) -> Option<(&str, &str, u16)> {
    let mut parts = range.split(';');
    let (ty, subtype) = parts.next()?.trim().split_once('/')?;
    let token = |s: &str| !s.is_empty() && !s.bytes().any(|b| b.is_ascii_whitespace());
    if !token(ty) || !token(subtype) || (ty == "*" && subtype != "*") {
        return None;
    }
    let mut quality = 1000;
    for param in parts {
        let Some((name, value)) = param.split_once('=') else {
            continue;
        };
        if name.trim().eq_ignore_ascii_case("q") {
            quality = qvalue(value.trim())?;
            // Parameters after the weight are extensions: ignored.
            break;
        }
    }
    Some((ty, subtype, quality))
}

/// A `qvalue` (RFC 9110 §12.4.2), `0` to `1` with at most three decimals,
/// in thousandths.
fn qvalue(s: &str) -> Option<u16> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let frac_value = frac
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(3)
        .fold(0u16, |n, b| n * 10 + u16::from(b - b'0'));
    match int {
        "0" => Some(frac_value),
        "1" if frac_value == 0 => Some(1000),
        _ => None,
    }
}

/// The error answer for `code`.
pub(crate) fn error_response<B: From<Bytes>>(
    code: ErrorCode,
    request_id: RequestId,
    request_headers: &HeaderMap,
) -> Response<B> {
    let status = code.http_status();
    let time = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let message = explanation(code);
    let (ctype, body) = if prefers_json(request_headers) {
        let body = serde_json::json!({
            "error": code.as_str(),
            "status": status.as_u16(),
            "message": message,
            "request_id": request_id.to_string(),
            "time": time,
        });
        ("application/json", format!("{body}\n"))
    } else {
        (
            "text/html; charset=utf-8",
            html(code, status.as_u16(), message, request_id, &time),
        )
    };
    let mut resp = Response::new(B::from(Bytes::from(body)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(ERROR_HEADER, HeaderValue::from_static(code.as_str()));
    h.insert(REQUEST_ID_HEADER, request_id.header_value());
    if code == ErrorCode::Maintenance {
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static(MAINTENANCE_RETRY_AFTER),
        );
    }
    resp
}

/// `Retry-After` of a `Maintenance` answer, in seconds: when a client (or
/// a crawler) should look again. The edge cannot know when the admin ends
/// the maintenance, so this is a guess kept short.
pub(crate) const MAINTENANCE_RETRY_AFTER: &str = "120";

fn html(code: ErrorCode, status: u16, message: &str, request_id: RequestId, time: &str) -> String {
    // Every interpolated value is ours (code names, hex ids, a timestamp), so
    // nothing a user sent reaches the page.
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{status} {code} · Portico</title>
<meta name="viewport" content="width=device-width,initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;background:#f5f6f8;color:#1d2330;margin:0}}
main{{max-width:36rem;margin:12vh auto;padding:2rem;background:#fff;border-radius:8px;box-shadow:0 1px 4px #0002}}
h1{{font-size:1.3rem;margin:0 0 .5rem}}.brand{{color:#3b5bdb;font-weight:600;letter-spacing:.04em}}
dl{{font-size:.85rem;color:#555;display:grid;grid-template-columns:auto 1fr;gap:.2rem 1rem}}code{{font-size:.85rem}}</style>
</head><body><main><div class="brand">Portico</div>
<h1>{status} · {code}</h1><p>{message}</p>
<dl><dt>Error</dt><dd><code>{code}</code></dd><dt>Request ID</dt><dd><code>{request_id}</code></dd><dt>Time (UTC)</dt><dd><code>{time}</code></dd></dl>
</main></body></html>
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    fn accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(ACCEPT, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn json_only_when_preferred() {
        const JSON: bool = true;
        const HTML: bool = false;
        let cases: &[(&str, bool)] = &[
            ("application/json", JSON),
            // axios: JSON named, HTML only through */*.
            ("application/json, text/plain, */*", JSON),
            // Firefox and Chromium navigations.
            (
                "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
                HTML,
            ),
            (
                "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,\
                 image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7",
                HTML,
            ),
            (
                "text/html,application/xhtml+xml,application/json;q=0.9,*/*;q=0.8",
                HTML,
            ),
            // curl and friends.
            ("*/*", HTML),
            ("", HTML),
            ("text/plain", HTML),
            ("application/json, */*;q=0.1", JSON),
            ("text/html;q=0.5, application/json", JSON),
            ("*/*;q=0.1, application/json;q=0.05", HTML),
            // Equal quality and equally specific: HTML.
            ("text/html, application/json", HTML),
            ("application/json, text/html", HTML),
            // A type wildcard is more specific than */*, less than exact.
            ("application/*", JSON),
            ("application/*, */*", JSON),
            ("text/*, application/json", JSON),
            ("text/*, application/*", HTML),
            // A more specific range overrides a wildcard, in either order.
            ("application/json;q=0", HTML),
            ("application/json;q=0, */*", HTML),
            ("*/*, application/json;q=0", HTML),
            ("text/html;q=0, */*", JSON),
            ("application/problem+json", JSON),
            // Case, whitespace and media type parameters.
            ("APPLICATION/JSON", JSON),
            (
                "Application/Json ; charset=utf-8 ; Q=0.9, text/html;q=0.8",
                JSON,
            ),
            ("text/html;level=1;q=0.4, application/json;q=0.5", JSON),
            ("application/json;q=0.500, text/html;q=0.5", HTML),
            ("application/json;q=1.000, text/html;q=0.999", JSON),
            // Malformed elements are skipped, not read as q=1.
            ("application/json;q=1.5, text/html;q=0.5", HTML),
            ("application/json;q=abc", HTML),
            ("application/json;q=0.1234, text/html;q=0.1", HTML),
            ("application/json;q=-1", HTML),
            ("*/json", HTML),
            ("application /json", HTML),
            ("json", HTML),
        ];
        for (value, want) in cases {
            assert_eq!(prefers_json(&accept(value)), *want, "Accept: {value}");
        }
        assert!(!prefers_json(&HeaderMap::new()));
        // Several Accept fields are one list.
        let mut both = HeaderMap::new();
        both.append(ACCEPT, HeaderValue::from_static("text/html;q=0.1"));
        both.append(ACCEPT, HeaderValue::from_static("application/json"));
        assert!(prefers_json(&both));
        // Only the first 64 ranges count.
        let long = format!("{}application/json", "text/plain, ".repeat(64));
        assert!(!prefers_json(&accept(&long)));
    }

    #[tokio::test]
    async fn error_pages_carry_code_id_and_time() {
        let id = RequestId(0xabc);
        let resp: Response<Full<Bytes>> =
            error_response(ErrorCode::AppNotFound, id, &accept("application/json"));
        assert_eq!(resp.status(), 404);
        assert_eq!(resp.headers()[&ERROR_HEADER], "AppNotFound");
        assert_eq!(resp.headers()[&REQUEST_ID_HEADER], id.to_string().as_str());
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "AppNotFound");
        assert_eq!(v["status"], 404);
        assert_eq!(v["request_id"], id.to_string());
        assert!(v["time"].as_str().unwrap().ends_with('Z'));

        let resp: Response<Full<Bytes>> =
            error_response(ErrorCode::ConnectorTimeout, id, &accept("text/html"));
        assert_eq!(resp.status(), 504);
        assert!(resp.headers()[CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(text.contains("Portico"));
        assert!(text.contains("ConnectorTimeout"));
        assert!(text.contains(&id.to_string()));
        assert!(text.contains(explanation(ErrorCode::ConnectorTimeout)));
        assert!(resp_has_no_retry_after(ErrorCode::ConnectorTimeout));
    }

    fn resp_has_no_retry_after(code: ErrorCode) -> bool {
        let resp: Response<Full<Bytes>> = error_response(code, RequestId(1), &HeaderMap::new());
        resp.headers().get(RETRY_AFTER).is_none()
    }

    /// Maintenance is 503 with `Retry-After`, and its own explanation.
    #[test]
    fn maintenance_pages_say_when_to_retry() {
        let resp: Response<Full<Bytes>> =
            error_response(ErrorCode::Maintenance, RequestId(7), &HeaderMap::new());
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()[RETRY_AFTER], MAINTENANCE_RETRY_AFTER);
        assert_eq!(resp.headers()[&ERROR_HEADER], "Maintenance");
        assert!(resp_has_no_retry_after(ErrorCode::AppNotFound));
    }
}
