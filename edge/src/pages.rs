//! Branded error answers: a small HTML page, or JSON when the client prefers
//! it. Both carry the stable code, the request id and the UTC time.

use std::time::SystemTime;

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, CACHE_CONTROL, CONTENT_TYPE};
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
        _ => "Something went wrong inside Portico.",
    }
}

/// Whether the `Accept` header prefers JSON over HTML.
pub(crate) fn prefers_json(headers: &HeaderMap) -> bool {
    let mut q_json = 0.0f32;
    let mut q_html = 0.0f32;
    for value in headers.get_all(ACCEPT) {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',').take(64) {
            let mut parts = item.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0)
                .clamp(0.0, 1.0);
            match media.as_str() {
                "application/json" | "application/problem+json" => q_json = q_json.max(q),
                "text/html" | "text/*" | "*/*" => q_html = q_html.max(q),
                _ => {}
            }
        }
    }
    q_json > 0.0 && q_json > q_html
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
    resp
}

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
        assert!(prefers_json(&accept("application/json")));
        assert!(prefers_json(&accept("application/json, */*;q=0.1")));
        assert!(prefers_json(&accept("text/html;q=0.5, application/json")));
        assert!(!prefers_json(&accept(
            "text/html,application/xhtml+xml,application/json;q=0.9,*/*;q=0.8"
        )));
        assert!(!prefers_json(&accept("*/*")));
        assert!(!prefers_json(&accept("application/json;q=0")));
        assert!(!prefers_json(&HeaderMap::new()));
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
    }
}
